"""Memory at SD size, checked on the tiny model: the budget equals the run's real tensors, and the levers
(--offload_ema, --restore_from_disk) leave results bit for bit as they were; --use_8bit_adam refuses cleanly."""

import importlib
import json
import os

import pytest
import torch

from conftest import launch, seed_flags


@pytest.fixture()
def trainer(assets):
    from accelerate import Accelerator

    from common.data import ImageTransform, load_training_data
    from common.encoding import CachedEncoder
    from common.models import load_sd_parts
    from common.training import ChunkTrainer, TrainConfig

    parts = load_sd_parts(assets["sd"])
    ds = load_training_data(assets["data"], None, "prompt")
    enc = CachedEncoder(parts, ImageTransform(32, center_crop=True, random_flip=True), "cpu", torch.float32)
    cfg = TrainConfig(learning_rate=1e-4, train_batch_size=10, use_ema=True, params="xattn")
    return ChunkTrainer(Accelerator(cpu=True), parts, enc, cfg, horizon_updates=10), parts, ds


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_budget_equals_the_real_tensors(trainer):
    from common.memory import memory_budget

    tr, parts, ds = trainer
    before = memory_budget(tr, parts)["components"]
    assert before["latent_cache"]["bytes"] == 0  # no chunk size given  # no EMA, gradients or optimizer state exist yet
    tr.reset_chunk(0)
    n_train = _bytes(tr.trainable)
    assert before["trainable_parameters"]["bytes"] == n_train > 0
    assert before["frozen_unet_parameters"]["bytes"] == _bytes(p for p in parts.unet.parameters() if not p.requires_grad)
    assert before["restore_copy"] == {"bytes": _bytes(tr.restore.copies), "device": "cpu"}
    assert before["ema"]["bytes"] == _bytes(tr.ema.shadow_params)  # predicted, then created by reset_chunk
    assert before["text_encoder"]["bytes"] == _bytes([*parts.text_encoder.parameters(), *parts.text_encoder.buffers()])
    assert before["vae"]["bytes"] == _bytes([*parts.vae.parameters(), *parts.vae.buffers()])
    # Gradients: what one backward allocates; optimizer state: what one AdamW step allocates.
    seen = {}
    original_step = tr.optimizer.step

    def step(*a, **kw):
        seen["grads"] = _bytes(p.grad for p in tr.trainable if p.grad is not None)
        return original_step(*a, **kw)

    tr.optimizer.step = step
    tr.train_epoch(ds, (0, 10), 0, 0)
    assert seen["grads"] == before["gradients"]["bytes"]
    state = [t for s in tr.raw_optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert _bytes(state) == before["optimizer_state"]["bytes"] == 2 * n_train
    # The latent cache: sized for a chunk before it exists, equal to the real cache once encoded.
    assert memory_budget(tr, parts, largest_chunk=10)["components"]["latent_cache"]["bytes"] == _bytes(
        [tr.encoder.mean, tr.encoder.std, tr.encoder.text]) > 0
    after = memory_budget(tr, parts)["components"]
    assert after["optimizer_state"]["bytes"] >= before["optimizer_state"]["bytes"]  # now the real state (+ step)


class _OnDevice:
    """A scorer whose model stands on another device than the CPU ("meta": no memory, real shapes), as a GPU run's."""

    def __init__(self, model):
        self.model = model.to("meta")

    def score(self, images, prompts):
        return [0.0] * len(images)


def test_budget_counts_the_scoring_models_on_the_accelerator(trainer, assets):
    """CLIP and the classifier stay on the accelerator in fp32 for the whole run: the budget grows by each model's
    parameter and buffer bytes, and a model the retention prompts share with the CLIP criterion counts once."""
    from common.classifier import ConceptClassifier
    from common.clip_score import ClipScorer
    from common.memory import memory_budget
    from common.protocol import Criterion

    tr, parts, _ = trainer
    clip = ClipScorer(assets["clip"], "cpu")
    clip_bytes = _bytes([*clip.model.parameters(), *clip.model.buffers()])
    classifier = ConceptClassifier(assets["classifier"], None, "cpu")
    classifier_bytes = _bytes([*classifier.model.parameters(), *classifier.model.buffers()])
    clip_scorer, classifier_scorer = _OnDevice(clip.model), _OnDevice(classifier.model)
    criteria = [Criterion("clip", 0.3, clip_scorer.score), Criterion("classifier", 0.5, classifier_scorer.score)]
    bare = memory_budget(tr, parts)
    scored = memory_budget(tr, parts, criteria=criteria, retention=clip_scorer.score)
    c = scored["components"]
    assert c["scorer_clip"] == {"bytes": clip_bytes, "device": "meta"} and clip_bytes > 0
    assert c["scorer_classifier"] == {"bytes": classifier_bytes, "device": "meta"} and classifier_bytes > 0
    assert "scorer_retention" not in c  # the CLIP criterion's own model
    assert scored["accelerator_bytes_before_activations"] - bare["accelerator_bytes_before_activations"] \
        == clip_bytes + classifier_bytes
    # A CLIP model of the retention prompts' own (a run without a CLIP criterion) counts; NudeNet (no torch) not.
    alone = memory_budget(tr, parts, criteria=[Criterion("classifier", 0.5, lambda images, prompts: [])],
                          retention=_OnDevice(ClipScorer(assets["clip"], "cpu").model).score)["components"]
    assert alone["scorer_retention"]["bytes"] == clip_bytes and "scorer_classifier" not in alone


def test_budget_counts_one_chunk_of_the_offloaded_ema_update():
    """--offload_ema on a GPU: the update holds one chunk buffer and its temporary on the device (common/ema.py),
    not the whole copy twice; a CPU run updates the host copy in place."""
    from types import SimpleNamespace

    from common.ema import ROUND_TRIP_CHUNK_BYTES
    from common.memory import ema_update_bytes

    def stub(device, offload=True, numel=(3 * 2 ** 28,)):  # 3 GiB of fp32 on "meta": shapes, no memory
        return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device(device)),
                               cfg=SimpleNamespace(use_ema=True, offload_ema=offload),
                               trainable=[torch.empty(n, device="meta") for n in numel])

    assert ema_update_bytes(stub("meta")) == {"bytes": 2 * ROUND_TRIP_CHUNK_BYTES, "device": "meta"}
    assert ema_update_bytes(stub("meta", numel=(1000,))) == {"bytes": 8000, "device": "meta"}  # a small copy: itself
    assert ema_update_bytes(stub("meta", offload=False)) == {"bytes": 0, "device": "-"}  # the EMA lives there
    assert ema_update_bytes(stub("cpu")) == {"bytes": 0, "device": "-"}


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]


