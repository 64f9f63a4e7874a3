"""tools/unlearning/receler.py (Receler) on the tiny model, in-process: the concept-localised regulariser against a
hand-built mask, the mask itself, the fold of the erasers into attn2.to_out.0, the loss on a fixed example, what a
run changes, its seed, a kill and --resume (the adversarial embeddings and their Adam state in the checkpoint),
plain diffusers loading the output, and the card.
"""

import os

import pytest
import torch

from tools.unlearning import receler
from unlearn_helpers import card as _card, changed as _changed, run as _run, weights as _weights, stop_and_resume

CONCEPT = "red circle"
# 4 steps, each 2 adversarial steps of 4 embeddings; erasers of rank 4; a learning rate that moves the tiny model.
FLAGS = ["--method", "receler", "--concept", CONCEPT, "--iterations", "4", "--ddim_steps", "2", "--adv_iterations",
         "2", "--adv_tokens", "4", "--eraser_rank", "4", "--learning_rate", "1e-2", "--erase_on", "both",
         "--probe_samples", "1", "--concept_probe", "1", "--checkpoint_every", "2", "--device", "cpu", "--quiet"]


# ---- pure pieces ---------------------------------------------------------------


def test_the_regulariser_counts_only_eraser_output_outside_a_hand_built_mask():
    """Two sites of 2x2 and 4x4 pixels; the mask is on at pixels (0, 1) and (1, 1) of the 2x2 site (not symmetric,
    so a transposed mask fails). Output inside the mask costs nothing and gets no gradient; outside, the cost is
    the mean over channels of the squares, summed and divided by the pixels outside, averaged over the sites."""
    small = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # [batch 1, row, column]
    big = torch.zeros(1, 4, 4)
    big[0, 1, 2] = 1.0
    masks = {"a": small, "b": big}
    inside = {"a": torch.zeros(1, 4, 3), "b": torch.zeros(1, 16, 3)}
    inside["a"][0, 1] = torch.tensor([5.0, -2.0, 7.0])  # pixel (0, 1): in the mask
    inside["a"][0, 3] = 4.0  # pixel (1, 1)
    inside["b"][0, 6] = 9.0  # pixel (1, 2)
    assert float(receler.localization_loss(inside, masks)) == 0.0
    out = {k: v.clone().requires_grad_(True) for k, v in inside.items()}
    with torch.no_grad():
        out["a"][0, 2] = torch.tensor([1.0, 2.0, 2.0])  # pixel (1, 0): outside; mean square 3
        out["b"][0, 0] = 3.0  # pixel (0, 0): outside; mean square 9
    loss = receler.localization_loss(out, masks)
    assert float(loss.detach()) == pytest.approx((3.0 / 2 + 9.0 / 15) / 2, rel=1e-6)
    loss.backward()
    assert torch.all(out["a"].grad[0, [1, 3]] == 0) and torch.all(out["b"].grad[0, 6] == 0)
    assert torch.all(out["a"].grad[0, 2] != 0) and torch.all(out["b"].grad[0, 0] != 0)


