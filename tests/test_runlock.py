"""One run per output directory: a second run on a live run's directory is refused; a dead run leaves no lock."""

import os
import signal
import subprocess
import sys

import pytest

from common import runlock
from conftest import ROOT, launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"


def test_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    d = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import runlock; "
                               "assert runlock.acquire(sys.argv[1]) is None; print('held', flush=True); time.sleep(600)",
                               d], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = runlock.acquire(d)
        assert who is not None and f"pid {holder.pid}" in who and "host " in who and "started " in who
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel releases the lock
        holder.wait()
    assert runlock.acquire(d) is None  # not stale
    while runlock._held:
        runlock._held.pop().close()


def test_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said = []
    assert runlock.acquire(str(tmp_path / "nfs"), log=said.append) is None
    assert len(said) == 1 and "does not support file locks (No locks available)" in said[0]
    assert not runlock._held


def _flags(assets, out, **over):
    return seed_flags(assets, out, **{"--curriculum": "20", "--clip_threshold": 1.0, "--no_early_stop": None,
                                      "--clip_epoch": 1000, "--validation_epochs": 1, "--save_model": "False",
                                      "--log_file": False, **over})


@pytest.mark.two_processes
def test_second_run_on_a_live_runs_directory_is_refused_on_every_process(assets, tmp_path):
    # The live run is a process holding the directory's lock as a run does (runlock.acquire, as
    # lock_run_dir's main process calls it): what the refused runs see is the same, at none of a real run's cost.
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import runlock; "
                               "assert runlock.acquire(sys.argv[1]) is None; print('held', flush=True); time.sleep(600)",
                               out], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(os.listdir(out))
        # The same command again (a requeue whose old job still runs): refused at once, one line, exit 2.
        second = launch(SCRIPT, _flags(assets, out, **{"--resume_from_checkpoint": "latest"}), cwd=assets["root"],
                        timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = second.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"error: --output_dir {out}: another run is using it (host ")
        assert f"pid {holder.pid}" in line
        # Two processes: both stop together (no hang), neither trains.
        two = launch(SCRIPT, _flags(assets, out, **{"--resume_from_checkpoint": "latest", "--train_batch_size": 5}),
                     cwd=assets["root"], num_processes=2, timeout=300)
        assert two.returncode != 0 and "another run is using it" in two.stderr
        assert holder.poll() is None  # the live run was left alone
        # Neither wrote a thing into the live run's directory (no records, checkpoints, logs).
        assert sorted(os.listdir(out)) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # (That the killed run left no lock behind is test_lock_is_exclusive_names_its_holder_and_dies_with_it.)
