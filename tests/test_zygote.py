"""tests/zygote.py: a run forked from it is what `python SCRIPT ARGS` gives (exit status, output, cwd, env, argv)."""

import os
import signal

import conftest
from conftest import launch

SCRIPT = '''
import os, sys
print("cwd", os.getcwd())
print("argv", sys.argv[1:], os.path.basename(sys.argv[0]), os.path.basename(sys.orig_argv[1]))
print("fault", os.environ.get("REVIVAL_FAULT"))
print("main", __name__, os.path.basename(__file__))
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
    """The accelerate launcher is forked from the zygote too (its worker is a new interpreter either way)."""
    script = tmp_path / "probe_script.py"
    script.write_text(SCRIPT)
    runs = []
    for fresh in (False, True):
        if fresh:
            monkeypatch.setenv("REVIVAL_NO_ZYGOTE", "1")
        runs.append(launch(str(script), ["3", "a b"], str(tmp_path), accelerate=True))
    (forked, new) = runs
    assert forked.returncode == new.returncode != 0
    assert forked.stdout == new.stdout and "argv ['3', 'a b'] probe_script.py" in forked.stdout
    assert "main __main__ probe_script.py" in forked.stdout
