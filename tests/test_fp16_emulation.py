"""fp16 as on a GPU, on the CPU (REVIVAL_EMULATE_FP16=1, common/precision.py): the scripts' and tools' fp16 code
paths, the gradient scaler per chunk, skipped updates, and pipelines saved in fp16 (docs/testing.md; docs/gpu.md)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, seed_flags

EMULATE = {"REVIVAL_EMULATE_FP16": "1"}


def _reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """In-process Accelerators of another precision need accelerate's singleton state cleared, before and after."""
    _reset_accelerate_state()
    yield
    _reset_accelerate_state()


def _trainer(assets, monkeypatch, emulate: bool, unet_dtype=torch.float32, init_scale=None, **cfg):
    from common.data import ImageTransform, load_training_data
    from common.encoding import CachedEncoder
    from common.models import cast_frozen, load_sd_parts
    from common.precision import effective_mixed_precision, make_accelerator, weight_dtype_for
    from common.training import ChunkTrainer, TrainConfig

    if emulate:
        monkeypatch.setenv("REVIVAL_EMULATE_FP16", "1")
    if init_scale is not None:
        monkeypatch.setenv("REVIVAL_FP16_INIT_SCALE", str(init_scale))
    acc = make_accelerator(effective_mixed_precision("fp16", warn=False), cpu=True)
    parts = load_sd_parts(assets["sd"])
    parts.unet.to(unet_dtype)
    dtype = weight_dtype_for(acc.mixed_precision)
    cast_frozen(parts, acc.device, dtype)
    enc = CachedEncoder(parts, ImageTransform(32, center_crop=True, random_flip=True), "cpu", dtype)
    trainer = ChunkTrainer(acc, parts, enc, TrainConfig(**{"learning_rate": 1e-4, "train_batch_size": 10, **cfg}),
                           horizon_updates=20)
    return trainer, load_training_data(assets["data"], None, "prompt")


def _flat(params):
    return torch.cat([p.detach().flatten().float() for p in params])


# --- the mode is real ---------------------------------------------------------------------------------------------

def test_emulation_gives_autocast_and_a_scaler(assets, monkeypatch, fresh_accelerate_state):
    trainer, ds = _trainer(assets, monkeypatch, emulate=True)
    acc = trainer.accelerator
    assert acc.mixed_precision == "fp16" and acc.native_amp and acc.scaler is not None
    with acc.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in trainer.trainable)  # fp32 masters
    assert trainer.parts.text_encoder.dtype == torch.float16 and trainer.parts.vae.dtype == torch.float16
    # CUDA's autocast policy: norms, softmax, exp and sums run in float32 (CPU autocast would keep float16 here)
    import torch.nn.functional as F

    with acc.autocast():
        half = torch.randn(2, 8, 4, 4).half()
        assert F.group_norm(half, 2).dtype == half.softmax(-1).dtype == torch.exp(half).dtype == torch.float32
        assert torch.isfinite(torch.full((1000,), 100.0, dtype=torch.float16).sum())  # 1e5: inf in float16
    trainer.reset_chunk(0)
    start = _flat(trainer.trainable)
    stats = trainer.train_epoch(ds, (0, 20), 0, 0)
    # At torch's initial scale (2**16) the tiny UNet's scaled gradients fit in float16: both updates go through.
    assert (stats["updates"], stats["skipped_updates"]) == (2, 0)
    assert not torch.equal(_flat(trainer.trainable), start)


def test_negative_control_an_fp16_trainable_parameter_fails_under_the_emulation(assets, monkeypatch,
                                                                                fresh_accelerate_state):
    trainer, ds = _trainer(assets, monkeypatch, emulate=True, unet_dtype=torch.float16)
    trainer.reset_chunk(0)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        trainer.train_epoch(ds, (0, 10), 0, 0)


def test_without_the_emulation_fp16_falls_back_to_fp32(assets, monkeypatch, fresh_accelerate_state):
    monkeypatch.delenv("REVIVAL_EMULATE_FP16", raising=False)
    trainer, ds = _trainer(assets, monkeypatch, emulate=False)
    acc = trainer.accelerator
    assert acc.mixed_precision == "no" and acc.scaler is None and not acc.native_amp
    with acc.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # what a CPU run did before
    assert trainer.parts.text_encoder.dtype == torch.float32


