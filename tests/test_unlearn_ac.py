"""tools/unlearning/ac.py (Concept Ablation) on the tiny model, in-process: what it trains, its loss, resume, the card.

One run generates its anchor images with the base model; a second reads them back from that folder with the same
flags and must end in the same bits (the same seed twice, and generated = read); a third is stopped after step 3
by the fault hook (REVIVAL_FAULT=update:3) and resumed from its step-2 checkpoint, and must end in those bits too.
The loss is checked against a computation by hand on one fixed batch (the protocol: which prompt, which target,
the prior term), and the objective must fall on fixed held-out examples.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from common.data import encode_prompts
from tools.unlearning import ac
from tools.unlearning.base import load_image_set, noised
from conftest import ROOT, launch
from unlearn_helpers import (card as _card, changed as _changed, refused, run as _run, stop_and_resume,
                             weights as _weights)

CONCEPT, ANCHOR = "red circle", "circle"  # the concept names its anchor: --regularization auto turns the prior on
ANCHOR_PROMPTS = ["a circle", "a picture of a circle"]
# 6 images, 2 sampling steps; 6 steps of 2 (+2 prior) images. The tiny model's text barely moves its predictions
# (the ablation loss is ~1e-4, its untrained denoising loss ~1): at the default prior weight 1 the prior alone would
# steer the update, so it is weighted 1e-4 here, and the learning rate is 1e-2 (3e-3 lowered the objective ~20% in
# 6 steps, 1e-2 ~50%).
FLAGS = ["--method", "ac", "--concept", CONCEPT, "--anchor", ANCHOR, "--iterations", "6", "--batch_size", "2",
         "--learning_rate", "1e-2", "--prior_loss_weight", "1e-4", "--probe_samples", "4", "--checkpoint_every", "2",
         "--device", "cpu", "--quiet"]
PRIOR_WEIGHT = 1e-4
GENERATE = ["--anchor_prompts", *ANCHOR_PROMPTS, "--anchor_images", "6", "--generation_steps", "2"]


@pytest.fixture(scope="module")
def generated(assets, tmp_path_factory):
    """The run that generates its anchor images (OUTPUT_DIR/unlearn_data/anchor), started as a new interpreter
    (python tools/unlearn.py, as a user runs it)."""
    out = str(tmp_path_factory.mktemp("ac") / "generated")
    proc = launch("tools/unlearn.py", [*FLAGS, *GENERATE, "--model", assets["sd"], "--output_dir", out], str(ROOT),
                  fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def anchor_dir(generated):
    return os.path.join(generated, "unlearn_data", "anchor")


@pytest.fixture(scope="module")
def read_back(assets, anchor_dir, tmp_path_factory):
    """The same run on the generated folder given as --anchor_data."""
    out = str(tmp_path_factory.mktemp("ac") / "read")
    return _run([*FLAGS, "--anchor_data", anchor_dir, "--model", assets["sd"], "--output_dir", out])


def test_trains_only_cross_attention_keys_and_values_and_the_card_says_so(assets, generated):
    changed = _changed(assets["sd"], generated)
    xattn = {n for n in _weights(assets["sd"]) if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert changed == xattn and len(xattn) == 8
    for part in ("text_encoder", "vae"):
        assert _changed(assets["sd"], generated, part) == set(), part
    card = _card(generated)
    assert set(card["changed_parameters"]["unet"]["per_tensor"]) == changed
    assert card["results"]["trained_parameters"]["tensors"] == 8
    data = card["data"]["anchor"]
    assert data["images"] == 6 and data["prompts"] == ANCHOR_PROMPTS and data["generated"]["num_inference_steps"] == 2
    assert card["guide"] == [ANCHOR] and card["erase"] == [CONCEPT]
    hyper = card["hyperparameters"]
    assert hyper["regularization"] == "on" and hyper["learning_rate"] == 1e-2 and hyper["resolution"] == 32
    assert card["results"]["target_prompts"] == ["a picture of a red circle", "a red circle"]
    assert card["training"] == {"checkpoint_every": 2, "resumed_from_step": None}


def test_the_objective_falls_on_held_out_examples(generated):
    probe = _card(generated)["results"]["objective_on_probes"]
    print("AC objective on 4 held-out examples:", probe["before"], "->", probe["after"])
    assert probe["after"]["ablation"] < 0.7 * probe["before"]["ablation"]


def test_generated_and_read_back_anchor_images_give_the_same_bits(generated, read_back):
    a, b = _weights(generated), _weights(read_back)
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = _card(read_back)
    assert card["data"]["anchor"]["generated"] is None and card["data"]["anchor"]["images"] == 6
    assert card["results"] == _card(generated)["results"]


def test_stopped_after_step_3_and_resumed_ends_in_the_same_bits(assets, anchor_dir, read_back, tmp_path,
                                                                 monkeypatch):
    """REVIVAL_FAULT=update:3 stops the run after its third step (in-process: the hook's kill raises), leaving the
    step-2 checkpoint; --resume continues from it to the uninterrupted run's weights and results."""
    out = stop_and_resume(monkeypatch, [*FLAGS, "--anchor_data", anchor_dir, "--model", assets["sd"], "--output_dir",
                                        str(tmp_path / "killed")])
    a, b = _weights(read_back), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = _card(out)
    assert card["training"]["resumed_from_step"] == 2 and card["results"] == _card(read_back)["results"]


@pytest.fixture(scope="module")
def base_parts(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


@pytest.fixture(scope="module")
def anchor_data(base_parts, anchor_dir):
    images = load_image_set(anchor_dir, "--anchor_data")
    return images, ac.AnchorData(base_parts, images, ANCHOR, CONCEPT, "object", 32, True, "cpu")


def test_the_loss_by_hand_on_one_batch(generated, anchor_data, base_parts):
    """Step 0's recorded loss is the ablation loss (target prompt vs the model's own anchor-prompt prediction)
    plus the prior loss (anchor prompt vs the added noise), computed here from the prompts' text."""
    parts = base_parts
    images, data = anchor_data
    unet = parts.unet.eval()
    draws = ac.draw_batch(data, 0, 0, 2, True, (1, 4, 8, 8))
    idx = draws["idx"]
    latents = data.latents(idx, draws["flips"], draws["eps"])
    x_t, t, noise = noised(parts.noise_scheduler, latents, ac.draw_batch(data, 0, 0, 2, True, (1, 4, 8, 8))
                           ["generator"])
    anchor_text = [images.prompts[i] for i in idx]
    target_text = [p.replace("circle", "red circle") for p in anchor_text[:2]]

    def eps(x, tt, prompts):
        return unet(x, tt, encoder_hidden_states=encode_prompts(parts.tokenizer, parts.text_encoder, prompts,
                                                                "cpu")).sample

    with torch.no_grad():
        ablation = F.mse_loss(eps(x_t[:2], t[:2], target_text), eps(x_t[:2], t[:2], anchor_text[:2]))
        prior = F.mse_loss(eps(x_t[2:], t[2:], anchor_text[2:]), noise[2:])
        loss, got_prior = ac.ac_losses(unet, unet, parts.noise_scheduler, data, draws, 2, "model", "cpu")
        assert torch.allclose(loss, ablation, rtol=1e-4, atol=1e-9) and torch.allclose(got_prior, prior, rtol=1e-4)
        draws = ac.draw_batch(data, 0, 0, 2, True, (1, 4, 8, 8))
        noise_loss, _ = ac.ac_losses(unet, unet, parts.noise_scheduler, data, draws, 2, "noise", "cpu")
        assert torch.allclose(noise_loss, F.mse_loss(eps(x_t[:2], t[:2], target_text), noise[:2]), rtol=1e-4)
    first = _card(generated)["results"]["loss"]["first"]
    assert first == pytest.approx(float(ablation + PRIOR_WEIGHT * prior), rel=1e-4)


def test_the_model_based_target_comes_from_the_model_being_trained(base_parts, anchor_data):
    """As the authors' code (no frozen copy): step 1's loss is measured against the anchor prediction of the model
    after step 0, not of the base model (which --target_model frozen uses)."""
    import copy

    _, data = anchor_data
    shape, sched = (1, 4, 8, 8), base_parts.noise_scheduler

    def trained(steps, teacher=None):
        unet = copy.deepcopy(base_parts.unet)
        names = ac.trainable_names(unet, "xattn")
        params = {n: p for n, p in unet.named_parameters() if n in names}
        unet.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        losses, _ = ac.train_ac(unet, teacher, sched, data, params, "model", steps, 2, 1e-2, None, 1.0, 0, shape,
                                "cpu", progress=False)
        return unet.eval(), losses

    after_one, _ = trained(1)
    _, losses = trained(2)
    with torch.no_grad():
        own = ac.ac_losses(after_one, after_one, sched, data, ac.draw_batch(data, 0, 1, 2, False, shape), 2, "model",
                           "cpu")[0]
        base = ac.ac_losses(after_one, base_parts.unet.eval(), sched, data, ac.draw_batch(data, 0, 1, 2, False, shape),
                            2, "model", "cpu")[0]
    assert losses[1] == pytest.approx(float(own), rel=1e-4) and float(own) != pytest.approx(float(base), rel=1e-3)
    _, frozen_losses = trained(2, teacher=ac.frozen_copy(base_parts.unet))
    assert frozen_losses[1] == pytest.approx(float(base), rel=1e-4)


def test_attn_and_full_parameter_groups(assets, anchor_dir, base_parts, tmp_path):
    """--train_params attn: self- and cross-attention projections only (noise-based, no prior, a frozen target)."""
    out = _run(["--method", "ac", "--concept", CONCEPT, "--anchor", ANCHOR, "--anchor_data", anchor_dir,
                "--train_params", "attn", "--ablation", "noise", "--regularization", "off", "--iterations", "2",
                "--batch_size", "2", "--learning_rate", "1e-3", "--probe_samples", "0", "--device", "cpu",
                "--quiet", "--model", assets["sd"], "--output_dir", str(tmp_path / "attn")])
    changed = _changed(assets["sd"], out)
    attn = {n for n in _weights(assets["sd"]) if any(p in n for p in ("to_q", "to_k", "to_v", "to_out"))}
    assert changed <= attn and any("attn1" in n for n in changed) and any("attn2.to_q" in n for n in changed)
    assert _card(out)["hyperparameters"]["regularization"] == "off"
    names = {n for n, _ in base_parts.unet.named_parameters()}
    assert set(ac.trainable_names(base_parts.unet, "full")) == names
    assert set(ac.trainable_names(base_parts.unet, "xattn")) < set(ac.trainable_names(base_parts.unet, "attn"))


def test_prompts_and_defaults():
    assert ac.object_prompt("A photo of a Cat, category cat", "cat", "grumpy cat") == \
        "A photo of a grumpy cat, category grumpy cat"
    assert ac.style_prompts("a house", "van gogh") == ("a house, in the style of van gogh",
                                                       "in van gogh's style, a house")
    assert ac.regularized("auto", "cat", "grumpy cat") and not ac.regularized("auto", "ball", "golf")
    assert ac.default_learning_rate(8, False) == pytest.approx(1.6e-5)
    assert ac.default_learning_rate(8, True) == pytest.approx(3.2e-5)
    a = ac.sample_indices(5, 0, 12, 6, 1)
    assert sorted(a[:6].tolist()) == list(range(6)) and sorted(a[6:].tolist()) == list(range(6))
    assert torch.equal(ac.sample_indices(5, 4, 5, 6, 1), a[4:9])  # a pure function of the position


@pytest.mark.parametrize("extra, message", [
    ([], "--anchor: required for --method ac"),
    (["--anchor", "Red Circle"], "--anchor 'Red Circle': the same as --concept"),
    (["--anchor", "circle", "--anchor_data", "NOPE"], "--anchor_data NOPE: no such directory"),
    (["--anchor", "circle", "--anchor_data", "EMPTY"], "no metadata.jsonl"),
    (["--anchor", "square", "--anchor_data", "ANCHORS"], "does not name --anchor 'square'"),
    (["--anchor", "circle", "--anchor_prompts", "a square"], "--anchor_prompts: prompt 'a square' does not name"),
    (["--anchor", "circle", "--anchor_data", "ANCHORS", "--anchor_prompts", "a circle"],
     "--anchor_prompts: not used with --anchor_data"),
    (["--anchor", "circle", "--lamb", "1"], "--lamb: not used by --method ac"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(extra, message, assets, anchor_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    where = {"NOPE": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty"), "ANCHORS": anchor_dir}
    extra = [where.get(a, a) for a in extra]
    message = message.replace("NOPE", where["NOPE"])
    out = tmp_path / "out"
    refused(["--method", "ac", "--concept", CONCEPT, *extra, "--model", assets["sd"], "--output_dir", str(out)],
            message, capsys, out)


def test_its_flags_are_refused_by_the_other_methods(assets, tmp_path, capsys):
    refused(["--method", "uce", "--erase", "a", "--anchor", "b", "--model", assets["sd"], "--output_dir",
             str(tmp_path / "o")], "--anchor: not used by --method uce (a flag of ac)", capsys, tmp_path / "o")
