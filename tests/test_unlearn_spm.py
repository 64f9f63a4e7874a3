"""tools/unlearning/spm.py (SPM) on the tiny model, in-process: the membrane, facilitated transport, the fused
pipeline, the loss, resume, the card.

One run through tools/unlearn.py (4 steps, a checkpoint every 2); a second is stopped after step 3 by the fault hook
(REVIVAL_FAULT=update:3) and resumed from its step-2 checkpoint, and must end in the first one's bits; the same
training driven in-process must give the first run's adapter bit for bit. --alpha 0.5 (a scale of 0.5 on the rank-1
update) so that a fuse or a hook that forgets alpha / rank is seen.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from common.data import encode_prompts
from tools import unlearn
from tools.unlearning import spm
from unlearn_helpers import (card as _card, changed as _changed, refused, run as _run, stop_and_resume,
                             weights as _weights)

CONCEPT = "red circle"
FLAGS = ["--method", "spm", "--concept", CONCEPT, "--iterations", "4", "--ddim_steps", "3", "--surrogate_samples",
         "2", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--alpha", "0.5", "--probe_samples", "2",
         "--concept_probe", "2", "--checkpoint_every", "2", "--seed", "7", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spm") / "uninterrupted")
    return _run([*FLAGS, "--model", assets["sd"], "--output_dir", out])


@pytest.fixture(scope="module")
def base_parts(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


class Transformer2DModel(torch.nn.Module):
    """A stand-in transformer block: the membrane finds its layers by this class name."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.conv = torch.nn.Conv2d(2, 2, 1)


def test_transport_scales_the_adapter_by_the_similarity_by_hand():
    """Prompt tokens {10, 11} (+ BOS/EOS 1, 2), erased prompts {11, 12} and {13}: token overlap 1/2 and 0.
    Flattened embeddings: cos 0 with the first, 1 / (2 sqrt 7) = 0.189 with the second. Similarity
    max(max(0, 1/2), max(0.189, 0)) = 0.5; the update scales with its square (both factors scaled, as their
    inference), so strength 0.25."""
    prompt = torch.ones(2, 2)
    erased = torch.tensor([[[1.0, -1.0], [1.0, -1.0]], [[1.0, 1.0], [1.0, -2.0]]])
    assert spm.transport_similarity(prompt, [1, 2], erased[1:], [[1, 13, 2]], {1, 2}) == \
        pytest.approx(1 / (2 * 7 ** 0.5))
    special = {1, 2}
    sim = spm.transport_similarity(prompt, [1, 10, 11, 2, 2], erased, [[1, 11, 12, 2], [1, 13, 2, 2]], special)
    assert sim == pytest.approx(0.5)
    assert spm.transport_similarity(prompt, [1, 13, 2], erased, [[1, 11, 12, 2], [1, 13, 2]], special) == 1.0
    assert spm.transport_strength(sim) == pytest.approx(0.25)

    block = torch.nn.Sequential()
    block.add_module("t", Transformer2DModel())
    membrane = spm.Membrane(block, rank=1, alpha=0.5)
    assert membrane.targets == ["t.lin", "t.conv"]
    down, up = membrane.factors("t.lin")
    with torch.no_grad():
        down.copy_(torch.tensor([[1.0, 2.0]]))
        up.copy_(torch.tensor([[3.0], [1.0]]))
    x = torch.tensor([[1.0, 1.0]])
    plain = block.t.lin(x)
    membrane.attach()
    membrane.strength = spm.transport_strength(sim)
    # update at strength 1: 0.5 * up @ down @ x = 0.5 * [3, 1] * 3 = [4.5, 1.5]; at 0.25: [1.125, 0.375]
    assert torch.allclose(block.t.lin(x) - plain, torch.tensor([[1.125, 0.375]]))
    membrane.detach()
    assert torch.equal(block.t.lin(x), plain)


