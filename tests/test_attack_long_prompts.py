"""P4D-K's long prompts (docs/attacks.md: P4D-N and P4D-K): cut at the encoder's 77 positions (--long_prompts
truncate) or, as joycenerd/P4D's P4D-K pipeline, kept whole and encoded in 77-position slices (chunks), in the loss,
the original's conditioning and every judged image."""

from __future__ import annotations

import pytest
import torch

from conftest import RESOLUTION, frozen_parts

SHORT = "a photo of a red circle on a wooden table"
LONG = " ".join([SHORT] * 7)  # 70 words, 70 tokens: more than 77 positions with P4D-K's 24 learned tokens


@pytest.fixture(scope="module")
def parts(assets):
    return frozen_parts(assets["sd"])


def test_slices_of_77_positions_are_encoded_each_on_its_own(parts):
    from common.long_prompts import encode_ids_in_slices
    from tools.attacks import optim

    te = parts.text_encoder
    ids = torch.randint(49406, (1, 100), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, 50] = 49406, 49407
    with torch.no_grad():
        out = encode_ids_in_slices(te, ids, 77)
        assert out.shape == (1, 100, te.config.hidden_size)
        assert torch.equal(out[:, :77], te(ids[:, :77], return_dict=False)[0])
        # The second slice alone: its positions from 0, no start-of-text added, nothing seen of the first slice.
        assert torch.equal(out[:, 77:], te(ids[:, 77:], return_dict=False)[0])
        # The embeddings path (P4D-K's learned prompt) gives the same states as the ids it holds.
        table = optim.token_table(te)
        assert torch.equal(optim.encode_embeds_in_slices(te, ids[0], table[ids[0]], 77), out)
        # A sequence that fits is one slice: encode_embeds itself.
        assert torch.equal(optim.encode_embeds_in_slices(te, ids[0, :77], table[ids[0, :77]], 77),
                           optim.encode_embeds(te, ids[0, :77], table[ids[0, :77]]))


def test_p4d_k_layout_keeps_a_long_prompt_whole_in_chunks_and_cuts_it_in_truncate(parts):
    from tools.attacks import p4d

    tok = parts.tokenizer
    words = tok.encode(LONG, add_special_tokens=False)
    assert len(words) == 70
    whole = p4d.layout_for(tok, LONG, "k", 16, 3, long_prompts="chunks")
    assert whole.ids.shape[0] == 70 + 24 + 2 and whole.num_adv == 70 // 3 + 1
    assert whole.ids[whole.prompt].tolist() == words  # every prompt token, in order
    assert whole.ids[0] == tok.bos_token_id and whole.ids[-1] == tok.eos_token_id and whole.end == 95
    assert whole.adv.tolist() == list(range(1, 95, 4))  # one slot before every 3 prompt tokens, the last at the end
    cut = p4d.layout_for(tok, LONG, "k", 16, 3)
    assert cut.ids.shape[0] == 77 and cut.ids[cut.prompt].tolist() == words[:56]  # 56 + 19 slots = 75
    # A prompt that fits: the same layout in both modes.
    short = [p4d.layout_for(tok, SHORT, "k", 16, 3, long_prompts=m) for m in ("truncate", "chunks")]
    assert torch.equal(short[0].ids, short[1].ids) and torch.equal(short[0].adv, short[1].adv)


