"""Tiny seeded models and data, built once per test session (docs/protocols.md: models and precision)."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs two xdist workers on two cores: one thread for each worker and for every process it launches
# (inherited through the environment). torch's default, a thread per core, would put four spinning threads on two
# cores and slow every test down.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

RESOLUTION = 32
VALIDATION_PROMPTS = ("a red circle", "a blue square", "a green triangle")  # the tiny runs' --validation_prompts


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer, tiny SD pipeline, tiny CLIP (as ./openai/clip-vit-base-patch32), 100-row dataset, prompts."""
    from tools import tiny

    root = tmp_path_factory.mktemp("assets")
    tok = tiny.write_clip_tokenizer(str(root / "tokenizer"))
    sd = tiny.build_tiny_sd(str(root / "sd"), seed=0, resolution=RESOLUTION, tokenizer=tok)
    clip = tiny.build_tiny_clip(str(root / "openai" / "clip-vit-base-patch32"), seed=1, image_size=RESOLUTION,
                                tokenizer=tok)
    data = tiny.shapes_dataset(str(root / "data"), [("red", "circle"), ("blue", "square")], per_concept=50,
                               size=RESOLUTION, seed=0)
    vit = tiny.build_tiny_vit_classifier(str(root / "classifier"), seed=2, image_size=RESOLUTION)
    timm_sd = tiny.build_tiny_timm_classifier(str(root / "style.safetensors"), seed=3)
    prompts = root / "prompts.txt"
    first, second, third = VALIDATION_PROMPTS
    prompts.write_text(f"{first}\n\n{second}\n{third}\n")  # a blank line, skipped
    return {"root": root, "sd": sd, "clip": clip, "data": data, "prompts": str(prompts), "tokenizer": tok,
            "classifier": vit, "timm": timm_sd}


# Variables a launched script reads while it runs, not when its libraries are imported: a run that differs from the
# zygote's environment only in these can be forked from it.
# (PYTEST_CURRENT_TEST is pytest's, new in every test: counted, it kept every test after a worker's first from the
# zygote.)
# (PYTHONPATH is read at start-up, but only to build sys.path, which a forked run builds anew from it.)
RUNTIME_VARS = {"REVIVAL_FAULT", "REVIVAL_EMULATE_FP16", "REVIVAL_FP16_INIT_SCALE", "ACCELERATE_USE_CPU", "PYTHONPATH",
                "PYTEST_CURRENT_TEST"}


