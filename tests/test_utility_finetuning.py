"""--utility_fid in the fine-tuning scripts: FID and KID of the --utility_prompts images at a chunk's last validation."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from common import utility
from conftest import RESOLUTION, seed_flags

CAPTIONS = ["a cat on a sofa", "a bowl of fruit", "a red bus in the rain"]
REFERENCE_IMAGES = 40  # the tiny CLIP's embedding is 32-d: a full-rank reference needs at least 32 images
KID_SUBSETS = 10


def _reference(folder, count):
    """``count`` random real images, larger than the generation size (the reference path crops and resizes them)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"r{k:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility_ft")
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return {"root": root, "captions": str(captions), "reference": _reference(root / "reference", REFERENCE_IMAGES)}


def _flags(assets, inputs, out, **over):
    return seed_flags(assets, out, **{
        "--utility_prompts": inputs["captions"], "--utility_fid": None, "--utility_reference": inputs["reference"],
        "--fid_features": "clip", "--clip_model": str(assets["clip"]), "--kid_subsets": KID_SUBSETS, **over})


@pytest.fixture(scope="module")
def individual_run(assets, inputs):
    """The CLIP individual script, one chunk, never revived: validations after epochs 0 and 1 (the chunk's last)."""
    import finetuning_individual_CLIP as script

    out = str(inputs["root"] / "individual")
    flags = _flags(assets, inputs, out, **{
        "--curriculum": "10,20", "--end_CL": 1, "--clip_epoch": 0, "--validation_epochs": 1,
        "--clip_threshold": 0.99, "--save_model": "False", "--use_ema": False, "--gradient_checkpointing": False,
        "--save_validation_images": None, "--checkpointing_steps": 0})
    script.main(script.parse_args(flags))  # in-process, as the other tiny runs
    records = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    return out, records


def _refusal(script, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        script.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    return err


def test_bad_flags_are_one_line_and_exit_2(assets, inputs, tmp_path, capsys):
    import finetuning_sequential as script

    out = str(tmp_path / "out")
    base = _flags(assets, inputs, out)
    without = lambda *names: [f for f in base if f.split("=")[0] not in names]  # noqa: E731
    assert "needs --utility_reference" in _refusal(script, without("--utility_reference"), capsys)
    assert "needs --utility_prompts" in _refusal(script, without("--utility_prompts"), capsys)
    assert "--utility_reference: needs --utility_fid" in _refusal(script, without("--utility_fid"), capsys)
    one = tmp_path / "one.txt"
    one.write_text("a cat\n")
    assert "--utility_prompts: 1 caption(s)" in _refusal(script, base + [f"--utility_prompts={one}"], capsys)
    few = _reference(tmp_path / "few", 5)  # fewer images than the 32 feature dimensions: eval_model.py's rule
    assert "5 images, fewer than the 32" in _refusal(script, base + [f"--utility_reference={few}"], capsys)
    assert "--kid_subsets 0" in _refusal(script, base + ["--kid_subsets=0"], capsys)
    args = script.parse_args(base)  # accepted, with the small-sample warnings
    assert args.utility_fid and args.fid_features == "clip"
    said = capsys.readouterr().out
    assert "--utility_prompts: 3 captions; FID is biased" in said and f"{REFERENCE_IMAGES} reference images" in said
    assert not os.path.exists(out)


def _saved(out, kind, tag, count):
    return [Image.open(os.path.join(out, "validation_images", kind, tag, f"{k:04d}.png")).convert("RGB")
            for k in range(count)]


def test_the_chunk_s_last_validation_records_fid_and_kid_of_its_own_utility_images(assets, inputs, individual_run):
    from common.clip_score import ClipScorer

    out, records = individual_run
    assert [(r["chunk"], r["epoch"]) for r in records] == [(0, 0), (0, 1)]
    first, last = records
    assert "utility_fid" not in first and "utility_kid_mean" not in first and "utility_mean" in first
    # Recomputed here from the saved images and the reference folder, through the library's own functions.
    extractor = utility.ClipFeatures(ClipScorer(str(assets["clip"])))
    real = extractor([utility.as_reference_image(Image.open(p), RESOLUTION)
                      for p in utility.reference_images(inputs["reference"])])
    fake = extractor(_saved(out, "utility", "chunk0-epoch1", len(CAPTIONS)))
    assert last["utility_fid"] == pytest.approx(utility.fid(real, fake), rel=1e-6, abs=1e-9)
    kid = utility.kid(real, fake, seed=0, subsets=KID_SUBSETS)  # --seed's default, 0
    assert (last["utility_kid_mean"], last["utility_kid_std"]) == pytest.approx((kid["kid_mean"], kid["kid_std"]),
                                                                               rel=1e-6, abs=1e-9)
    assert last["utility_fid_features"] == "clip" and last["utility_fid_images"] == len(CAPTIONS)
    assert last["utility_fid_reference_images"] == REFERENCE_IMAGES and last["utility_kid_subset_size"] == 3
    assert last["utility_fid_weights_sha256"] == extractor.fingerprint
    # The reference's features were cached where eval_model.py caches them, and recorded.
    cache = os.path.join(out, utility.REFERENCE_CACHE)
    assert last["utility_fid_reference"] == os.path.join(cache, os.listdir(cache)[0])
    # Not the first validation's utility images (the training moved them) nor this validation's target prompts.
    before = extractor(_saved(out, "utility", "chunk0-epoch0", len(CAPTIONS)))
    assert abs(utility.fid(real, before) - last["utility_fid"]) > 1e-6
    log = open(os.path.join(out, "train.log")).read()
    assert f"utility FID {last['utility_fid']:.3f}" in log


def test_which_validation_is_a_chunk_s_last():
    from common.protocol import last_validation_of_chunk as last

    # Default: the chunk stops after epoch max_epoch + 1, validated or not; every 2nd epoch validated.
    assert [e for e in range(0, 12, 2) if last(e, 2, 89 - 80, False)] == [10]  # 10 <= 10 = max+1 < 12
    assert [e for e in range(0, 10, 2) if last(e, 2, 8, False)] == [8]  # epoch 9 ends the chunk, unvalidated
    assert [e for e in range(0, 3) if last(e, 1, 1, False)] == [2]
    # --compat reference: the first validated epoch past max_epoch ends it.
    assert [e for e in range(0, 12, 2) if last(e, 2, 8, True)] == [10]  # the first validated epoch > 8
