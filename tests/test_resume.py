"""Kill-and-resume and preemption: a resumed run ends as an uninterrupted one (docs/protocols.md: robustness)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"
pytestmark = pytest.mark.slow


# A cosine schedule with warm-up: a resume that did not restore the schedule's position would train differently.
SCHEDULE = {"--lr_scheduler": "cosine", "--lr_warmup_steps": 3, "--learning_rate": "1e-4"}


def _flags(assets, out, **over):
    # Two 50-row chunks at batch 10, epochs 0..2 each: updates 1-15 are chunk 0, 16-30 chunk 1.
    base = {"--clip_threshold": 1.0, "--clip_epoch": 1, "--validation_epochs": 1, "--checkpointing_steps": 4,
            "--checkpoints_total_limit": 2, "--log_file": False, **SCHEDULE}
    return seed_flags(assets, out, **{**base, **over})


def _results(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return recs, summary


def _weights(path, sub="unet"):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, sub, "diffusion_pytorch_model.safetensors"))


def _assert_same_run(out, ref, weights=(("curriculum-0", "unet"), ("curriculum-1", "unet"))):
    recs, summary = _results(out)
    ref_recs, ref_summary = _results(ref)
    key = lambda r: (r["chunk"], r["epoch"], r["optimizer_steps"], r["images_seen"], r["revived"])  # noqa: E731
    assert [key(r) for r in recs] == [key(r) for r in ref_recs]  # nothing lost, nothing duplicated
    for r, q in zip(recs, ref_recs):
        assert r["scores"] == q["scores"]  # same process type, same draws: bit for bit
        if q.get("loss") is not None:  # records after training carry the epoch's loss
            # A resumed epoch adds the loss sum saved in the checkpoint to the rest: float rounding only.
            assert r["loss"] == pytest.approx(q["loss"], rel=1e-6)
        else:
            assert r.get("loss") is None
    if "revival_point" in ref_summary:
        assert summary["revival_point"] == ref_summary["revival_point"]
    keys = ("revived", "optimizer_steps") if "revival_point" not in ref_summary else ("images_seen", "optimizer_steps")
    assert [[c[k] for k in keys] for c in summary["chunks"]] == [[c[k] for k in keys] for c in ref_summary["chunks"]]
    for pipe, sub in weights:
        a, b = _weights(os.path.join(out, pipe), sub), _weights(os.path.join(ref, pipe), sub)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=f"{pipe}/{sub}/{k}")


def _uninterrupted(script, flags, assets, tmp_path_factory, name):
    """Output directory of a run never interrupted: the reference a resumed run must equal."""
    out = str(tmp_path_factory.mktemp(name) / "run")
    proc = launch(script, flags(assets, out), cwd=assets["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    return _uninterrupted(SCRIPT, _flags, assets, tmp_path_factory, "ref")


# update:18 dies inside chunk 1 (resumed from checkpoint-16, chunk 1's second update); the others inside chunk 0.
@pytest.mark.parametrize("fault", ["update:18", "validation:2", "checkpoint:2"])
def test_killed_run_resumes_to_the_same_results(assets, reference_run, tmp_path, fault):
    out = str(tmp_path / "run")
    crashed = launch(SCRIPT, _flags(assets, out), cwd=assets["root"], env_extra={"REVIVAL_FAULT": fault})
    assert crashed.returncode != 0  # SIGKILLed
    if fault == "checkpoint:2":
        # The second save was cut short: its temporary folder has no marker and is never resumed from.
        assert not os.path.isdir(os.path.join(out, "checkpoint-8"))
    resumed = launch(SCRIPT, _flags(assets, out, **{"--resume_from_checkpoint": "latest"}), cwd=assets["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_run(out, reference_run, [(f"curriculum-{i}", sub) for i in (0, 1) for sub in ("unet", "unet_ema")])
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert len(ckpts) <= 2  # --checkpoints_total_limit
    # Each checkpoint says how it was made: the run's resolved configuration, as in config.json.
    made = json.load(open(os.path.join(out, ckpts[-1], "run_config.json")))
    assert made["resolved"] == json.load(open(os.path.join(out, "config.json")))["resolved"]
    assert made["args"]["learning_rate"] == made["resolved"]["learning_rate"]  # no --scale_lr here


def test_sigterm_saves_a_checkpoint_and_exits_75(assets, reference_run, tmp_path):
    # Plain python (SIGTERM must reach the run itself, not a launcher), like the uninterrupted reference run:
    # launchers set their own environment, and results are compared bit for bit. (A new interpreter, as from a
    # shell; the resumed run and the reference are forked from the suite's zygote, which gives the same bits.)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT))
    flags = lambda out, **over: [str(ROOT / SCRIPT), *_flags(assets, out, **{"--checkpointing_steps": 0, **over})]  # noqa: E731
    out = str(tmp_path / "run")
    # No checkpoints by schedule: the only one is the preemption checkpoint.
    proc = subprocess.Popen([sys.executable, *flags(out)], cwd=assets["root"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isfile(os.path.join(out, "validations.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "preempted (SIGTERM)" in stdout
    assert os.path.isfile(os.path.join(out, "PREEMPTED"))
    ckpts = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert len(ckpts) == 1 and os.path.isfile(os.path.join(out, ckpts[0], "COMPLETE"))
    resumed = launch(SCRIPT, flags(out, **{"--resume_from_checkpoint": "latest"})[1:], cwd=assets["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, reference_run)
    assert not os.path.exists(os.path.join(out, "PREEMPTED"))


SEQ = "finetuning_sequential.py"


def _seq_flags(assets, out, **over):
    # Two 50-row chunks, 2 epochs each at batch 10: updates 1-10 are chunk 0, 11-20 chunk 1.
    base = {"--num_train_epochs": 2, "--model_path": assets["classifier"], "--clip_threshold": 1.0,
            "--bc_threshold": 0, "--curriculum_checkpoints": "0", "--save_model": False, "--checkpointing_steps": 0,
            "--log_file": False, **SCHEDULE}
    return seed_flags(assets, out, **{**base, **over})


@pytest.fixture(scope="module")
def sequential_reference(assets, tmp_path_factory):
    return _uninterrupted(SEQ, _seq_flags, assets, tmp_path_factory, "seqref")


@pytest.mark.parametrize("where, every, fault, resumed_from", [
    # At the chunk boundary: checkpoint-10 ends chunk 0's training; the run dies validating chunk 0 (the second
    # validation: the first scores the unlearned model before training).
    ("chunk boundary", 5, "validation:2", "checkpoint-10"),
    # Mid-chunk: dies at update 15, resumes from checkpoint-12 (chunk 1, epoch 0, after its 2nd update).
    ("mid-chunk", 4, "update:15", "checkpoint-12"),
])
def test_sequential_resumes_to_the_same_results(assets, sequential_reference, tmp_path, where, every, fault,
                                                resumed_from):
    out = str(tmp_path / "run")
    flags = {"--checkpointing_steps": every}
    crashed = launch(SEQ, _seq_flags(assets, out, **flags), cwd=assets["root"], env_extra={"REVIVAL_FAULT": fault})
    assert crashed.returncode != 0
    resumed = launch(SEQ, _seq_flags(assets, out, **flags, **{"--resume_from_checkpoint": "latest"}),
                     cwd=assets["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {os.path.join(out, resumed_from)}" in resumed.stdout
    # Records, Revival Points, the curriculum checkpoint and the final pipeline (EMA as its UNet, trained beside).
    _assert_same_run(out, sequential_reference, [("curriculum-0", "unet"), ("curriculum-0", "unet_ema"),
                                                 (".", "unet"), (".", "unet_trained")])
