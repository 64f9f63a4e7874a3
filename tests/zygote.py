"""A process that imports the toolkit's libraries once and forks a child per script run (the suite's launcher).

Most of a tiny test run's time was its interpreter importing torch, diffusers,
transformers, accelerate and datasets (about 3.6 s of CPU a run on this
machine, 2026-12-02, over a hundred runs a suite). conftest.launch sends the
single-process runs here instead: the child of a fork has all of that
imported already, then behaves as ``python SCRIPT ARGS`` would: its own
working directory, environment, argv (``sys.orig_argv`` too, for a
re-exec), stdin from /dev/null, stdout and stderr into files, the script run
as ``__main__`` and the process's exit status its result. It also starts as a
new interpreter would in what a fork would otherwise inherit: torch's,
numpy's and random's global generators seeded from the OS, a new
interpreter's sys.path (not tests/), non-daemon threads joined before the
atexit functions. The one thing a fork cannot renew is the hash seed: forked
runs share the zygote's (the fresh lane covers what depends on it).

Protocol, one JSON object a line: the client writes a request
``{"script", "args", "cwd", "env", "stdout", "stderr"}`` (or ``"module"`` instead of
``"script"``: ``python -m MODULE ARGS``, for the accelerate launcher, whose workers are new interpreters); this process
answers ``{"pid": ...}`` at the fork and ``{"returncode": ...}`` when the child
ends (negative: killed by that signal, as subprocess reports it). It answers
``{"ready": true}`` once the imports are done.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback


# A new interpreter's sys.path after its first entry and PYTHONPATH's: the standard library, site-packages and what
# .pth files add, as this process found them at its start (before preload put the repository first).
_SITE_PATH = []


def _record_site_path() -> None:
    pythonpath = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    _SITE_PATH[:] = [p for p in sys.path[1:] if os.path.abspath(p) not in pythonpath]


def _new_interpreter_path(first: str, env: dict) -> list:
    """sys.path as `python SCRIPT` (``first``: the script's real directory) or `python -m` (the cwd) would start."""
    path = [first, *(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p), *_SITE_PATH]
    return list(dict.fromkeys(path))  # site.removeduppaths: the first of each


def _fresh_random_state() -> None:
    """Seed the global generators from the OS, as a new interpreter's are: every forked run draws its own numbers
    (a fork would otherwise repeat the zygote's state in every run, and hide a stray global draw)."""
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()


def _exit_as_the_interpreter(code: int) -> None:
    """What Py_FinalizeEx does before the process ends: join non-daemon threads, then run the atexit functions."""
    import threading

    try:
        threading._shutdown()
    except BaseException:  # noqa: BLE001 - the interpreter prints and goes on
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def preload() -> None:
    """Import what the scripts import, without running any torch computation (no thread pools before a fork)."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    import accelerate  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    import datasets  # noqa: F401
    # What `python -m accelerate.commands.launch` imports (not the module itself: runpy warns when asked to run a
    # module already imported).
    import accelerate.commands.config  # noqa: F401
    import accelerate.commands.utils  # noqa: F401
    import torch.distributed.run  # noqa: F401
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,  # noqa: F401
                           UNet2DConditionModel)
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
    from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer  # noqa: F401
    from transformers import AutoModelForImageClassification  # noqa: F401

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import common.cli  # noqa: F401
    import common.evaluation  # noqa: F401
    import common.protocol  # noqa: F401
    import common.training  # noqa: F401


def _child(req: dict) -> None:
    """Become ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) in the request's directory and environment,
    stdin from /dev/null, stdout and stderr into the request's two files; never returns."""
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        _fresh_random_state()
        script, module = req.get("script"), req.get("module")
        if module:  # python -m MODULE ARGS (the accelerate launcher)
            sys.argv = [module, *req["args"]]
            sys.orig_argv = [sys.executable, "-m", module, *req["args"]]
            sys.path[:] = _new_interpreter_path(os.getcwd(), req["env"])
        else:
            sys.argv = [script, *req["args"]]
            sys.orig_argv = [sys.executable, script, *req["args"]]
            sys.path[:] = _new_interpreter_path(os.path.dirname(os.path.realpath(script)), req["env"])
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as err:
            if err.code is None:
                code = 0
            elif isinstance(err.code, int):
                code = err.code
            else:
                print(err.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print, then exit status 1
            traceback.print_exc()
            code = 1
    finally:
        _exit_as_the_interpreter(code)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> None:
    _record_site_path()
    preload()
    _reply({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