class Zygote:
    """Client of tests/zygote.py: one per test process, started at its first use, gone with the test process."""

    def __init__(self):
        self.proc = None
        self.env = None
        self.lock = threading.Lock()
        self.buffer = b""

    def _line(self, deadline: float | None) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the zygote ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def usable(self, env: dict) -> bool:
        """Whether a run in ``env`` can be forked from the zygote (started now if need be)."""
        if os.environ.get("REVIVAL_NO_ZYGOTE") or not hasattr(os, "fork"):
            return False
        if self.proc is None:
            # Started in the suite's own launch environment, whatever the run that first asks for it: a first run
            # with extra variables (a fake SLURM job, say) would otherwise make every later run differ from it
            # and never fork.
            self.env = launch_env()
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")], cwd=ROOT, env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            atexit.register(self.stop)
            try:
                assert self._line(time.monotonic() + 300).get("ready")
            except (EOFError, TimeoutError, AssertionError, ValueError):
                self.proc.kill()
                self.proc = False
        if not self.proc or self.proc.poll() is not None:
            return False
        return not self.differs(env)

    def stop(self) -> None:
        """End the zygote."""
        if self.proc:
            self.proc.kill()
            self.proc.wait()

    def differs(self, env: dict) -> list:
        """Names of the import-time variables in which ``env`` differs from the zygote's."""
        keys = (set(env) | set(self.env or {})) - RUNTIME_VARS
        return sorted(k for k in keys if env.get(k) != (self.env or {}).get(k))

    def run(self, cmd, module, args, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """``python -m MODULE ARGS`` (``module`` given) or ``python ARGS`` (the script first), forked."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {"cwd": str(cwd), "env": env, "stdout": out, "stderr": err}
            request.update({"module": module, "args": list(args)} if module else
                           {"script": args[0], "args": list(args[1:])})
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._line(None)["pid"]
            try:
                code = self._line(time.monotonic() + timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._line(None)
                raise subprocess.TimeoutExpired(cmd, timeout) from None
            read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
            return subprocess.CompletedProcess(cmd, code, read(out), read(err))


_ZYGOTE = Zygote()

# Variables that code run inside the test process sets in os.environ as a side effect: importing cv2 (NudeNet's)
# prepends to LD_LIBRARY_PATH, importing tools/build_toy_world.py sets OMP_WAIT_POLICY, common.determinism sets
# CUBLAS_WORKSPACE_CONFIG, TorchInductor sets TORCHINDUCTOR_CACHE_DIR when it first looks for its cache. A launched
# script starts as from the shell that ran pytest, whatever ran in-process before it (and so can still be forked
# from the zygote, whose environment is that shell's).
LEAKED_VARS = ("LD_LIBRARY_PATH", "OMP_WAIT_POLICY", "CUBLAS_WORKSPACE_CONFIG", "TORCHINDUCTOR_CACHE_DIR")
_START_ENV = {name: os.environ[name] for name in LEAKED_VARS if name in os.environ}


# The fresh lane: the first launch of each program in each mode (python, accelerate x1, accelerate xN) in each test
# process is a new interpreter, whatever the test, so every program the suite launches also runs as users run it
# (a missing import that the zygote's preload hides, an unseeded draw, a thread left running show there).
_FRESH_DONE = set()


def launch(script: str, args, cwd, num_processes: int = 1, timeout: int = 900, env_extra=None,
           accelerate: bool | None = None, fresh: bool | None = None):
    """Run a top-level script on CPU; return the CompletedProcess (``.how``: how it was started).

    Through `accelerate launch` with several processes, or when ``accelerate``
    is set (each script has tests that launch it so, as users do); otherwise
    a single process under plain python. The plain run, or the launcher, is
    forked from the zygote (tests/zygote.py: the libraries already imported,
    ~3.6 s of CPU saved a process) when the environment allows; a launch's
    workers are always new interpreters, each rank with a hash seed of its
    own (tests/fresh_worker.sh). ``fresh=True``, or the first launch of the
    program in its mode in this test process (``fresh=None``), starts the
    run or launcher as a new interpreter too.
    REVIVAL_NO_ZYGOTE=1 makes every run a new interpreter;
    REVIVAL_LAUNCH_LOG=FILE appends one JSON line a launch (test, mode,
    seconds, and why it was not forked).
    """
    start = time.monotonic()
    if accelerate is None:
        accelerate = num_processes > 1
    mode = f"accelerate x{num_processes}" if accelerate else "python"
    key = (os.path.abspath(os.path.join(ROOT, script)), mode)
    if fresh is None:
        fresh = key not in _FRESH_DONE
    proc, how = _launch(script, args, cwd, num_processes, timeout, env_extra, accelerate, mode, fresh)
    if "zygote" not in how:
        _FRESH_DONE.add(key)
    proc.how = how
    if os.environ.get("REVIVAL_LAUNCH_LOG"):
        with open(os.environ["REVIVAL_LAUNCH_LOG"], "a") as f:
            why = ("fresh lane" if fresh else _ZYGOTE.differs(launch_env(env_extra))) if "zygote" not in how else []
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), "script": script, "how": how, "why": why,
                                "seconds": round(time.monotonic() - start, 2)}) + "\n")
    return proc


def launch_env(env_extra=None) -> dict:
    """The environment a launched script starts in: the suite's, less what in-process code leaked into it.

    ``env_extra`` wins over the suite's own settings (PYTHONPATH, ACCELERATE_USE_CPU included).
    """
    env = dict(os.environ)
    for name in LEAKED_VARS:
        if name in _START_ENV:
            env[name] = _START_ENV[name]
        else:
            env.pop(name, None)
    return {**env, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT), **(env_extra or {})}


def _launch(script, args, cwd, num_processes, timeout, env_extra, accelerate, how, fresh):
    env = launch_env(env_extra)
    claimed = not fresh and _ZYGOTE.lock.acquire(blocking=False)
    try:
        forked = claimed and _ZYGOTE.usable(env)
        args = [str(ROOT / script), *map(str, args)]
        module = None
        if accelerate:
            module = "accelerate.commands.launch"
            launcher = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--num_processes", str(num_processes), *(["--multi_gpu"] if num_processes > 1 else [])]
            if num_processes > 1:  # `python -u SCRIPT` per rank, each rank with a hash seed of its own
                launcher += ["--no_python", str(ROOT / "tests" / "fresh_worker.sh")]
                env = dict(env, REVIVAL_FRESH_PYTHON=sys.executable)
            args = [*launcher, *args]
        cmd = [sys.executable, *(["-m", module] if module else []), *args]
        if forked:
            return _ZYGOTE.run(cmd, module, args, cwd, env, timeout), how + " (zygote)"
    finally:
        if claimed:
            _ZYGOTE.lock.release()
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), how


def frozen_parts(model_dir: str):
    """A pipeline's parts loaded for searching, not training: UNet, text encoder and VAE in eval mode, frozen."""
    from common.models import load_sd_parts

    parts = load_sd_parts(model_dir)
    for module in (parts.unet, parts.text_encoder, parts.vae):
        module.eval().requires_grad_(False)
    return parts


def seed_flags(assets, out_dir, **over):
    """The seed README's individual-script flag set, resolution lowered to the tiny model."""
    flags = {
        "--pretrained_model_name_or_path": assets["sd"], "--train_data_dir": assets["data"],
        "--caption_column": "prompt", "--use_ema": None, "--resolution": RESOLUTION, "--center_crop": None,
        "--random_flip": None, "--gradient_checkpointing": None, "--mixed_precision": "fp16",
        "--learning_rate": "1e-05", "--max_grad_norm": 1, "--lr_scheduler": "constant", "--lr_warmup_steps": 0,
        "--train_batch_size": 10, "--gradient_accumulation_steps": 1, "--curriculum": "50,100",
        "--clip_threshold": 0.31, "--validation_prompts": assets["prompts"],
        "--log_file": os.path.join(out_dir, "train.log"), "--save_model": "True", "--output_dir": out_dir,
        "--num_inference_steps": 2,
    }
    flags.update(over)
    out = []
    for k, v in flags.items():
        if v is False:
            continue
        out.append(k if v is None else f"{k}={v}")
    return out


@pytest.fixture
def in_assets_root(assets, monkeypatch):
    """Run in the assets' directory, where hub-style ids (openai/clip-vit-base-patch32) are local folders."""
    monkeypatch.chdir(assets["root"])
