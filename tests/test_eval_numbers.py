"""eval_model.py's numbers, recomputed by hand from the images it saved.

The classifier must say yes to some images and no to others, or an inverted
class index would pass: the tiny red-circle classifier says no to everything
the untrained tiny SD draws, so the test first runs an evaluation, then moves
the classifier's decision boundary (its head bias) to the middle of the saved
images' logit margins, and evaluates again with that classifier.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval_model
from common.data import read_prompts

IMAGES_PER_PROMPT = 3


def _evaluate(assets, classifier, out):
    argv = [assets["sd"], classifier, "red circle", f"--prompt_file={assets['prompts']}",
            "--images_per_prompt", str(IMAGES_PER_PROMPT), "--output_dir", out, "--num_inference_steps", "2",
            "--resolution", "32", "--clip_model", assets["clip"]]
    eval_model.main(eval_model.parse_args(argv))
    (row,) = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    return row


def _saved_images(row):
    """(prompt index, image) for each PNG in the row's folder, in file-name order."""
    out = []
    for name in sorted(n for n in os.listdir(row["image_dir"]) if n.endswith(".png")):
        k = int(re.match(r"p(\d+)_\d+\.png$", name).group(1))
        out.append((k, Image.open(os.path.join(row["image_dir"], name)).convert("RGB")))
    return out


def _margins(classifier_dir, images):
    """logit(concept) - logit(other) per image, straight from the transformers model."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(classifier_dir).eval()
    proc = AutoImageProcessor.from_pretrained(classifier_dir)
    with torch.no_grad():
        logits = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"]).logits
    return (logits[:, 1] - logits[:, 0]).numpy()


def _split_classifier(src, dst, margins):
    """A copy of ``src`` whose concept-class bias puts the boundary between the middle two margins."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    m = np.sort(margins)
    mid = len(m) // 2
    assert m[mid - 1] < m[mid], "tied margins: the images do not separate"
    model = AutoModelForImageClassification.from_pretrained(src)
    with torch.no_grad():
        model.classifier.bias[1] -= float(m[mid - 1] + m[mid]) / 2
    model.save_pretrained(dst)
    AutoImageProcessor.from_pretrained(src).save_pretrained(dst)
    return dst


def _hand_clip(clip_dir, images, texts):
    """Cosine of CLIP image and text embeddings, from the model's towers and projections."""
    from transformers import CLIPModel, CLIPProcessor

    m, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        img = m.visual_projection(m.vision_model(pixel_values=proc(images=images, return_tensors="pt")
                                                 ["pixel_values"]).pooler_output)
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        txt = m.text_projection(m.text_model(**tok).pooler_output)
    return [float(a @ b / (a.norm() * b.norm())) for a, b in zip(img, txt)]


def test_eval_model_scores_equal_a_recount_from_its_saved_images(assets, tmp_path):
    prompts = read_prompts(assets["prompts"])
    first = _evaluate(assets, assets["classifier"], str(tmp_path / "first"))
    saved = _saved_images(first)
    assert len(saved) == first["images"] == len(prompts) * IMAGES_PER_PROMPT
    # Images of the same prompt differ from each other (seeded by prompt and image index).
    for k in range(len(prompts)):
        arrays = [np.asarray(im, dtype=int) for j, im in saved if j == k]
        assert all(np.abs(a - b).max() > 0 for i, a in enumerate(arrays) for b in arrays[i + 1:])
    classifier = _split_classifier(assets["classifier"], str(tmp_path / "split"),
                                   _margins(assets["classifier"], [im for _, im in saved]))

    row = _evaluate(assets, classifier, str(tmp_path / "second"))
    images = [im for _, im in _saved_images(row)]
    texts = [prompts[k] for k, _ in _saved_images(row)]
    # Classifier accuracy: the share of images whose concept logit wins, recounted; neither 0 nor 1 by construction.
    want_acc = float(np.mean(_margins(classifier, images) > 0))
    assert 0 < want_acc < 1
    assert row["classifier_accuracy"] == pytest.approx(want_acc, abs=1e-12)
    # CLIP: mean cosine of each image with its own prompt, and the x100 column is the same number.
    want_clip = float(np.mean(_hand_clip(assets["clip"], images, texts)))
    assert row["clip_cosine"] == pytest.approx(want_clip, abs=1e-5)
    assert row["clip_logit_scale"] == pytest.approx(100 * want_clip, abs=1e-3)
    # Scoring each image against another prompt would give another mean: the pairing is what is checked.
    shifted = texts[IMAGES_PER_PROMPT:] + texts[:IMAGES_PER_PROMPT]
    assert abs(float(np.mean(_hand_clip(assets["clip"], images, shifted))) - want_clip) > 1e-4


def test_images_mode_scores_a_saved_folder_as_when_it_was_generated(assets, tmp_path, capsys):
    import shutil

    row = _evaluate(assets, assets["classifier"], str(tmp_path / "gen"))
    argv = [row["image_dir"], assets["classifier"], "red circle", "--images", "--output_dir", str(tmp_path / "img"),
            "--clip_model", assets["clip"]]
    (again,) = eval_model.main(eval_model.parse_args(argv))
    # metadata.jsonl beside the images gives each its prompt: the same images, the same numbers, no pipeline.
    assert again["images"] == row["images"]
    assert (again["clip_cosine"], again["classifier_accuracy"]) == (row["clip_cosine"], row["classifier_accuracy"])
    assert json.loads(open(tmp_path / "img" / "results.jsonl").readline())["clip_cosine"] == row["clip_cosine"]
    # Without metadata, p{k}_{j}.png names and --prompt_file give the same pairing.
    bare = tmp_path / "bare"
    shutil.copytree(row["image_dir"], bare, ignore=shutil.ignore_patterns("metadata.jsonl"))
    (third,) = eval_model.main(eval_model.parse_args([str(bare), assets["classifier"], "red circle", "--images",
                                                      "--prompt_file", assets["prompts"], "--output_dir",
                                                      str(tmp_path / "bare_out"), "--clip_model", assets["clip"]]))
    assert third["clip_cosine"] == row["clip_cosine"]
    # Neither: one clear line, exit 2, before any model loads.
    with pytest.raises(SystemExit) as exc:
        eval_model.parse_args([str(bare), assets["classifier"], "red circle", "--images"])
    assert exc.value.code == 2 and "give --prompt_file" in capsys.readouterr().err


def test_eval_model_samples_with_50_steps_by_default(assets, tmp_path, monkeypatch):
    """The published evaluation calls the pipeline with its default, 50 steps; the default reaches the pipeline."""
    from diffusers import StableDiffusionPipeline

    seen = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *a, **kw):
        seen.append(kw["num_inference_steps"])
        out = original(self, *a, **kw)
        seen.append(len(self.scheduler.timesteps))
        return out

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    args = eval_model.parse_args([assets["sd"], "none", "red circle", f"--prompt_file={assets['prompts']}",
                                  "--images_per_prompt", "1", "--output_dir", str(tmp_path / "e"),
                                  "--resolution", "32", "--clip_model", assets["clip"]])
    assert args.num_inference_steps == 50
    eval_model.main(args)
    assert seen == [50, 50]