# --- the gradient scaler per chunk; skipped updates -----------------------------------------------------------------

HUGE_SCALE = 2.0 ** 100  # scaled fp16 activations' gradients overflow until the scale has halved ~85 times
PARTLY_OVERFLOWING = 2.0 ** 20  # the tiny UNet overflows above ~2**18: two updates skip, then the rest go through


def test_overflow_skips_the_update_the_schedule_and_the_ema(assets, monkeypatch, fresh_accelerate_state):
    trainer, ds = _trainer(assets, monkeypatch, emulate=True, init_scale=HUGE_SCALE, use_ema=True,
                           lr_scheduler="linear", lr_warmup_steps=0)
    trainer.reset_chunk(0)
    start = _flat(trainer.trainable)
    stats = trainer.train_epoch(ds, (0, 50), 0, 0)  # 5 update positions, every one overflowing
    assert stats["skipped_updates"] == 5 and stats["updates"] == 0
    assert torch.equal(_flat(trainer.trainable), start)  # no weight moved
    assert trainer.lr_scheduler.last_epoch == 0  # the schedule did not advance
    assert trainer.ema.optimization_step == 0  # nor the EMA
    assert trainer.global_updates == 5  # positions (checkpoint names) still advance
    assert trainer.scaler.get_scale() == HUGE_SCALE / 2 ** 5  # halved once per overflow


def test_scaler_is_reset_per_chunk_so_a_chunk_alone_trains_as_after_others(assets, monkeypatch,
                                                                          fresh_accelerate_state):
    # A scale under which a chunk's first updates overflow and its later ones go through: after chunk 0 it has
    # shrunk, so chunk 1 would skip fewer updates, and take more steps of its weights and LR schedule, than alone
    # (--start_CL 1) if the scaler carried over.
    trainer, ds = _trainer(assets, monkeypatch, emulate=True, init_scale=PARTLY_OVERFLOWING, lr_scheduler="linear",
                           lr_warmup_steps=0)
    trainer.reset_chunk(0)
    first = trainer.train_epoch(ds, (0, 50), 0, 0)
    assert first["skipped_updates"] > 0 and first["updates"] > 0, first
    trainer.reset_chunk(1)
    after = trainer.train_epoch(ds, (50, 100), 1, 0)
    # Chunk 1 alone: a trainer of its own (another reset of the same trainer would carry the same state).
    _reset_accelerate_state()
    solo, _ = _trainer(assets, monkeypatch, emulate=True, init_scale=PARTLY_OVERFLOWING, lr_scheduler="linear",
                       lr_warmup_steps=0)
    solo.reset_chunk(1)
    start = _flat(solo.trainable)
    alone = solo.train_epoch(ds, (50, 100), 1, 0)
    assert not torch.equal(start, _flat(solo.trainable))  # chunk 1 took real updates
    assert torch.equal(_flat(trainer.trainable), _flat(solo.trainable))
    assert trainer.lr_scheduler.get_last_lr() == solo.lr_scheduler.get_last_lr()
    assert (after["skipped_updates"], after["updates"]) == (alone["skipped_updates"], alone["updates"])
    assert alone["skipped_updates"] > 0 and alone["updates"] > 0


def test_compat_reference_carries_the_scaler(assets, monkeypatch, fresh_accelerate_state):
    trainer, ds = _trainer(assets, monkeypatch, emulate=True, init_scale=2.0 ** 88, compat_reference=True)
    trainer.reset_chunk(0, carry_state=True)
    trainer.train_epoch(ds, (0, 50), 0, 0)
    shrunk = trainer.scaler.get_scale()
    trainer.reset_chunk(1, carry_state=True)
    assert shrunk < 2.0 ** 88 and trainer.scaler.get_scale() == shrunk  # as published: state carries over


# --- the scripts end to end under the emulation -------------------------------------------------------------------

# Each script, each --params, with and without --use_ema and --gradient_checkpointing (a covering set).
RUNS = [
    ("finetuning_individual_CLIP.py", "full", True, True),
    ("finetuning_individual_CLIP.py", "lora", False, False),
    ("finetuning_individual_Classifier.py", "xattn", True, False),
    ("finetuning_individual_Classifier.py", "full", False, True),
    ("finetuning_sequential.py", "lora", True, True),
    ("finetuning_sequential.py", "xattn", False, False),
]


