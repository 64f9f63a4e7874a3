"""The classifier, sequential and evaluation scripts, launched for real on the tiny models."""

import json
import os

import pytest

from conftest import launch, seed_flags


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]


def _classifier_flags(assets, out, **over):
    flags = seed_flags(assets, out, **{"--clip_threshold": False, "--model_path": assets["classifier"], **over})
    return flags


@pytest.fixture(scope="module")
def classifier_run(assets, tmp_path_factory):
    """--bc_threshold 0: both chunks revive at the first validation; pipelines saved for eval_model."""
    out = str(tmp_path_factory.mktemp("clf") / "run")
    proc = launch("finetuning_individual_Classifier.py",
                  _classifier_flags(assets, out, **{"--bc_threshold": 0}), cwd=assets["root"], accelerate=True)
    _ok(proc)
    return out


def test_classifier_threshold_zero_stops_after_first_validation(classifier_run):
    recs = _records(classifier_run)
    assert [(r["chunk"], r["epoch"], r["optimizer_steps"], r["revived"], r["criterion"]) for r in recs] == [
        (0, 0, 5, True, "classifier"), (1, 0, 5, True, "classifier")]
    assert all(set(r["scores"]) <= {0.0, 1.0} and len(r["scores"]) == 3 for r in recs)
    assert "accuracy" in recs[0]["scale"]


def test_classifier_threshold_one_unmet_runs_to_the_cap(assets, tmp_path):
    out = str(tmp_path / "run")
    # The tiny classifier says no to the tiny model's images: accuracy 0 < 1.0 at every validation.
    flags = _classifier_flags(assets, out, **{"--bc_threshold": 1.0, "--clip_epoch": 0, "--validation_epochs": 1,
                                              "--end_CL": 1, "--save_model": "False"})
    _ok(launch("finetuning_individual_Classifier.py", flags, cwd=assets["root"]))
    assert [(r["chunk"], r["epoch"], r["optimizer_steps"], r["revived"]) for r in _records(out)] == [
        (0, 0, 5, False), (0, 1, 10, False)]


def test_sequential_revival_points_and_checkpoints(assets, tmp_path):
    out = str(tmp_path / "seq")
    flags = seed_flags(assets, out, **{"--num_train_epochs": 1, "--curriculum_checkpoints": "0",
                                      "--model_path": assets["classifier"], "--clip_threshold": 1.0,
                                      "--bc_threshold": 0, "--save_model": False})
    _ok(launch("finetuning_sequential.py", flags, cwd=assets["root"], accelerate=True))
    before, recs = _records(out)[:2], _records(out)[2:]
    # The unlearned model's own score first (0 images), then one record per criterion after each chunk.
    assert [(r["chunk"], r["criterion"], r["optimizer_steps"], r["images_seen"]) for r in before] == [
        (None, "clip", 0, 0), (None, "classifier", 0, 0)]
    assert [(r["chunk"], r["criterion"], r["optimizer_steps"], r["images_seen"]) for r in recs] == [
        (0, "clip", 5, 50), (0, "classifier", 5, 50), (1, "clip", 10, 100), (1, "classifier", 10, 100)]
    # Each record carries its chunk's last-epoch loss, the one the log prints for that epoch.
    log = open(os.path.join(out, "train.log")).read()
    for r in recs:
        assert f"chunk {r['chunk']} epoch 0: 5 updates, loss {r['loss']:.5f}" in log
    summary = json.load(open(os.path.join(out, "summary.json")))
    # Revival Points agree with the per-chunk decisions: the first chunk whose score met the criterion.
    for name in ("clip", "classifier"):
        met = [r for r in recs if r["criterion"] == name and r["revived"]]
        want = {"chunk": met[0]["chunk"], "images_seen": met[0]["images_seen"]} if met else None
        assert summary["revival_point"][name] == want
    assert summary["revival_point"] == {"clip": None, "classifier": {"chunk": 0, "images_seen": 50}}
    # Exactly the requested curriculum checkpoint, and the final pipeline (EMA weights) in the output dir.
    assert sorted(d for d in os.listdir(out) if d.startswith("curriculum-")) == ["curriculum-0"]
    assert os.path.isdir(os.path.join(out, "unet_trained"))
    from diffusers import StableDiffusionPipeline

    for path in (out, os.path.join(out, "curriculum-0")):
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        assert pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    # eval_model.py's --weights: the final folder holds EMA in unet/ and the trained UNet in unet_trained/,
    # a curriculum folder the trained UNet in unet/ and EMA in unet_ema/; each choice loads the right one.
    import torch
    from diffusers import UNet2DConditionModel

    from common.evaluation import load_pipeline

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    for path, trained, ema in ((out, "unet_trained", "unet"), (os.path.join(out, "curriculum-0"), "unet", "unet_ema")):
        want = {w: UNet2DConditionModel.from_pretrained(path, subfolder=sub) for w, sub in (("trained", trained),
                                                                                            ("ema", ema))}
        assert not same(want["trained"], want["ema"])  # EMA (decay 0.9999) lags the trained weights
        for weights in ("trained", "ema"):
            assert same(load_pipeline(path, torch.device("cpu"), torch.float32, weights).unet, want[weights])