def test_the_concept_mask_from_hand_built_attention_maps():
    """Maps of 4x4 and 2x2 pixels, 2 heads, 5 tokens; the concept's words are tokens 1 and 2. The 2x2 maps are the
    nearest to --mask_resolution 1 (no 1x1 maps); their word-and-head mean, min-max scaled, is [[0, 0.05], [0.5, 1]]:
    at threshold 0.1 the mask is [[0, 0], [1, 1]], resized (nearest) to 4x4 for the other site."""
    word_mean = torch.tensor([0.2, 0.21, 0.3, 0.4])  # pixels in row order
    small = torch.zeros(1, 2, 4, 5)
    small[0, 0, :, 1] = word_mean + 0.1  # head 0, word 1
    small[0, 0, :, 2] = word_mean - 0.1  # head 0, word 2: the mean over words is word_mean
    small[0, 1, :, 1] = small[0, 1, :, 2] = word_mean  # head 1
    small[0, :, :, 0] = 5.0  # BOS: not a word, ignored
    big = torch.rand(1, 2, 16, 5)  # not the chosen resolution: ignored
    masks, used = receler.concept_masks({"s": small, "b": big}, [1, 2], 0.1, 1)
    assert used == 2
    assert torch.equal(masks["s"], torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    expected = torch.tensor([[0.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4]).unsqueeze(0)
    assert torch.equal(masks["b"], expected)
    assert receler.mask_resolution([64, 32, 16, 8], 16) == 16 and receler.mask_resolution([4], 16) == 4
    assert receler.mask_resolution([8, 32], 16) == 32  # a tie: the larger


def test_a_folded_eraser_computes_what_the_eraser_did():
    """o + up(down(o)) with o = to_out.0(a) equals the folded to_out.0(a), biases included (float64)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=6, cross_attention_dim=5, heads=2, dim_head=3).double()
    eraser = receler.Eraser(6, 3, torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        eraser.up.weight.normal_()
        eraser.up.bias.normal_()
    a = torch.randn(2, 7, 6, dtype=torch.float64)
    o = attn.to_out[0](a)
    want = o + eraser(o)
    receler.fuse_eraser(attn, eraser)
    assert torch.allclose(attn.to_out[0](a), want, rtol=0, atol=1e-12)


# ---- on the tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def parts(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


def _receler(parts, **kw):
    from tools.unlearning.base import encode
    from tools.unlearning.esd import make_ddim

    cond, uncond = encode(parts, [CONCEPT, ""], "cpu").chunk(2)
    words = receler.word_count(parts.tokenizer, CONCEPT, 4)
    settings = dict(rank=4, eta=1.0, guidance=3.0, reg_weight=0.1, mask_threshold=0.1, mask_resolution=16,
                    adv_iterations=2, adv_tokens=4, adv_learning_rate=0.1, adv_start=0, latent_shape=(1, 4, 8, 8),
                    seed=0, device="cpu")
    settings.update(kw)
    return receler.Receler(parts.unet, make_ddim(parts.inference_scheduler.config, 4), cond, uncond, words,
                           **settings)


def test_the_loss_falls_on_a_fixed_example_and_only_the_erasers_move(parts):
    """Eight Adam steps of the erasers on one fixed example (x_t, t, the frozen predictions, the mask) under the
    concept's and an adversarial prompt: the loss falls to less than 0.7 of its start; the UNet does not move; the
    erasers start at zero output."""
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    r = _receler(parts)
    example = r.example(1)
    z, t, e_0, e_p, masks = example
    with torch.no_grad():  # new erasers change nothing
        with receler.erasing(r.sites, r.erasers):
            assert torch.equal(receler._predict(parts.unet, z, t, r.cond), e_p)
    contexts = [r.cond, r.adversarial_prompt().detach()]
    optimizer = torch.optim.Adam(r.erasers.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        total, erase, reg = r.losses(*example, contexts)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    print("Receler loss on a fixed example:", losses[0], "->", losses[-1])
    assert losses[-1] < 0.7 * losses[0]
    after = parts.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in parts.unet.parameters())


def test_the_attack_moves_the_adversarial_embeddings_toward_the_concept(parts):
    """The adversary's loss (erased prediction vs the frozen concept prediction) is its own: after erasers have
    learned, its Adam steps lower it, and they change only the adversarial positions of the prompt."""
    r = _receler(parts, adv_iterations=1)
    z, t, e_0, e_p, masks = r.example(2)
    generator = torch.Generator().manual_seed(0)  # the suite's global generator is in any state here
    with torch.no_grad():
        for e in r.erasers.values():
            e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=generator) * 0.5)
    start = r.adversarial.detach().clone()
    losses = [r.attack(z, t, e_p)[1] for _ in range(6)]
    assert losses[-1] < losses[0] and not torch.equal(start, r.adversarial.detach())
    prompt = r.adversarial_prompt().detach()
    keep = [i for i in range(prompt.shape[1]) if i not in r.adv_indices]
    assert torch.equal(prompt[:, keep], r.cond[:, keep])
    assert torch.equal(prompt[:, r.adv_indices], r.adversarial.detach())


@pytest.fixture(scope="module")
def first(assets, tmp_path_factory):
    return _run([*FLAGS, "--model", assets["sd"], "--output_dir", str(tmp_path_factory.mktemp("receler") / "a")])


def test_it_changes_only_the_cross_attention_output_projections_and_the_card_says_so(assets, first, parts):
    changed = _changed(assets["sd"], first)
    to_out = {n for n in _weights(assets["sd"]) if ".attn2.to_out.0." in n}
    assert changed == to_out and len(to_out) == 8  # weight and bias of 4 cross-attentions
    for part in ("text_encoder", "vae"):
        assert _changed(assets["sd"], first, part) == set(), part
    card = _card(first)
    assert card["method"] == "receler" and card["erase"] == [CONCEPT] and card["data"] is None
    assert set(card["changed_parameters"]["unet"]["per_tensor"]) == changed
    results, hyper = card["results"], card["hyperparameters"]
    assert results["trained_parameters"]["erasers"] == 4 and results["trained_parameters"]["rank"] == 4
    adv = results["adversarial"]
    assert (adv["iterations"], adv["tokens"], adv["erase_on"], adv["steps_attacked"]) == (2, 4, "both", 4)
    words = len(parts.tokenizer(CONCEPT, add_special_tokens=False)["input_ids"])  # after BOS
    assert adv["positions"] == list(range(1 + words, 1 + words + 4))
    assert hyper["adv_iterations"] == 2 and hyper["adv_tokens"] == 4 and hyper["concept_reg_weight"] == 0.1
    assert hyper["resolution"] == 32 and hyper["mask_resolution_used"] == 8 and results["mask"]["resolution"] == 8
    assert card["training"] == {"checkpoint_every": 2, "resumed_from_step": None}
    assert results["fusion_max_abs_difference"] < 1e-5
    probe = results["objective_on_probes"]
    assert probe["after"] == pytest.approx(probe["after_with_erasers"], rel=1e-4)


def test_a_seed_gives_the_same_bits_twice_with_gradient_checkpointing_too(assets, first, tmp_path):
    """The second run recomputes its activations in the backward (the erasers are hooks: they must be there when
    the forward is recomputed) and ends in the same bits."""
    again = _run([*FLAGS, "--gradient_checkpointing", "--model", assets["sd"], "--output_dir", str(tmp_path / "again")])
    a, b = _weights(first), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _card(again)["results"] == _card(first)["results"]


def test_stopped_after_step_3_and_resumed_ends_in_the_same_bits(assets, first, tmp_path, monkeypatch):
    """REVIVAL_FAULT=update:3 stops the run after its third step (in-process: the hook's kill raises), leaving the
    step-2 checkpoint with the erasers, the adversarial embeddings and both Adam states; --resume ends in the
    uninterrupted run's bits."""
    def holds_both_searches(out):
        state = torch.load(os.path.join(out, "unlearn_checkpoint", "state.pt"), weights_only=True)
        assert "adversarial.embeddings" in state["params"]
        assert set(state["stateful"]) == {"optimizer", "adv_optimizer"}

    out = stop_and_resume(monkeypatch, [*FLAGS, "--model", assets["sd"], "--output_dir", str(tmp_path / "killed")],
                          inspect=holds_both_searches)
    a, b = _weights(first), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = _card(out)
    assert card["training"]["resumed_from_step"] == 2
    assert card["results"]["loss"] == _card(first)["results"]["loss"]


def test_plain_diffusers_loads_the_output_and_generates(first):
    """StableDiffusionPipeline.from_pretrained, nothing of this toolkit: the erasers are in the UNet's weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(first, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(CONCEPT, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0