def test_the_fused_model_equals_the_adapter_at_strength_1(assets, uninterrupted, base_parts):
    """The saved UNet's outputs are those of the base UNet with the saved adapter hooked on at strength 1; the
    adapter applied with transport to the concept itself gets strength 1, to another prompt less."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    fused = UNet2DConditionModel.from_pretrained(os.path.join(uninterrupted, "unet")).eval()
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd"], safety_checker=None)
    adapter, rule = spm.load_adapter(uninterrupted)
    membrane, strength = spm.apply_with_transport(pipe, adapter, rule, CONCEPT)
    assert strength == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        hooked = pipe.unet.eval()(x, t, encoder_hidden_states=ctx).sample
        out = fused(x, t, encoder_hidden_states=ctx).sample
        membrane.detach()
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert (out - base).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(out, hooked, rtol=1e-4, atol=1e-6), (out - hooked).abs().max()
    other, weaker = spm.apply_with_transport(pipe, adapter, rule, "a photo of a dog")
    other.detach()
    assert 0 < weaker < 1


def test_only_the_membrane_layers_change(assets, uninterrupted, base_parts):
    changed = _changed(assets["sd"], uninterrupted)
    targets = spm.membrane_targets(base_parts.unet)
    assert changed == {f"{t}.weight" for t in targets} and len(targets) == 48
    assert any(".proj_in." in n for n in changed) and any("ff.net.2" in n for n in changed)
    for part in ("text_encoder", "vae"):
        assert _changed(assets["sd"], uninterrupted, part) == set(), part


def test_the_loss_by_hand_and_it_falls_on_a_fixed_batch(base_parts):
    """The erasing loss is the MSE of the adapted concept prediction to eps(neutral) - eta (eps(concept) -
    eps(neutral)) of the base model; anchoring the MSE to the base model's surrogate predictions. Ten AdamW steps
    on one fixed batch lower the total."""
    parts = base_parts
    unet = parts.unet.eval().requires_grad_(False)
    membrane = spm.Membrane(unet, 1, 1.0, seed=3).attach()
    try:
        concept = spm.Concept(parts, CONCEPT, [], "cpu")
        draws = spm.draw_step(0, 0, 3, [], 8, 4)
        anchors = concept.anchors(0, 0, 2)
        x_t = spm.sample_x_t(unet, membrane, spm_scheduler(parts), concept, draws, 3.0, "cpu")
        t = torch.tensor([spm.loss_timestep(draws["k"], 3, 1000)])
        with torch.no_grad():
            membrane.params[next(k for k in membrane.params if "lora_up" in k)].add_(0.05)
            e, a = spm.spm_losses(unet, membrane, x_t, t, concept.target, concept.target, concept.neutral, anchors,
                                  2.0)
            text = encode_prompts(parts.tokenizer, parts.text_encoder, [CONCEPT, ""])
            pred = unet(x_t, t, encoder_hidden_states=text[:1]).sample
            with membrane.at(0.0):
                pos, neu = unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=text).sample.chunk(2)
                anchor_base = unet(x_t.expand(2, -1, -1, -1), t, encoder_hidden_states=anchors).sample
            anchor_pred = unet(x_t.expand(2, -1, -1, -1), t, encoder_hidden_states=anchors).sample
        assert e.item() == pytest.approx(F.mse_loss(pred, neu - 2.0 * (pos - neu)).item(), rel=1e-4)
        assert a.item() == pytest.approx(F.mse_loss(anchor_pred, anchor_base).item(), rel=1e-4) and a.item() > 0
        settings = {"learning_rate": 1e-2, "lr_scheduler": "constant", "la_strength": 10.0}
        optimizer, _ = spm.make_optimizer(membrane.params.values(), {**settings, "iterations": 10})
        losses = []
        for _ in range(10):
            e, a = spm.spm_losses(unet, membrane, x_t, t, concept.target, concept.target, concept.neutral, anchors,
                                  1.0)
            loss = e + settings["la_strength"] * a
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print("SPM loss on a fixed batch:", losses[0], "->", losses[-1])
        assert losses[-1] < 0.5 * losses[0]
    finally:
        membrane.detach()


def spm_scheduler(parts):
    from tools.unlearning.esd import make_ddim

    return make_ddim(parts.inference_scheduler.config, 3)


def test_in_process_training_gives_the_runs_adapter_bit_for_bit_and_another_seed_does_not(assets, uninterrupted):
    """The same seed twice (the CLI run, then train_spm here): the same adapter bits; seed 8: others."""
    from common.models import load_sd_parts

    request = unlearn.parse_args([*FLAGS, "--model", assets["sd"], "--output_dir", "unused"])
    saved = load_file(os.path.join(uninterrupted, spm.ADAPTER_FILE))

    def train(seed, iterations):
        parts = load_sd_parts(assets["sd"])
        unet = parts.unet.requires_grad_(False).eval()
        membrane = spm.Membrane(unet, 1, 0.5, seed).attach()
        concept = spm.Concept(parts, CONCEPT, [], "cpu")
        spm.train_spm(unet, membrane, spm_scheduler(parts), concept, {**request.settings, "iterations": iterations},
                      seed, [], 8, "cpu", progress=False)
        return membrane.state_dict()

    again = train(7, 4)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    other = train(8, 1)  # one step is enough to differ (and cheaper)
    assert not torch.equal(other[next(k for k in saved if "lora_up" in k)], again[next(k for k in saved
                                                                                         if "lora_up" in k)])


def test_stopped_after_step_3_and_resumed_ends_in_the_same_bits(assets, uninterrupted, tmp_path, monkeypatch):
    out = stop_and_resume(monkeypatch, [*FLAGS, "--model", assets["sd"], "--output_dir", str(tmp_path / "killed")])
    a, b = _weights(uninterrupted), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first, second = load_file(os.path.join(uninterrupted, spm.ADAPTER_FILE)), load_file(os.path.join(out,
                                                                                                     spm.ADAPTER_FILE))
    assert all(torch.equal(first[k], second[k]) for k in first)
    card = _card(out)
    assert card["training"]["resumed_from_step"] == 2 and card["results"] == _card(uninterrupted)["results"]


def test_plain_diffusers_loads_the_directory_and_generates(uninterrupted):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(uninterrupted, safety_checker=None)
    image = pipe(CONCEPT, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_the_card_and_the_adapter_files(assets, uninterrupted, base_parts):
    card = _card(uninterrupted)
    assert card["method"] == "spm" and card["erase"] == [CONCEPT] and card["data"] is None
    hyper = card["hyperparameters"]
    assert hyper["rank"] == 1 and hyper["alpha"] == 0.5 and hyper["la_strength"] == 1000.0
    assert hyper["resolution"] == 32 and hyper["dynamic_resolution"] == "off"  # 32 px: below the 128-px bucket
    assert card["training"] == {"checkpoint_every": 2, "resumed_from_step": None}
    results = card["results"]
    targets = spm.membrane_targets(base_parts.unet)
    assert results["adapter"]["modules"] == len(targets) and results["adapter"]["fused_at_strength"] == 1.0
    assert "fused pipeline" in results["adapter"]["measured_by_revival_scripts"]
    assert results["trained_parameters"]["numel"] == sum(
        m.in_features + m.out_features if isinstance(m, torch.nn.Linear) else m.in_channels + m.out_channels
        for n, m in base_parts.unet.named_modules() if n in set(targets))
    probes = results["objective_on_probes"]
    assert probes["before"]["erase"] > 0 and probes["after"]["erase"] != probes["before"]["erase"]
    assert set(card["changed_parameters"]["unet"]["per_tensor"]) == {f"{t}.weight" for t in targets}
    with open(os.path.join(uninterrupted, spm.TRANSPORT_FILE)) as f:
        rule = json.load(f)
    assert rule["erased_prompts"] == [CONCEPT] and rule["modules"] == targets and rule["strength_exponent"] == 2.0
    assert rule["rank"] == 1 and rule["alpha"] == 0.5
    with safe_open(os.path.join(uninterrupted, spm.ADAPTER_FILE), "pt") as f:
        assert f.metadata() == {"prompts": CONCEPT, "rank": "1", "alpha": "0.5"}
        keys = set(f.keys())
    assert len(keys) == 3 * len(targets) and "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in keys


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "--rank 0: must be at least 1"),
    (["--ddim_steps", "1"], "--ddim_steps 1: must be at least 2"),
    (["--surrogate_prompts", "Red Circle"], "--surrogate_prompts 'Red Circle': the concept itself"),
    (["--la_strength", "-1"], "--la_strength -1.0: must be >= 0"),
    (["--lamb", "1"], "--lamb: not used by --method spm"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(extra, message, assets, tmp_path, capsys):
    out = tmp_path / "out"
    refused(["--method", "spm", "--concept", CONCEPT, *extra, "--model", assets["sd"], "--output_dir", str(out)],
            message, capsys, out)


def test_its_flags_are_refused_by_the_other_methods(assets, tmp_path, capsys):
    refused(["--method", "esd-x", "--concept", "a", "--la_strength", "1", "--model", assets["sd"], "--output_dir",
             str(tmp_path / "o")], "--la_strength: not used by --method esd-x (a flag of spm)", capsys, tmp_path / "o")
