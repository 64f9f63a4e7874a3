"""tests/zygote.py: a run forked from it is what `python SCRIPT ARGS` gives (exit status, output, cwd, env, argv)."""

import os
import signal

import conftest
from conftest import launch

SCRIPT = '''
import os, sys
say = lambda *words: sys.stdout.write(" ".join(map(str, words)) + "\\n")  # one write: ranks interleave by line
say("cwd", os.getcwd())
say("argv", sys.argv[1:], os.path.basename(sys.argv[0]), os.path.basename(sys.orig_argv[1]))
say("fault", os.environ.get("REVIVAL_FAULT"), "rank", os.environ.get("RANK"))
say("main", __name__, os.path.basename(__file__))
print("warning", file=sys.stderr)
if sys.argv[1] == "kill":
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
raise SystemExit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
'''.replace("import os, sys", "import os, signal, sys")


def _both(tmp_path, monkeypatch, args):
    script = tmp_path / "probe_script.py"
    script.write_text(SCRIPT)
    forked = launch(str(script), args, str(tmp_path), env_extra={"REVIVAL_FAULT": "x:1"})
    assert conftest._ZYGOTE.proc, "the run was not forked from the zygote"
    monkeypatch.setenv("REVIVAL_NO_ZYGOTE", "1")
    fresh = launch(str(script), args, str(tmp_path), env_extra={"REVIVAL_FAULT": "x:1"})
    monkeypatch.delenv("REVIVAL_NO_ZYGOTE")
    return forked, fresh


def test_a_forked_run_matches_a_new_interpreter(tmp_path, monkeypatch):
    for args, code in ((["0", "a b"], 0), (["3"], 3), (["kill"], -signal.SIGKILL), (["bad input"], 1)):
        forked, fresh = _both(tmp_path, monkeypatch, args)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
        assert forked.returncode == code, (args, forked.stderr)
    assert f"cwd {tmp_path}" in forked.stdout and "fault x:1" in forked.stdout
    assert "main __main__ probe_script.py" in forked.stdout and "argv ['bad input'] probe_script.py" in forked.stdout
    assert forked.stderr.splitlines() == ["warning", "bad input"]
    assert not os.environ.get("REVIVAL_FAULT")  # the run's environment did not leak into the test process


def test_an_accelerate_launch_forked_matches_a_new_interpreter(tmp_path, monkeypatch):
    """The launcher and its workers are forked from the zygote too (tests/zygote_worker.py stands in for each
    worker): one and two processes give what new interpreters give, a worker's exit status included."""
    script = tmp_path / "probe_script.py"
    script.write_text(SCRIPT)
    for processes in (1, 2):
        runs = []
        for fresh in (False, True):
            if fresh:
                monkeypatch.setenv("REVIVAL_NO_ZYGOTE", "1")
            runs.append(launch(str(script), ["3", "a b"], str(tmp_path), accelerate=True,
                               num_processes=processes))
            monkeypatch.delenv("REVIVAL_NO_ZYGOTE", raising=False)
        forked, new = runs
        assert forked.returncode == new.returncode != 0
        assert sorted(forked.stdout.splitlines()) == sorted(new.stdout.splitlines())
        # accelerate starts one process as `python SCRIPT`, torchrun's workers as `python -u SCRIPT`
        flag = "-u" if processes > 1 else "probe_script.py"
        assert forked.stdout.count(f"argv ['3', 'a b'] probe_script.py {flag}") == processes
        assert "main __main__ probe_script.py" in forked.stdout
        if processes == 2:
            assert {"rank 0", "rank 1"} <= {line[-6:] for line in forked.stdout.splitlines()}
            # torchrun reports the worker's own exit status, as for a new interpreter
            assert "exitcode  : 3" in forked.stderr and "exitcode  : 3" in new.stderr


PARENT = "import os; print(os.getppid(), os.environ.get('LD_LIBRARY_PATH'))\n"


def test_later_tests_and_side_effect_variables_still_fork(tmp_path, monkeypatch):
    """pytest's per-test variable and a variable an in-process import set (cv2 prepends to LD_LIBRARY_PATH) do
    not keep a run from the zygote, and the run starts with the variable as pytest started."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    launch(str(script), [], str(tmp_path))  # the zygote started, if no earlier test did
    before = os.environ.get("LD_LIBRARY_PATH")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/elsewhere.py::another (call)")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/a/library/dir:{before or ''}")
    parent, library_path = launch(str(script), [], str(tmp_path)).stdout.split()
    assert int(parent) == conftest._ZYGOTE.proc.pid
    assert library_path == str(conftest._START_ENV.get("LD_LIBRARY_PATH"))  # as pytest started, leaks or not
