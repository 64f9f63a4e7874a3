"""--params lora: a LoRA adapter (peft) as the revival path, in the same protocols and files."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"
LORA = {"--params": "lora", "--lora_rank": 2, "--learning_rate": "1e-2"}


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_lora_trains_exactly_the_adapter_of_the_targets(assets):
    from diffusers import UNet2DConditionModel

    from common.training import LORA_TARGETS, add_lora, select_trainable

    unet = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet")
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    targets = [n for n, _ in unet.named_modules() if any(n.endswith("." + t) for t in LORA_TARGETS)]
    add_lora(unet, rank=2, alpha=None, targets=LORA_TARGETS, seed=0)
    trainable = select_trainable(unet, "lora")
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names)
    # Two matrices (A: rank x in, B: out x rank) per target module, nothing else.
    want = sorted(f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB")
    assert sorted(names) == want
    for n, p in unet.named_parameters():
        if "lora_A" in n:
            assert p.shape[0] == 2
    # B starts at zero: the adapted UNet computes what the unlearned one did. Base weights are kept as they were.
    assert all(float(p.detach().abs().max()) == 0 for n, p in unet.named_parameters() if "lora_B" in n)
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            base = n.replace(".base_layer", "")
            assert torch.equal(p, before[base]) and not p.requires_grad
    # The draw of A is seeded: the same seed, the same adapter.
    again = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet")
    add_lora(again, rank=2, alpha=None, targets=LORA_TARGETS, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), again.parameters()))


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """An individual CLIP LoRA run: chunk 0, epochs 0 and 1, validated after each, EMA, checkpoints every 4."""
    out = str(tmp_path_factory.mktemp("lora") / "run")
    flags = seed_flags(assets, out, **{**LORA, "--clip_threshold": 1.0, "--clip_epoch": 0, "--validation_epochs": 1,
                                      "--end_CL": 1, "--checkpointing_steps": 4, "--save_validation_images": None,
                                      "--log_file": False})
    _ok(launch(SCRIPT, flags, cwd=assets["root"]))
    return out


def test_lora_checkpoints_and_curriculum_folders_hold_the_adapter_only(assets, lora_run):
    from safetensors.torch import load_file

    ckpt = os.path.join(lora_run, "checkpoint-8")
    files = os.listdir(ckpt)
    assert "adapter.safetensors" in files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))]  # no whole UNet
    adapter = load_file(os.path.join(ckpt, "adapter.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    # The optimizer's state: one entry per adapter tensor, shaped like it; the EMA copy likewise.
    opt = torch.load(os.path.join(ckpt, "optimizer.bin"), weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values())
    assert shapes == sorted(tuple(t.shape) for t in adapter.values())
    extras = torch.load(os.path.join(ckpt, "trainer_extras.pt"), weights_only=True)
    assert sorted(tuple(t.shape) for t in extras["ema"]["shadow_params"]) == shapes
    # curriculum-0: diffusers' LoRA files (trained and EMA) and the base they belong to; no pipeline.
    folder = os.path.join(lora_run, "curriculum-0")
    assert sorted(os.listdir(folder)) == ["lora_base.json", "pytorch_lora_weights.safetensors",
                                          "pytorch_lora_weights_ema.safetensors"]
    base = json.load(open(os.path.join(folder, "lora_base.json")))
    assert base["base_model"] == os.path.abspath(assets["sd"]) and base["rank"] == 2 and base["alpha"] == 2
    saved = load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(adapter) and all(k.startswith("unet.") for k in saved)


def test_a_lora_curriculum_folder_evaluates_to_the_runs_own_images(assets, lora_run, tmp_path):
    """eval_model.py loads base + adapter and, at the same seed, draws the images the run validated last."""
    out = str(tmp_path / "eval")
    _ok(launch("eval_model.py", [os.path.join(lora_run, "curriculum-0"), "none", "red circle",
                                 f"--prompt_file={assets['prompts']}", "--images_per_prompt", "1", "--output_dir", out,
                                 "--num_inference_steps", "2", "--resolution", "32", "--clip_model", assets["clip"]],
               assets["root"], timeout=600))
    (row,) = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert row["weights"] == "trained"
    last = [json.loads(line) for line in open(os.path.join(lora_run, "validations.jsonl"))][-1]
    assert (last["chunk"], last["epoch"]) == (0, 1)
    images = sorted(f for f in os.listdir(row["image_dir"]) if f.endswith(".png"))
    assert len(images) == 3
    for k, name in enumerate(images):
        mine = np.asarray(Image.open(os.path.join(row["image_dir"], name))).astype(int)
        theirs = np.asarray(Image.open(os.path.join(lora_run, "validation_images", "chunk0-epoch1",
                                                    f"{k:04d}.png"))).astype(int)
        assert np.abs(mine - theirs).max() <= 1
    assert row["clip_cosine"] == pytest.approx(last["mean"], abs=1e-3)
    # The adapter trained (B is no longer zero), so these images are the adapted model's.
    from safetensors.torch import load_file

    saved = load_file(os.path.join(lora_run, "curriculum-0", "pytorch_lora_weights.safetensors"))
    assert max(float(t.abs().max()) for k, t in saved.items() if "lora_B" in k or "lora.up" in k) > 0


@pytest.mark.parametrize("over, message", [
    ({"--params": "lora", "--lora_rank": 0}, "--lora_rank 0: must be at least 1"),
    ({"--lora_rank": 4}, "--lora_rank: only with --params lora"),
    ({"--params": "lora", "--lora_alpha": -1}, "--lora_alpha -1.0: must be positive"),
    ({"--params": "lora", "--lora_targets": " , "}, "name at least one module"),
    ({"--params": "lora", "--restore_from_disk": None}, "--restore_from_disk: not with --params lora"),
])
def test_bad_lora_flags_are_one_line_and_exit_2(assets, tmp_path, over, message):
    out = tmp_path / "o"
    proc = launch(SCRIPT, seed_flags(assets, str(out), **over), cwd=assets["root"])
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_killed_lora_run_resumes_to_the_same_results(assets, lora_run, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    flags = lambda **over: seed_flags(assets, out, **{  # noqa: E731
        **LORA, "--clip_threshold": 1.0, "--clip_epoch": 0, "--validation_epochs": 1, "--end_CL": 1,
        "--checkpointing_steps": 4, "--save_validation_images": None, "--log_file": False, **over})
    crashed = launch(SCRIPT, flags(), cwd=assets["root"], env_extra={"REVIVAL_FAULT": "update:7"})
    assert crashed.returncode != 0 and os.path.isdir(os.path.join(out, "checkpoint-4"))
    _ok(launch(SCRIPT, flags(**{"--resume_from_checkpoint": "latest"}), cwd=assets["root"]))
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(lora_run, "validations.jsonl"))]
    assert [(r["epoch"], r["optimizer_steps"], r["scores"]) for r in recs] == [
        (r["epoch"], r["optimizer_steps"], r["scores"]) for r in ref]  # bit for bit
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = (load_file(os.path.join(d, "curriculum-0", name)) for d in (out, lora_run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.two_processes
def test_lora_sequential_two_processes_match_one(assets, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for procs, batch in ((1, 10), (2, 5)):
        out = str(tmp_path / f"p{procs}")
        flags = seed_flags(assets, out, **{**LORA, "--num_train_epochs": 1, "--end_CL": 1, "--clip_threshold": 1.0,
                                          "--curriculum_checkpoints": "0", "--train_batch_size": batch})
        _ok(launch("finetuning_sequential.py", flags, cwd=assets["root"], num_processes=procs))
        outs[procs] = out
    one, two = ([json.loads(line) for line in open(os.path.join(outs[p], "validations.jsonl"))] for p in (1, 2))
    assert [(r["chunk"], r["optimizer_steps"]) for r in one] == [(r["chunk"], r["optimizer_steps"]) for r in two]
    for a, b in zip(one, two):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    # The final model of a LoRA run is its adapter too, in the output directory, beside the curriculum folder.
    for folder in ("", "curriculum-0"):
        w1, w2 = (load_file(os.path.join(outs[p], folder, "pytorch_lora_weights.safetensors")) for p in (1, 2))
        assert w1.keys() == w2.keys()
        # lr 1e-2: a wrong gradient on one process moves weights by ~1e-2; reduction-order noise stays far below.
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 5e-4