def test_p4d_k_loss_and_target_read_the_whole_long_prompt(parts):
    from common.long_prompts import encode_ids_in_slices, padded_ids
    from tools.attacks import p4d

    tok, device = parts.tokenizer, torch.device("cpu")
    # The original's conditioning: 70 words + 20 = 90 positions, two slices; a short prompt: today's 77, same bits.
    target = p4d.NoiseTarget(parts, LONG, device, long_prompts="chunks")
    ids = padded_ids(tok, [LONG], 90)
    assert target.cond.shape[1] == 90 and ids[0, 89] == tok.eos_token_id
    assert torch.equal(target.cond[:, 77:], encode_ids_in_slices(parts.text_encoder, ids[:, 77:], 77))
    assert torch.equal(p4d.NoiseTarget(parts, SHORT, device, "chunks").cond,
                       p4d.NoiseTarget(parts, SHORT, device).cond)
    # The unlearned model's conditioning on the learned prompt: all 96 positions, and the loss depends on the tail.
    layout = p4d.layout_for(tok, LONG, "k", 16, 3, long_prompts="chunks")
    tokens = p4d.ProjectedTokens(parts, layout, 0.1, 0.1, torch.Generator().manual_seed(0))
    seen = []
    handle = parts.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, parts.unet.config.in_channels, 4, 4, generator=gen)
    noise, t = torch.randn(latents.shape, generator=gen), torch.tensor([500])
    try:
        loss, hard = tokens.loss(tokens.project(), latents, noise, t, torch.zeros_like(latents))
    finally:
        handle.remove()
    assert seen == [96] and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, [hard])
    assert grad[-1].abs().sum() > 0  # the last slot (position 93, the second slice) reaches the loss


def test_judged_images_render_long_texts_in_slices_and_short_ones_as_today(parts):
    from common.validation import build_pipeline, generate_images

    pipe = build_pipeline(parts, parts.unet)
    kw = dict(batch_size=2, num_inference_steps=1, guidance_scale=7.5, resolution=RESOLUTION)
    as_array = lambda images: [torch.tensor(list(im.getdata())) for im in images]  # noqa: E731
    # Each prompt alone today (a batch of one: batch size changes the bits of some CPU kernels).
    today = [as_array(generate_images(pipe, [p], [seed], **kw))[0] for p, seed in ((SHORT, 1), (LONG, 2))]
    # chunks: the batch splits by length (one prompt a batch here), the short prompt goes as text, the long one as
    # 90-position embeddings.
    chunks = as_array(generate_images(pipe, [SHORT, LONG], [1, 2], long_prompts="chunks", **kw))
    assert torch.equal(today[0], chunks[0])  # a short prompt: the same bits
    assert not torch.equal(today[1], chunks[1])  # the long one: its tail (cut today) is rendered


def _argv(assets, out, *extra, attack="p4d-k"):
    return ["--attack", attack, "--pretrained_model_name_or_path", assets["sd"], "--original_model", assets["sd"],
            "--prompts", assets["prompts"], "--criterion", "classifier", "--theme", "Nudity", "--bc_threshold",
            "0.5", "--output_dir", out, *extra]


def test_long_prompts_flag_defaults_published_value_and_refusals(assets, tmp_path, capsys, in_assets_root):
    from tools import attack_prompts as ap

    out = str(tmp_path / "o")
    args = ap.parse_args(_argv(assets, out))
    assert ap.attack_settings(args)["long_prompts"] == "truncate"
    args = ap.parse_args(_argv(assets, out, "--protocol", "published", "--p4d_variant", "joycenerd"))
    assert args.long_prompts == "chunks" and ap.attack_settings(args)["long_prompts"] == "chunks"
    assert ap.parse_args(_argv(assets, out, "--long_prompts", "chunks")).long_prompts == "chunks"
    assert "long_prompts" not in ap.attack_settings(ap.parse_args(_argv(assets, out, attack="p4d-n")))
    # A replay of a chunked P4D-K run's prompts draws them in slices too, when asked; by default as before.
    assert ap.attack_settings(ap.parse_args(_argv(assets, out, "--long_prompts", "chunks", attack="replay"))
                              )["long_prompts"] == "chunks"
    assert "long_prompts" not in ap.attack_settings(ap.parse_args(_argv(assets, out, attack="replay")))
    for extra, attack, expected in (
            (["--long_prompts", "chunks"], "p4d-n", "--long_prompts chunks: only with --attack p4d-k"),
            (["--long_prompts", "chunks", "--protocol", "published"], "p4d-k", "not with --p4d_variant dma"),
            (["--long_prompts", "truncate", "--protocol", "published", "--p4d_variant", "joycenerd"], "p4d-k",
             "--long_prompts truncate: --protocol published sets chunks")):
        with pytest.raises(SystemExit) as exc:
            ap.parse_args(_argv(assets, out, *extra, attack=attack))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