def _script_flags(assets, out, script, params, ema, gc, **over):
    flags = {"--curriculum": "20,40", "--params": params, "--use_ema": None if ema else False,
             "--gradient_checkpointing": None if gc else False, "--learning_rate": "1e-4",
             "--checkpointing_steps": 2}
    if script == "finetuning_sequential.py":
        flags.update({"--num_train_epochs": 1, "--model_path": assets["classifier"], "--bc_threshold": 0.5})
    else:
        flags.update({"--clip_epoch": 0, "--validation_epochs": 1})
    if script == "finetuning_individual_Classifier.py":
        flags.update({"--model_path": assets["classifier"], "--bc_threshold": 1.0, "--no_early_stop": None, "--clip_threshold": False})
    return seed_flags(assets, out, **{**flags, **over})


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]


def _same_files(a, b):
    return open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.slow
@pytest.mark.parametrize("script,params,ema,gc", RUNS, ids=[f"{s.split('_', 1)[1][:-3]}-{p}-ema{int(e)}-gc{int(g)}"
                                                              for s, p, e, g in RUNS])
def test_scripts_run_their_fp16_path(assets, tmp_path, script, params, ema, gc):
    out = str(tmp_path / "run")
    proc = launch(script, _script_flags(assets, out, script, params, ema, gc), cwd=assets["root"],
                  env_extra=EMULATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs CUDA" not in proc.stderr
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["mixed_precision"] == "fp16" and config["amp"] == "emulated on cpu"
    records = _records(out)
    assert records and all(all(map(torch.isfinite, torch.tensor(r["scores"]))) for r in records)
    assert all(isinstance(r["skipped_updates"], list) for r in records)
    # Updates went through (at torch's initial loss scale none overflows on the tiny UNet): steps taken, none skipped.
    trained = [r for r in records if r["chunk"] is not None]
    assert trained and all(r["optimizer_steps"] > 0 and not any(r["skipped_updates"]) for r in trained), trained
    # The accelerate checkpoint holds the GradScaler's state, as on a GPU.
    ckpts = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert ckpts and all(os.path.isfile(os.path.join(out, d, "scaler.pt")) for d in ckpts)
    # Saved models: trained tensors in fp32; the frozen parts exactly the model's own files' values.
    saved = os.path.join(out, "curriculum-0") if script != "finetuning_sequential.py" else out
    if params == "lora":
        adapter = load_file(os.path.join(saved, "pytorch_lora_weights.safetensors"))
        assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
        assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k or "lora.up" in k)  # B left zero
    else:
        unet = load_file(os.path.join(saved, "unet", "diffusion_pytorch_model.safetensors"))
        assert all(t.dtype == torch.float32 for t in unet.values())
        base = load_file(os.path.join(assets["sd"], "unet", "diffusion_pytorch_model.safetensors"))
        moved = {k for k in unet if not torch.equal(unet[k], base[k])}
        assert moved and (params == "full" or all("attn2.to_k" in k or "attn2.to_v" in k for k in moved))
        for part, name in (("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
            mine, theirs = load_file(os.path.join(saved, part, name)), load_file(os.path.join(assets["sd"], part, name))
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
            assert json.load(open(os.path.join(saved, part, "config.json"))).get("dtype", "float32") == "float32"


@pytest.mark.slow
def test_fp16_overflow_is_counted_recorded_and_warned(assets, tmp_path):
    out = str(tmp_path / "run")
    flags = _script_flags(assets, out, "finetuning_sequential.py", "full", False, False, **{"--save_model": "False"})
    proc = launch("finetuning_sequential.py", flags, cwd=assets["root"],
                  env_extra={**EMULATE, "REVIVAL_FP16_INIT_SCALE": str(2.0 ** 100)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    # 20 images a chunk at batch 10: 2 update positions per chunk, all overflowing; no optimizer step taken.
    assert [c["skipped_updates"] for c in summary["chunks"]] == [2, 2]
    assert [c["optimizer_steps"] for c in summary["chunks"]] == [0, 0]
    records = [r for r in _records(out) if r["chunk"] is not None and r["criterion"] == "clip"]
    assert [r["skipped_updates"] for r in records] == [[2], [2]]
    log = open(os.path.join(out, "train.log")).read()
    assert "2 skipped: fp16 overflow" in log


# --- pipelines and models saved in fp16 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_copies(assets, tmp_path_factory):
    """The tiny SD pipeline, CLIP and classifier saved in fp16 (as an fp16 pipeline save would write them)."""
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForImageClassification, CLIPModel

    root = tmp_path_factory.mktemp("fp16")
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(root / "sd")
    clip, vit = root / "clip", root / "classifier"
    for cls, src, dst in ((CLIPModel, assets["clip"], clip), (AutoModelForImageClassification, assets["classifier"], vit)):
        shutil.copytree(src, dst)  # tokenizer and processor files; the weights are replaced by fp16 ones
        cls.from_pretrained(src).to(torch.float16).save_pretrained(dst)
    assert json.load(open(root / "sd" / "text_encoder" / "config.json"))["dtype"] == "float16"
    return {"sd": str(root / "sd"), "clip": str(clip), "classifier": str(vit)}


def test_fp16_saved_parts_load_as_fp32(assets, fp16_copies):
    from common.classifier import ConceptClassifier
    from common.clip_score import ClipScorer
    from common.models import load_sd_parts

    parts = load_sd_parts(fp16_copies["sd"])
    assert {p.dtype for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()} == {torch.float32}
    assert next(ClipScorer(fp16_copies["clip"]).model.parameters()).dtype == torch.float32
    assert next(ConceptClassifier(fp16_copies["classifier"]).model.parameters()).dtype == torch.float32


def test_tools_run_on_an_fp16_pipeline(assets, fp16_copies, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of <x>\n")
    inversion = [str(ROOT / "tools" / "concept_inversion.py"), "--pretrained_model_name_or_path", fp16_copies["sd"],
                 "--train_data_dir", assets["data"], "--placeholder_token", "<x>", "--initializer_token", "circle", "--concept_name", "red circle",
                 "--validation_prompts", str(prompts), "--clip_model", fp16_copies["clip"],
                 "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2",
                 "--resolution", "32", "--center_crop", "--num_inference_steps", "2", "--quiet",
                 "--output_dir", str(tmp_path / "inv")]
    unlearn = [str(ROOT / "tools" / "unlearn.py"), "--method", "uce", "--erase", "red circle",
               "--model", fp16_copies["sd"], "--output_dir", str(tmp_path / "uce"), "--quiet"]
    for cmd in (inversion, unlearn):
        proc = subprocess.run([sys.executable, *cmd], cwd=assets["root"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (cmd[0], proc.stderr[-3000:])
    # The unlearned copy of an fp16 pipeline is saved in the precision it was loaded in (fp32).
    te = load_file(os.path.join(tmp_path / "uce", "text_encoder", "model.safetensors"))
    assert {t.dtype for t in te.values()} == {torch.float32}


def test_train_classifier_in_fp16_from_an_fp16_backbone(tmp_path, monkeypatch):
    """An fp16-saved backbone trains under --mixed_precision fp16 (fp32 masters, autocast) and is saved in fp32."""
    import numpy as np
    from transformers import AutoModelForImageClassification

    from tools.tiny import draw_shape, tiny_vit_backbone

    backbone = tiny_vit_backbone(str(tmp_path / "backbone"), image_size=32, seed=0)
    AutoModelForImageClassification.from_pretrained(backbone).to(torch.float16).save_pretrained(backbone)
    rng = np.random.default_rng(0)
    for label, colour in (("positive", "red"), ("negative", "blue")):
        os.makedirs(tmp_path / "data" / label)
        for i in range(8):
            draw_shape("circle", colour, 32, rng).save(tmp_path / "data" / label / f"{i}.png")
    out = str(tmp_path / "clf")
    proc = launch("tools/train_classifier.py", ["--train_dir", tmp_path / "data", "--concept", "red", "--output_dir",
                                                out, "--model_name_or_path", backbone, "--num_epochs", 1,
                                                "--batch_size", 8, "--mixed_precision", "fp16"], tmp_path,
                  env_extra=EMULATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(out, "metrics.json")))["history"][0]["train_loss"] > 0
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.slow
def test_fp16_killed_run_resumes_to_the_same_results(assets, tmp_path):
    """Under fp16 a checkpoint holds the GradScaler (scaler.pt); a run killed mid-chunk resumes to the same records."""
    flags = lambda out, **over: _script_flags(assets, out, "finetuning_sequential.py", "full", True, False,  # noqa
                                              **{"--save_model": "False", "--curriculum": "20,40,60", **over})
    env = {**EMULATE, "REVIVAL_FP16_INIT_SCALE": str(2.0 ** 40)}  # a few overflows: the scale's state matters
    whole = str(tmp_path / "whole")
    assert launch("finetuning_sequential.py", flags(whole), cwd=assets["root"], env_extra=env).returncode == 0
    out = str(tmp_path / "killed")
    killed = launch("finetuning_sequential.py", flags(out), cwd=assets["root"],
                    env_extra={**env, "REVIVAL_FAULT": "update:5"})
    assert killed.returncode != 0 and os.path.isfile(os.path.join(out, "checkpoint-4", "scaler.pt"))
    # The same checkpoint without its loss scale: refused in one line (accelerate would raise FileNotFoundError).
    bare = str(tmp_path / "bare")
    shutil.copytree(out, bare)
    os.unlink(os.path.join(bare, "checkpoint-4", "scaler.pt"))
    refused = launch("finetuning_sequential.py", flags(bare, **{"--resume_from_checkpoint": "latest"}),
                     cwd=assets["root"], env_extra=env)
    lines = [line for line in refused.stderr.splitlines() if "error" in line]
    assert refused.returncode == 2 and len(lines) == 1 and "no scaler.pt" in lines[0], refused.stderr[-2000:]
    resumed = launch("finetuning_sequential.py", flags(out, **{"--resume_from_checkpoint": "latest"}),
                     cwd=assets["root"], env_extra=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _records(whole), _records(out)
    assert [(r["chunk"], r["criterion"], r["skipped_updates"], r["optimizer_steps"]) for r in a] == \
        [(r["chunk"], r["criterion"], r["skipped_updates"], r["optimizer_steps"]) for r in b]
    assert sum(sum(r["skipped_updates"]) for r in a) > 0
    for x, y in zip(a, b):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-6)


# --- validation and eval_model.py: one generation precision ---------------------------------------------------------

class _NoClip:
    """A CLIP scorer stand-in: these tests compare the images themselves, not their scores."""

    def score(self, images, texts):
        return [0.0] * len(images)


@pytest.fixture
def unet_calls():
    """(latents' dtype, UNet weights' dtype, autocast on, output dtype) of every UNet forward, whoever calls it."""
    from diffusers import UNet2DConditionModel
    from torch.nn.modules import module as nn_module

    seen = []

    def record(module, args, output):
        if isinstance(module, UNet2DConditionModel):
            out = output[0] if isinstance(output, tuple) else output.sample
            seen.append((args[0].dtype, module.dtype, torch.is_autocast_enabled("cpu"), out.dtype))

    handle = nn_module.register_module_forward_hook(record)
    yield seen
    handle.remove()


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("emulate", [True, False], ids=["fp16", "fp32"])
def test_validation_and_eval_model_draw_the_same_image_bits(assets, monkeypatch, fresh_accelerate_state, tmp_path,
                                                            unet_calls, emulate):
    """The same seed gives the same image in a run's validation and in eval_model.py on the pipeline it saved:
    under fp16 both run the frozen parts in fp16, the fp32 UNet under autocast, and latents in fp16 (no fp32
    outputs); without the emulation (fp16 falls back) both run fp32 without autocast, as before."""
    from common.data import read_prompts
    from common.evaluation import evaluate_checkpoint, generation_dtype
    from common.models import save_pipeline
    from common.protocol import ValidationConfig, Validator
    from common.validation import build_pipeline

    if not emulate:
        monkeypatch.delenv("REVIVAL_EMULATE_FP16", raising=False)
    half = torch.float16 if emulate else torch.float32  # without the emulation fp16 falls back to fp32
    trainer, ds = _trainer(assets, monkeypatch, emulate=emulate)
    acc = trainer.accelerator
    trainer.reset_chunk(0)
    trainer.train_epoch(ds, (0, 20), 0, 0)  # weights the base model does not have
    unet = acc.unwrap_model(trainer.unet)
    training_forward = unet.__dict__.get("forward")  # fp16: accelerate's (autocast, outputs in fp32); fp32: none
    prompts = read_prompts(assets["prompts"], "--prompt_file")
    validator = Validator(acc, build_pipeline(trainer.parts, unet),
                          ValidationConfig(prompts, seed=7, num_inference_steps=3, resolution=32), criteria=[])
    unet_calls.clear()  # training's
    validator("chunk0-epoch0")
    validation = [np.asarray(im) for im in validator.last_images]
    validated = list(unet_calls)
    # Training's forward is left as it was: still accelerate's, its outputs still fp32 under autocast.
    assert unet.__dict__.get("forward") is training_forward and (training_forward is not None) == emulate
    with acc.autocast():
        out = trainer.unet(torch.randn(1, unet.config.in_channels, 4, 4), torch.tensor([1]),
                           torch.randn(1, 77, unet.config.cross_attention_dim), return_dict=False)[0]
    assert out.dtype == torch.float32
    unet_calls.clear()

    saved = str(tmp_path / "pipe")
    save_pipeline(trainer.parts, unet, saved)
    dtype = generation_dtype("fp16", cuda=False)
    assert dtype == half  # eval_model.py's precision is the run's
    row = evaluate_checkpoint(saved, prompts, "red circle", _NoClip(), None, 1, 7, len(prompts), 3, 7.5, 32,
                              str(tmp_path / "images"), torch.device("cpu"), dtype)
    evaluated = list(unet_calls)
    # Both paths: fp16 latents into an fp32 UNet under autocast, fp16 noise predictions out (fp32: all fp32).
    assert validated and set(validated) == {(half, torch.float32, emulate, half)}, set(validated)
    assert evaluated == validated
    assert (row["dtype"], row["unet_dtype"]) == (str(half).replace("torch.", ""), "float32")
    names = sorted(n for n in os.listdir(row["image_dir"]) if n.endswith(".png"))
    assert len(names) == len(validation) == 3
    for mine, name in zip(validation, names):
        assert np.array_equal(mine, _png(os.path.join(row["image_dir"], name))), name


@pytest.mark.slow
def test_eval_model_redraws_a_fp16_runs_validation_images_bit_for_bit(assets, tmp_path):
    """End to end under the emulation: eval_model.py --mixed_precision fp16 on a run's curriculum-0 draws, at the
    same seed, the PNGs the run saved at its validation of those weights."""
    out = str(tmp_path / "run")
    # Revived at its first validation (any CLIP mean is above -1): chunk 0 stops there and is saved.
    flags = _script_flags(assets, out, "finetuning_individual_CLIP.py", "full", False, False,
                          **{"--clip_threshold": -1, "--end_CL": 1, "--save_validation_images": None,
                             "--checkpointing_steps": 100, "--log_file": False})
    run = launch("finetuning_individual_CLIP.py", flags, cwd=assets["root"], env_extra=EMULATE)
    assert run.returncode == 0, run.stderr[-3000:]
    (last,) = _records(out)
    assert (last["chunk"], last["epoch"], last["revived"]) == (0, 0, True) and last["optimizer_steps"] > 0
    evaluated = str(tmp_path / "eval")
    proc = launch("eval_model.py", [os.path.join(out, "curriculum-0"), "none", "red circle",
                                    f"--prompt_file={assets['prompts']}", "--images_per_prompt", "1",
                                    "--num_inference_steps", "2", "--resolution", "32", "--mixed_precision", "fp16",
                                    "--clip_model", assets["clip"], "--output_dir", evaluated],
                  assets["root"], env_extra=EMULATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in open(os.path.join(evaluated, "results.jsonl"))]
    names = sorted(n for n in os.listdir(row["image_dir"]) if n.endswith(".png"))
    assert len(names) == len(last["scores"]) == 3
    for k, name in enumerate(names):
        validated = _png(os.path.join(out, "validation_images", "chunk0-epoch0", f"{k:04d}.png"))
        assert np.array_equal(validated, _png(os.path.join(row["image_dir"], name))), name
    assert row["clip_cosine"] == pytest.approx(last["mean"], abs=1e-6)  # the same images, the same CLIP
    assert (row["weights"], row["dtype"], row["unet_dtype"]) == ("single", "float16", "float32")