def test_sequential_without_classifier_runs_clip_only(assets, tmp_path):
    out = str(tmp_path / "seq")
    flags = seed_flags(assets, out, **{"--num_train_epochs": 1, "--end_CL": 1, "--clip_threshold": -1,
                                      "--save_model": "False", "--curriculum_checkpoints": "0",
                                      "--tag": "method=tiny esd"})
    proc = launch("finetuning_sequential.py", flags, cwd=assets["root"])
    _ok(proc)
    assert "CLIP criterion only" in proc.stdout
    # --save_model False: no pipeline at all, not even the requested curriculum checkpoint or the final model.
    assert not any(d.startswith("curriculum-") for d in os.listdir(out))
    assert not os.path.exists(os.path.join(out, "model_index.json"))
    assert "no pipeline saved" in proc.stdout
    assert json.load(open(os.path.join(out, "config.json")))["tags"] == {"method": "tiny esd"}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["revival_point"] == {"clip": {"chunk": 0, "images_seen": 50}}


def _eval(assets, run_dir, out):
    proc = launch("eval_model.py", [run_dir, assets["classifier"], "red circle", f"--prompt_file={assets['prompts']}",
                                    "--theme=", "--curr", "--gpu", "0", "--images_per_prompt", "2", "--output_dir", out,
                                    "--num_inference_steps", "2", "--resolution", "32"], assets["root"], timeout=600)
    _ok(proc)
    return proc, [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]


def test_eval_model_on_curriculum_folders_is_repeatable(assets, classifier_run, tmp_path):
    out = str(tmp_path / "eval")
    proc, first = _eval(assets, classifier_run, out)
    assert [r["label"] for r in first] == ["run/curriculum-0", "run/curriculum-1"]
    assert [(r["weights"], r["dtype"]) for r in first] == [("trained", "float32")] * 2  # unet_ema/ saved beside
    assert proc.stdout.splitlines()[0].split()[:2] == ["checkpoint", "weights"]
    for r in first:
        pngs = sorted(n for n in os.listdir(r["image_dir"]) if n.endswith(".png"))
        assert len(pngs) == 3 * 2 and r["images"] == 6
        meta = [json.loads(line) for line in open(os.path.join(r["image_dir"], "metadata.jsonl"))]
        assert [m["file_name"] for m in meta] == pngs and meta[2]["prompt"] == "a blue square"
        assert r["clip_logit_scale"] == pytest.approx(100 * r["clip_cosine"])
        assert 0 <= r["classifier_accuracy"] <= 1
    assert "CLIP cosine (0..1)" in proc.stdout and "run/curriculum-1" in proc.stdout
    csv_lines = open(os.path.join(out, "results.csv")).read().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("label,weights,concept")
    # A stale image left in a checkpoint's folder is neither kept nor counted by a rerun.
    open(os.path.join(first[0]["image_dir"], "stale.png"), "wb").write(b"junk")
    _, second = _eval(assets, classifier_run, out)
    for a, b in zip(first, second):
        assert (a["clip_cosine"], a["classifier_accuracy"], a["images"]) == pytest.approx(
            (b["clip_cosine"], b["classifier_accuracy"], b["images"]))
    assert "stale.png" not in os.listdir(second[0]["image_dir"])
