"""Several processes fail together: a write that fails on the main process (a full disk) stops every process with
the same exit status and the same one line, instead of leaving the others to die in the next collective
(docs/protocols.md: robustness)."""

import os
import re
from types import SimpleNamespace

import pytest

from common import faults
from common.checkpointing import DIVERGED_MARKER, Checkpointer
from common.results import RunRecorder, WriteFailed
from conftest import ROOT, launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"


def _flags(assets, out):
    # Two 20-row chunks at 2 x 5 rows: 2 updates per epoch, epochs 0 and 1; checkpoints every 2 updates.
    return seed_flags(assets, out, **{"--curriculum": "20,40", "--clip_threshold": 1.0, "--clip_epoch": 0,
                                      "--validation_epochs": 1, "--checkpointing_steps": 2, "--log_file": False,
                                      "--train_batch_size": 5})


@pytest.mark.slow
@pytest.mark.two_processes
@pytest.mark.parametrize("what, fault, where", [
    ("checkpoint", "enospc_checkpoint:1", "checkpoint-2"),  # half-way through the first checkpoint
    ("results", "enospc_results:2", "validations.jsonl"),  # the first validation record (config.json is the 1st)
    ("pipeline", "enospc_pipeline:1", "curriculum-0"),  # the first chunk's pipeline
])
def test_a_failed_write_on_the_main_process_stops_both_processes_with_status_4(assets, tmp_path, what, fault, where):
    out = str(tmp_path / "run")
    proc = launch(SCRIPT, _flags(assets, out), cwd=assets["root"], num_processes=2,
                  env_extra={"REVIVAL_FAULT": fault}, timeout=600)
    assert proc.returncode != 0
    # Each process reports the failure itself: the same line from both, then exit status 4. The launcher lists the
    # ranks by how they ended: ours with 4 (not 1 from a traceback); a rank still tearing down when the first one
    # ended may be listed with the launcher's own SIGTERM (-15).
    lines = [ln[ln.index("error: "):] for ln in proc.stderr.splitlines() if "error: could not write" in ln]
    expected = f"error: could not write the {what} to {os.path.join(out, where)}: No space left on device"
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(expected), proc.stderr[-3000:]
    codes = re.findall(r"rank\s*:\s*\d+ \(local_rank: \d+\)\s+exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "4" in codes and set(codes) <= {"4", "-15"}, proc.stderr[-3000:]
    # Neither rank died in a collective: no traceback through our code, no lost peer.
    assert "Connection closed by peer" not in proc.stderr
    assert str(ROOT / "common") not in proc.stderr and str(ROOT / SCRIPT) + '", line' not in proc.stderr
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != ".run.lock"]  # no partial files


def _single_process():
    return SimpleNamespace(num_processes=1, is_main_process=True)


def test_the_divergence_marker_is_under_the_full_disk_guard(tmp_path, monkeypatch):
    from common.training import NonFiniteLoss

    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("REVIVAL_FAULT", "enospc_divergence marker:1")
    checkpointer = Checkpointer.__new__(Checkpointer)  # only what divergence_recorded uses
    checkpointer.accelerator, checkpointer.output_dir = _single_process(), str(tmp_path)
    with pytest.raises(WriteFailed) as err:
        with checkpointer.divergence_recorded():
            raise NonFiniteLoss("non-finite loss at update 3")
    message = str(err.value)  # exit 4 with one line that still says why the run stopped
    assert message.startswith(f"could not write the divergence marker to {tmp_path / DIVERGED_MARKER}: No space")
    assert message.endswith("the run had diverged: non-finite loss at update 3")
    assert not os.path.exists(tmp_path / DIVERGED_MARKER)


def test_the_resume_time_rewrite_of_the_records_is_under_the_full_disk_guard(tmp_path, monkeypatch):
    (tmp_path / "validations.jsonl").write_text('{"chunk": 0}\n{"chunk": 1}\n')
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("REVIVAL_FAULT", "enospc_results:1")
    recorder = RunRecorder(str(tmp_path), is_main=True, accelerator=_single_process())
    try:
        with pytest.raises(WriteFailed, match="could not write the results to .*validations.jsonl: No space"):
            recorder.keep_validations(1)
    finally:
        recorder.close()
    assert (tmp_path / "validations.jsonl").read_text() == '{"chunk": 0}\n{"chunk": 1}\n'  # untouched
