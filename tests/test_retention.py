"""--retention_prompts: concepts that must survive, generated and CLIP-scored at every validation."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import launch, seed_flags


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]


# Retention prompt 1 is validation prompt 1 ("a blue square"): only the noise stream tells their images apart.
RETENTION = ["a green triangle", "a blue square", "a photo of a blue square"]


@pytest.fixture(scope="module")
def retention_file(assets):
    path = assets["root"] / "retention.txt"
    path.write_text("\n".join(RETENTION) + "\n")
    return str(path)


def test_retention_is_scored_per_prompt_at_every_validation_whatever_the_batch(assets, retention_file, tmp_path):
    runs = {}
    for batch in (0, 1):  # all of a process's prompts in one batch, and one prompt at a time
        out = str(tmp_path / f"b{batch}")
        flags = seed_flags(assets, out, **{"--num_train_epochs": 1, "--end_CL": 1, "--save_model": "False",
                                          "--retention_prompts": retention_file, "--save_validation_images": None,
                                          "--validation_batch_size": batch})
        _ok(launch("finetuning_sequential.py", flags, cwd=assets["root"]))
        runs[batch] = out
    recs = _records(runs[0])
    # Two validations (before training, after chunk 0), one CLIP record each; 3 retention scores per validation.
    assert [(r["chunk"], r["images_seen"]) for r in recs] == [(None, 0), (0, 50)]
    for r in recs:
        assert len(r["retention_scores"]) == len(RETENTION)
        assert r["retention_mean"] == pytest.approx(np.mean(r["retention_scores"]))
        assert all(-1 <= s <= 1 for s in r["retention_scores"])
    assert recs[0]["retention_scores"] != recs[1]["retention_scores"]  # the training changed the images
    # Batch size changes nothing: the same images (up to uint8 rounding of float noise between batch shapes),
    # so the same scores.
    for mine, other in zip(recs, _records(runs[1])):
        assert other["retention_scores"] == pytest.approx(mine["retention_scores"], abs=1e-4)
    for tag in ("before-training", "chunk0"):
        for k in range(len(RETENTION)):
            a, b = (np.asarray(Image.open(os.path.join(runs[b], "validation_images", "retention", tag,
                                                       f"{k:04d}.png"))).astype(int) for b in (0, 1))
            assert np.abs(a - b).max() <= 1
    # The scores are the CLIP cosine of each saved image with its own prompt.
    from common.clip_score import ClipScorer

    scorer = ClipScorer(str(assets["clip"]))
    images = [Image.open(os.path.join(runs[0], "validation_images", "retention", "chunk0", f"{k:04d}.png"))
              for k in range(len(RETENTION))]
    assert scorer.score(images, RETENTION) == pytest.approx(recs[1]["retention_scores"], abs=2e-3)
    # Their noise is their own: retention prompt k does not reuse validation prompt k's seed.
    target = np.asarray(Image.open(os.path.join(runs[0], "validation_images", "chunk0", "0001.png"))).astype(int)
    assert np.abs(target - np.asarray(images[1]).astype(int)).mean() > 5
    summary = json.load(open(os.path.join(runs[0], "summary.json")))
    assert summary["chunks"][0]["retention"] == pytest.approx(recs[1]["retention_mean"])
    assert "retention (CLIP, 3 prompts) mean" in open(os.path.join(runs[0], "train.log")).read()


def test_the_classifier_script_loads_clip_for_retention_only(assets, retention_file, tmp_path):
    out = str(tmp_path / "clf")
    flags = [f for f in seed_flags(assets, out, **{"--clip_epoch": 0, "--end_CL": 1, "--save_model": "False",
                                                   "--retention_prompts": retention_file,
                                                   "--model_path": assets["classifier"], "--bc_threshold": 1.0})
             if not f.startswith("--clip_threshold")]
    _ok(launch("finetuning_individual_Classifier.py", flags, cwd=assets["root"]))
    recs = _records(out)
    assert [r["criterion"] for r in recs] == ["classifier", "classifier"]  # epochs 0 and 1 (cap 0)
    assert all(len(r["retention_scores"]) == 3 for r in recs)
