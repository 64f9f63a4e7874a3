"""finetuning_individual_CLIP.py launched for real through `accelerate launch` on the tiny models."""

import json
import os

import numpy as np
import pytest

from conftest import launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"


def _records(out):
    with open(os.path.join(out, "validations.jsonl")) as f:
        return [json.loads(line) for line in f]


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_threshold_minus_one_revives_every_chunk_at_epoch_0(assets, tmp_path):
    out = str(tmp_path / "run")
    proc = launch(SCRIPT, seed_flags(assets, out, **{"--clip_threshold": -1}), cwd=assets["root"], accelerate=True)
    _ok(proc)
    # The seed README's fp16 on a CPU: one warning, then full precision.
    assert proc.stderr.count("--mixed_precision fp16 needs CUDA") == 1
    recs = _records(out)
    assert [(r["chunk"], r["epoch"], r["optimizer_steps"], r["images_seen"], r["revived"]) for r in recs] == [
        (0, 0, 5, 50, True), (1, 0, 5, 50, True)]
    for r in recs:
        assert len(r["scores"]) == 3 and r["threshold"] == -1
        assert r["mean"] == pytest.approx(np.mean(r["scores"])) and r["min"] == min(r["scores"])
    summary = _summary(out)
    assert [(c["chunk"], c["rows"], c["revived"], c["revival_epoch"]) for c in summary["chunks"]] == [
        (0, [0, 50], True, 0), (1, [50, 100], True, 0)]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["library_versions"]["diffusers"] and config["mixed_precision"] == "no"
    assert config["args"]["save_model"] is True
    assert "chunk 1 epoch 0" in open(os.path.join(out, "train.log")).read()
    assert config["resolved"] == {"learning_rate": 1e-05, "num_processes": 1, "mixed_precision": "no",
                                  "global_batch": 10}
    # The default tracker, tensorboard, in OUTPUT_DIR/logs: per-update loss and learning rate, the validation
    # means against their thresholds, and one image grid per validation.
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(out, "logs", "finetuning_individual_CLIP", "events.out.tfevents.*"))
    ea = EventAccumulator(os.path.dirname(events), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/loss", "train/learning_rate", "validation/clip_mean", "validation/clip_threshold"} <= set(
        tags["scalars"])
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 11))  # 5 updates per chunk, 2 chunks
    assert all(e.value == pytest.approx(1e-5) for e in ea.Scalars("train/learning_rate"))
    assert [round(e.value, 5) for e in ea.Scalars("validation/clip_mean")] == [round(r["mean"], 5) for r in recs]
    (grid,) = [t for t in tags["images"] if t.startswith("validation/images")]
    assert len(ea.Images(grid)) == 2 and ea.Images(grid)[0].width == 3 * 32  # 3 prompts side by side
    # Each chunk's pipeline loads and generates; EMA weights sit beside it.
    from diffusers import StableDiffusionPipeline

    for i in (0, 1):
        path = os.path.join(out, f"curriculum-{i}")
        assert os.path.isfile(os.path.join(path, "unet_ema", "config.json"))
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        img = pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0]
        assert img.size == (32, 32)
    # Chunks restart from the unlearned weights, so the two pipelines differ from each other and from the base.
    from safetensors.torch import load_file

    w = [load_file(os.path.join(out, f"curriculum-{i}", "unet", "diffusion_pytorch_model.safetensors"))
         for i in (0, 1)]
    base = load_file(os.path.join(assets["sd"], "unet", "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    assert not np.allclose(w[0][key], base[key]) and not np.allclose(w[0][key], w[1][key])


def test_no_early_stop_trains_to_the_epoch_cap_and_names_the_first_revival(assets, tmp_path):
    out = str(tmp_path / "run")
    flags = seed_flags(assets, out, **{"--clip_threshold": -1, "--no_early_stop": None, "--clip_epoch": 1,
                                      "--validation_epochs": 1, "--start_CL": 1, "--end_CL": 2, "--save_model": "False"})
    _ok(launch(SCRIPT, flags, cwd=assets["root"]))
    recs = _records(out)
    # Met at every validation, yet trained on: epochs 0, 1, 2 (stop after the first epoch e > clip_epoch).
    assert [(r["chunk"], r["epoch"], r["optimizer_steps"], r["revived"]) for r in recs] == [
        (1, 0, 5, True), (1, 1, 10, True), (1, 2, 15, True)]
    (chunk,) = _summary(out)["chunks"]
    assert (chunk["revived"], chunk["revival_epoch"], chunk["epochs_trained"], chunk["optimizer_steps"]) == (
        True, 0, 3, 15)
    assert not any(name.startswith("curriculum-") for name in os.listdir(out))  # --save_model False
