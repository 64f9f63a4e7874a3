"""A short tiny-model run whose losses and validation scores are pinned to recorded values.

Every other test compares runs with each other; this one compares a run with
numbers written down once, so a silent change that moves every run the same way
shows here: the noise draws, the timestep sampling, the loss, guidance at
validation, which weights validation scores (trained, not EMA), the CLIP score.

To re-pin after an intended change (and only then):

    REPIN=1 .venv/bin/python -m pytest tests/test_pinned_trajectory.py

rewrites tests/pinned/trajectory.json and skips; review its diff, say in the
commit why the numbers moved, and commit it.
"""

import json
import os

import pytest

from conftest import ROOT, launch, seed_flags

PINNED = ROOT / "tests" / "pinned" / "trajectory.json"
RTOL = 1e-4  # CPU float32 with pinned library versions: runs repeat to ~1e-7; a real change moves far more
ATOL = 1e-6  # for scores near zero


def _flags(assets, out):
    # One 20-row chunk, 2 micro-batches of 5 per update: 2 updates per epoch, epochs 0 and 1, each validated (the
    # accumulation makes each micro-batch's share of the update's draws matter); lr 1e-3 so that the trained and
    # EMA weights differ enough to tell apart; guidance 7.5 (default) with 3 sampling steps.
    return seed_flags(assets, out, **{
        "--train_batch_size": 5, "--gradient_accumulation_steps": 2,
        "--curriculum": "20,40", "--end_CL": 1, "--clip_threshold": 1.0, "--clip_epoch": 0,
        "--validation_epochs": 1, "--learning_rate": "1e-3", "--lr_scheduler": "cosine", "--lr_warmup_steps": 1,
        "--num_inference_steps": 3, "--seed": 11, "--save_model": "False", "--log_file": False})


def test_short_run_matches_its_pinned_numbers(assets, tmp_path):
    out = str(tmp_path / "run")
    proc = launch("finetuning_individual_CLIP.py", _flags(assets, out), cwd=assets["root"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = [{"epoch": r["epoch"], "optimizer_steps": r["optimizer_steps"], "loss": r["loss"], "scores": r["scores"]}
           for r in map(json.loads, open(os.path.join(out, "validations.jsonl")))]
    if os.environ.get("REPIN"):
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps({"records": got}, indent=1) + "\n")
        pytest.skip(f"re-pinned {PINNED}: review the diff and commit it")
    want = json.loads(PINNED.read_text())["records"]
    assert [(r["epoch"], r["optimizer_steps"]) for r in got] == [(r["epoch"], r["optimizer_steps"]) for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL, abs=ATOL), f"epoch {g['epoch']} loss"
        assert g["scores"] == pytest.approx(w["scores"], rel=RTOL, abs=ATOL), f"epoch {g['epoch']} scores"
