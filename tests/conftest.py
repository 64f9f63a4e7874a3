"""Tiny seeded models and data, built once per test session (docs/protocols.md: models and precision)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def pytest_collection_modifyitems(items):
    """xdist groups for `make test` (two workers, --dist loadgroup): the tests that launch two processes share one
    group, so they run one at a time; every other test is grouped with its module, so a module's fixtures (a toy
    world, a reference run) are built once, not once on each worker."""
    for item in items:
        if item.get_closest_marker("two_processes"):
            item.add_marker(pytest.mark.xdist_group("two_processes"))
        else:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    return {"root": root, "sd": sd, "clip": clip, "data": data, "prompts": str(prompts), "tokenizer": tok,
            "classifier": vit, "timm": timm_sd}


def launch(script: str, args, cwd, num_processes: int = 1, timeout: int = 900, env_extra=None,
           accelerate: bool | None = None):
    """Run a top-level script on CPU; return the CompletedProcess.

    Through `accelerate launch` with several processes, or when ``accelerate``
    is set (each script has tests that launch it so, as users do); otherwise
    a single process runs under plain python, which is the same run without
    the launcher's second interpreter start (~2 s a run on this machine).
    """
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT), **(env_extra or {}))
    if accelerate is None:
        accelerate = num_processes > 1
    cmd = [sys.executable]
    if accelerate:
        cmd += ["-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
        if num_processes > 1:
            cmd.append("--multi_gpu")
    cmd += [str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
