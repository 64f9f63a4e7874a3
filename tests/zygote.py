"""A process that imports the toolkit's libraries once and forks a child per script run (the suite's launcher).

Most of a tiny test run's time was its interpreter importing torch, diffusers,
transformers, accelerate and datasets (about 3.6 s of CPU a run on this
machine, 2026-12-02, over a hundred runs a suite). conftest.launch sends the
single-process runs here instead: the child of a fork has all of that
imported already, then behaves as ``python SCRIPT ARGS`` would: its own
working directory, environment, argv (``sys.orig_argv`` too, for a
re-exec), stdin from /dev/null, stdout and stderr into files, the script run
as ``__main__`` and the process's exit status its result.

Protocol, one JSON object a line: the client writes a request
``{"script", "args", "cwd", "env", "stdout", "stderr"}`` (or ``"module"`` instead of
``"script"``: ``python -m MODULE ARGS``, for the accelerate launcher, whose workers are new interpreters); this process
answers ``{"pid": ...}`` at the fork and ``{"returncode": ...}`` when the child
ends (negative: killed by that signal, as subprocess reports it). It answers
``{"ready": true}`` once the imports are done.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import sys
import tempfile
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
    (a fork would otherwise repeat the zygote's state in every run and every rank, and hide a stray global draw)."""
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


def _child(req: dict, fds=None, close=()) -> None:
    """Become ``python SCRIPT ARGS`` in the request's directory and environment; never returns.

    Its stdin, stdout and stderr are ``fds`` (a worker's, passed by its stand-in) or else /dev/null and the
    request's two files; ``close``: the zygote's own descriptors, which the run must not hold.
    """
    code = 1
    unbuffered = bool(fds) and "TORCHELASTIC_RUN_ID" in req["env"]  # a torchrun worker: `python -u`
    try:
        for fd in close:
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        if fds:
            for fd, passed in zip((0, 1, 2), fds):
                os.dup2(passed, fd)
            for passed in fds:
                if passed > 2:
                    os.close(passed)
            # torchrun gives each worker OMP_NUM_THREADS (1 unless set), which torch read here at import time.
            if req["env"].get("OMP_NUM_THREADS", "").isdigit():
                import torch

                torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
            if unbuffered:  # a worker its launcher terminates loses nothing it printed
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
                sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                              errors="backslashreplace")
        else:
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
            sys.orig_argv = [sys.executable, *(["-u"] if unbuffered else []), script, *req["args"]]
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


class WorkerServer:
    """Forks the workers of an accelerate launch that this process forked (tests/zygote_worker.py asks).

    torchrun starts each worker as ``zygote_worker SCRIPT ARGS`` (``--no_python``): that stand-in passes its
    environment (RANK, WORLD_SIZE, MASTER_PORT, ...), directory, argv and stdin/stdout/stderr here over a Unix
    socket, this process forks the worker with them, and the stand-in relays signals to it and ends with its
    exit status. One thread: the launcher, the stand-ins' connections and the workers are all waited on here.
    """

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.setblocking(False)

    def serve_until(self, launcher: int) -> int:
        """Serve worker requests until the forked ``launcher`` ends; return its exit status."""
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        sel.register(os.pidfd_open(launcher), selectors.EVENT_READ, ("launcher", launcher))
        workers = {}  # pid -> (pidfd, connection)
        code = None
        while code is None:
            for key, _ in sel.select():
                kind, obj = key.data
                if kind == "accept":
                    conn, _ = self.listener.accept()
                    conn.setblocking(True)
                    pid = self._fork_worker(conn, {k.fd for k in sel.get_map().values()} | {conn.fileno()})
                    pidfd = os.pidfd_open(pid)
                    workers[pid] = (pidfd, conn)
                    sel.register(pidfd, selectors.EVENT_READ, ("worker", pid))
                elif kind == "worker":
                    pidfd, conn = workers.pop(obj)
                    sel.unregister(pidfd)
                    os.close(pidfd)
                    _, status = os.waitpid(obj, 0)
                    try:
                        conn.sendall((json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())
                    except OSError:
                        pass  # the stand-in was killed (SIGKILL): nobody to tell
                    conn.close()
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    _, status = os.waitpid(obj, 0)
                    code = os.waitstatus_to_exitcode(status)
        for pid, (pidfd, conn) in workers.items():  # a launcher that died before its workers: no orphans
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(pidfd)
            conn.close()
        sel.unregister(self.listener)
        sel.close()
        return code

    def _fork_worker(self, conn, zygote_fds) -> int:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                raise EOFError("a worker stand-in hung up mid-request")
            data += more
        req = json.loads(data)
        pid = os.fork()
        if pid == 0:
            _child(req, fds, close=zygote_fds)
        for fd in fds:
            os.close(fd)
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
        return pid


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> None:
    _record_site_path()
    preload()
    # Removed by this process when its client hangs up (not by atexit: a forked run runs the exit functions).
    workers = WorkerServer(os.path.join(tempfile.mkdtemp(prefix="zygote-"), "workers.sock"))
    try:
        _serve(workers)
    finally:
        shutil.rmtree(os.path.dirname(workers.path), ignore_errors=True)


def _serve(workers: WorkerServer) -> None:
    _reply({"ready": True, "worker_socket": workers.path})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, close=[workers.listener.fileno()])
        _reply({"pid": pid})
        if req.get("module"):  # a launcher: its workers come back here to be forked
            code = workers.serve_until(pid)
        else:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        _reply({"returncode": code})


if __name__ == "__main__":
    serve()