def _weights(out, chunk, sub):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, f"curriculum-{chunk}", sub, "diffusion_pytorch_model.safetensors"))


def assert_same_run(a, b):
    """Same validation records (scores, losses, decisions) and the same saved UNet and EMA weights, bit for bit."""
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    assert [strip(r) for r in _records(a)] == [strip(r) for r in _records(b)]
    for chunk in (0, 1):
        for sub in ("unet", "unet_ema"):
            wa, wb = _weights(a, chunk, sub), _weights(b, chunk, sub)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (chunk, sub)


LEVER_RUN = {"--clip_threshold": 1.0, "--clip_epoch": 0, "--validation_epochs": 1, "--learning_rate": "1e-4"}


def test_offload_ema_and_restore_from_disk_leave_results_unchanged(assets, tmp_path):
    outs = {}
    for name, extra in (("default", {}), ("levers", {"--offload_ema": None, "--restore_from_disk": None})):
        outs[name] = str(tmp_path / name)
        proc = launch("finetuning_individual_CLIP.py", seed_flags(assets, outs[name], **LEVER_RUN, **extra),
                      cwd=assets["root"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(outs["default"], outs["levers"])
    budget = json.load(open(os.path.join(outs["levers"], "config.json")))["memory_budget"]["components"]
    assert budget["restore_copy"] == {"bytes": 0, "device": "disk"} and budget["ema"]["device"] == "cpu"
    assert budget["scorer_clip"]["bytes"] > 0  # the run's scoring model is in its budget (it stays loaded)
    default = json.load(open(os.path.join(outs["default"], "config.json")))["memory_budget"]["components"]
    assert default["restore_copy"]["bytes"] == default["trainable_parameters"]["bytes"] > 0
    assert "memory budget (before activations):" in open(os.path.join(outs["levers"], "train.log")).read()


@pytest.mark.parametrize("flags, message", [
    ({"--use_8bit_adam": None}, "--use_8bit_adam: bitsandbytes is not installed"),
    ({"--offload_ema": None, "--use_ema": False}, "--offload_ema: needs --use_ema"),
])
def test_lever_flags_refuse_cleanly(assets, tmp_path, capsys, in_assets_root, flags, message):
    script = importlib.import_module("finetuning_individual_CLIP")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        script.parse_args(seed_flags(assets, str(out), **flags))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_8bit_adam_without_cuda_says_so(assets, tmp_path, capsys, in_assets_root, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    script = importlib.import_module("finetuning_individual_CLIP")
    with pytest.raises(SystemExit):
        script.parse_args(seed_flags(assets, str(tmp_path / "o"), **{"--use_8bit_adam": None}))
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_restore_from_disk_needs_the_model_s_safetensors(assets, tmp_path, capsys, in_assets_root):
    import shutil

    model = tmp_path / "bin_model"
    shutil.copytree(assets["sd"], model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    st.rename(model / "unet" / "diffusion_pytorch_model.bin")
    script = importlib.import_module("finetuning_individual_CLIP")
    with pytest.raises(SystemExit):
        script.parse_args(seed_flags(assets, str(tmp_path / "o"), **{"--restore_from_disk": None,
                                                                      "--pretrained_model_name_or_path": str(model)}))
    assert "has no diffusion_pytorch_model.safetensors" in capsys.readouterr().err
