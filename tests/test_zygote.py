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
say("path", sys.path)
print("warning", file=sys.stderr)
if sys.argv[1] == "kill":
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
raise SystemExit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
'''.replace("import os, sys", "import os, signal, sys")


def _both(tmp_path, args, script_text=SCRIPT, **kwargs):
    """The same run forked from the zygote and in a new interpreter (each checked to have been started so)."""
    script = tmp_path / "probe_script.py"
    script.write_text(script_text)
    forked = launch(str(script), args, str(tmp_path), fresh=False, **kwargs)
    fresh = launch(str(script), args, str(tmp_path), fresh=True, **kwargs)
    assert forked.how.endswith("(zygote)") and "zygote" not in fresh.how, (forked.how, fresh.how)
    return forked, fresh


def test_a_forked_run_matches_a_new_interpreter(tmp_path):
    for args, code in ((["0", "a b"], 0), (["3"], 3), (["kill"], -signal.SIGKILL), (["bad input"], 1)):
        forked, fresh = _both(tmp_path, args, env_extra={"REVIVAL_FAULT": "x:1"})
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
        assert forked.returncode == code, (args, forked.stderr)
    assert f"cwd {tmp_path}" in forked.stdout and "fault x:1" in forked.stdout
    assert "main __main__ probe_script.py" in forked.stdout and "argv ['bad input'] probe_script.py" in forked.stdout
    assert forked.stderr.splitlines() == ["warning", "bad input"]
    assert not os.environ.get("REVIVAL_FAULT")  # the run's environment did not leak into the test process
    # sys.path as a new interpreter's: the script's directory, PYTHONPATH, the site; not tests/ (the zygote's own)
    path = next(line for line in forked.stdout.splitlines() if line.startswith("path "))
    assert str(tmp_path) in path and str(conftest.ROOT / "tests") not in path


DRAWS = f'''
import random, sys, numpy, torch
order = "|".join({set(conftest.VALIDATION_PROMPTS)!r}).replace(" ", "_")
print(torch.rand(1).item(), numpy.random.random(), random.random(), hash("abc"), order, flush=True)
'''


def _draws(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(line.split()) for line in proc.stdout.splitlines()]


def test_forked_runs_draw_their_own_random_numbers(tmp_path):
    """torch's, numpy's and random's global generators start from the OS in every forked run, as in every new
    interpreter (a fork would repeat the zygote's state, and hide an unseeded draw from every comparison of two
    runs). The hash seed is the one thing a fork cannot renew: forked runs share the zygote's (the fresh lane and
    tests/fresh_worker.sh cover what depends on it)."""
    (f1, n1), (f2, n2) = _both(tmp_path, [], DRAWS), _both(tmp_path, [], DRAWS)
    (a,), (b,), (c,), (d,) = map(_draws, (f1, f2, n1, n2))
    assert all(x != y for x, y in zip(c[:3], d[:3]))  # two new interpreters differ in every generator
    assert all(x != y for x, y in zip(a[:3], b[:3]))  # and so do two forked runs
    assert a[3:] == b[3:] and c[3] != d[3]  # the hash seed: shared by forks, drawn anew by interpreters
    # Ranks are new interpreters under a forked launcher too: each draws its own numbers and has a hash seed of its
    # own (tests/fresh_worker.sh), so a set() that orders differently across ranks shows in every 2-process test.
    for launched in _both(tmp_path, [], DRAWS, accelerate=True, num_processes=2):
        first, second = _draws(launched)
        assert all(x != y for x, y in zip(first[:4], second[:4])), (first, second)
        # ... and order the suite's validation prompts differently in a set(), so code that lets a set decide
        # which rank takes which prompt fails the 2-process tests (tests/fresh_worker.sh chose the seeds for it).
        assert first[4] != second[4]


THREAD = '''
import sys, threading, time
def late():
    time.sleep(0.3)
    print("thread done", flush=True)
threading.Thread(target=late).start()
print("main done", flush=True)
'''


def test_a_forked_run_waits_for_its_threads_as_the_interpreter_does(tmp_path):
    forked, fresh = _both(tmp_path, [], THREAD)
    assert forked.stdout == fresh.stdout == "main done\nthread done\n"


def test_an_accelerate_launch_forked_matches_a_new_interpreter(tmp_path):
    """The launcher is forked from the zygote too (its workers are new interpreters, as torchrun starts them):
    one and two processes give what a launcher in a new interpreter gives, a worker's exit status included."""
    script = tmp_path / "probe_script.py"
    script.write_text(SCRIPT)
    for processes in (1, 2):
        forked, new = (launch(str(script), ["3", "a b"], str(tmp_path), accelerate=True, num_processes=processes,
                              fresh=fresh) for fresh in (False, True))
        assert forked.how.endswith("(zygote)") and "zygote" not in new.how
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
    launch(str(script), [], str(tmp_path), fresh=False)  # the zygote started, if no earlier test did
    before = os.environ.get("LD_LIBRARY_PATH")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/elsewhere.py::another (call)")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/a/library/dir:{before or ''}")
    parent, library_path = launch(str(script), [], str(tmp_path), fresh=False).stdout.split()
    assert int(parent) == conftest._ZYGOTE.proc.pid
    assert library_path == str(conftest._START_ENV.get("LD_LIBRARY_PATH"))  # as pytest started, leaks or not


def test_a_launch_s_own_variables_win_over_the_suite_s():
    """conftest.launch_env: env_extra may set what the suite sets itself (it raised TypeError on PYTHONPATH)."""
    env = conftest.launch_env({"PYTHONPATH": "/elsewhere", "ACCELERATE_USE_CPU": "false", "REVIVAL_FAULT": "x:1"})
    assert (env["PYTHONPATH"], env["ACCELERATE_USE_CPU"], env["REVIVAL_FAULT"]) == ("/elsewhere", "false", "x:1")
    assert conftest.launch_env()["PYTHONPATH"] == str(conftest.ROOT)


def test_the_zygote_starts_in_the_suite_s_environment_whoever_asks_first():
    """The first run to ask for the zygote may carry variables of its own (a fake SLURM GPU job): the zygote
    still starts in the suite's launch environment, so that run is not forked and every later run still is.
    (Before: the zygote took the first asker's environment and no later run of that worker forked.)"""
    zygote = conftest.Zygote()
    try:
        slurm = conftest.launch_env({"SLURM_GPUS_ON_NODE": "1"})
        assert not zygote.usable(slurm)  # started, but this run differs from it
        assert zygote.env == conftest.launch_env() and zygote.differs(slurm) == ["SLURM_GPUS_ON_NODE"]
        assert zygote.usable(conftest.launch_env())
    finally:
        zygote.stop()
