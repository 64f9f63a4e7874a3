import numpy as np
import pytest
import torch

from common.clip_score import ClipScorer
from common.models import load_sd_parts
from tools.tiny import draw_shape
from common.validation import build_pipeline, generate_images, image_seed


def test_clip_score_equals_hand_cosine(assets):
    scorer = ClipScorer(assets["clip"])
    rng = np.random.default_rng(0)
    images = [draw_shape("circle", "red", 32, rng), draw_shape("square", "blue", 32, rng)]
    texts = ["a red circle", "a blue square"]
    got = scorer.score(images, texts)
    # By hand, from the model's towers and projections.
    m, proc = scorer.model, scorer.processor
    with torch.no_grad():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        txt = m.text_projection(m.text_model(**tok).pooler_output)
    want = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(img, txt)]
    assert got == pytest.approx(want, abs=1e-5)
    assert all(-1 <= s <= 1 for s in got)


def test_image_seed_is_deterministic_and_distinct():
    # Pinned values (numpy's SeedSequence of [seed, prompt, image(, stream)]): the same in every process and
    # session, so a run's validation images never depend on the interpreter; stream 0 leaves the old seeds as they were.
    assert image_seed(0, 3) == image_seed(0, 3, 0, 0) == 5611424052063861358
    assert image_seed(0, 3, 0, 1) == 3388623668888174563 and image_seed(7, 0) == 4474668370826950401
    seeds = {image_seed(s, k, j) for s in range(3) for k in range(5) for j in range(2)}
    assert len(seeds) == 30


def test_validation_image_does_not_depend_on_batch_size(assets):
    parts = load_sd_parts(assets["sd"])
    pipe = build_pipeline(parts, parts.unet)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    seeds = [image_seed(7, k) for k in range(3)]
    one = generate_images(pipe, prompts, seeds, batch_size=1, num_inference_steps=3, resolution=32)
    three = generate_images(pipe, prompts, seeds, batch_size=3, num_inference_steps=3, resolution=32)
    # Alone, in the middle of a batch, or after other prompts: the same image.
    shifted = generate_images(pipe, prompts[1:], seeds[1:], batch_size=2, num_inference_steps=3, resolution=32)
    a = [np.asarray(im, dtype=int) for im in one]
    b = [np.asarray(im, dtype=int) for im in three]
    c = [np.asarray(im, dtype=int) for im in shifted]
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1  # uint8 rounding of float noise between batch shapes
    for x, y in zip(a[1:], c):
        assert np.abs(x - y).max() <= 1
    assert np.abs(a[0] - a[1]).max() > 10  # different seeds give different images


def test_generation_precision_leaves_fp32_as_it_was_and_autocasts_half_precision(assets, monkeypatch):
    """eval_model.py's pipelines in the generation precision: all fp32 on a CPU (no autocast, the same images as
    without the policy); under bf16 the text encoder and VAE in bf16, the UNet in fp32 under autocast."""
    import functools

    from common.evaluation import generation_dtype, load_pipeline
    from common.validation import generation_precision

    monkeypatch.delenv("REVIVAL_EMULATE_FP16", raising=False)
    prompts, seeds = ["a red circle", "a blue square"], [image_seed(3, k) for k in range(2)]
    dtype = generation_dtype("fp16", cuda=False)  # fp16 needs CUDA: fp32 here
    pipe = load_pipeline(assets["sd"], torch.device("cpu"), dtype)
    assert dtype == torch.float32 and {pipe.text_encoder.dtype, pipe.vae.dtype, pipe.unet.dtype} == {torch.float32}
    with generation_precision(pipe):
        assert not torch.is_autocast_enabled("cpu")
    plain = generate_images(pipe, prompts, seeds, 2, num_inference_steps=2, resolution=32)
    policy = generate_images(pipe, prompts, seeds, 2, num_inference_steps=2, resolution=32,
                             autocast=functools.partial(generation_precision, pipe))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, policy))
    half = load_pipeline(assets["sd"], torch.device("cpu"), generation_dtype("bf16", cuda=False))
    assert (half.text_encoder.dtype, half.vae.dtype, half.unet.dtype) == (torch.bfloat16, torch.bfloat16,
                                                                           torch.float32)
    with generation_precision(half):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert len(generate_images(half, prompts, seeds, 2, num_inference_steps=2, resolution=32,
                               autocast=functools.partial(generation_precision, half))) == 2


def test_open_clip_models_are_selectable_and_score_by_hand(tmp_path):
    import json

    import open_clip

    from common.clip_score import check_clip_spec

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "revival-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path))
    scorer = ClipScorer("open_clip:revival-tiny")
    rng = np.random.default_rng(1)
    images = [draw_shape("ring", "green", 32, rng), draw_shape("cross", "white", 32, rng)]
    texts = ["a green ring", "a white cross"]
    with torch.no_grad():
        img = scorer.model.encode_image(torch.stack([scorer.preprocess(im) for im in images]))
        txt = scorer.model.encode_text(scorer.tokenizer(texts))
    want = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(img, txt)]
    assert scorer.score(images, texts) == pytest.approx(want, abs=1e-5)
    from common.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        check_clip_spec("open_clip:ViT-B-32:/nonexistent/weights.bin")


def test_eval_generation_precision_follows_mixed_precision(capsys):
    import torch

    from common.evaluation import generation_dtype

    assert generation_dtype(None, cuda=True) == torch.float16  # the published evaluation's fp16 on a GPU
    assert generation_dtype(None, cuda=False) == torch.float32
    assert generation_dtype("no", cuda=True) == torch.float32
    assert generation_dtype("bf16", cuda=True) == torch.bfloat16
    assert capsys.readouterr().err == ""
    assert generation_dtype("fp16", cuda=False) == torch.float32  # fp16 needs CUDA: fp32, with one warning
    assert "needs CUDA" in capsys.readouterr().err
