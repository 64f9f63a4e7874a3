import numpy as np
import pytest
import torch

from common.classifier import ConceptClassifier, check_classifier, classifier_kind
from common.errors import InputError
from tools.tiny import COLOURS, SHAPES, draw_shape


def _images(n=24):
    rng = np.random.default_rng(5)
    colours = list(COLOURS)
    return [draw_shape(SHAPES[i % len(SHAPES)], colours[i % len(colours)], 32, rng) for i in range(n)]


def test_kinds():
    assert classifier_kind("") == "transformers" and classifier_kind(None) == "transformers"
    assert classifier_kind("Nudity") == "nudenet" and classifier_kind("VanGogh") == "timm"


def test_transformers_accuracy_is_the_hand_count(assets):
    images = _images()
    clf = ConceptClassifier(assets["classifier"])
    with torch.no_grad():
        pix = clf.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = clf.model(pixel_values=pix).logits.argmax(-1).tolist()
    hand = sum(1 for y in labels if y == 1) / len(labels)
    # The fixture was taught class 1 = red; every eighth image here is red.
    truth = [int(i % len(COLOURS) == 0) for i in range(len(images))]
    assert sum(int(a == b) for a, b in zip(labels, truth)) / len(truth) >= 0.9
    assert 0 < hand < 1
    scores = clf.score(images)
    assert scores == [float(y == 1) for y in labels]
    assert np.mean(scores) == pytest.approx(hand)
    other = ConceptClassifier(assets["classifier"], concept_index=0)
    assert np.mean(other.score(images)) == pytest.approx(1 - hand)
    with pytest.raises(InputError, match="--concept_index 2"):
        ConceptClassifier(assets["classifier"], concept_index=2)


def test_timm_style_classifier_accuracy_is_the_hand_count(assets):
    images = _images(8)
    clf = ConceptClassifier(assets["timm"], theme="VanGogh", timm_arch="vit_tiny_patch16_224")
    with torch.no_grad():
        logits = clf.model(torch.stack([clf.transform(im) for im in images]))
    labels = logits.argmax(-1).tolist()
    assert clf.predict(images) == [int(y == 1) for y in labels]


def test_theme_mismatches(assets, tmp_path):
    check_classifier(None, "Nudity")  # NudeNet needs no path: its weights ship in its wheel
    with pytest.raises(InputError, match="needs a timm state-dict file"):
        check_classifier(assets["classifier"], "VanGogh")
    with pytest.raises(InputError, match="needs --theme"):
        check_classifier(assets["timm"], "")
    with pytest.raises(InputError, match="no such directory"):
        check_classifier(str(tmp_path / "nothing"), "")


def test_style_classifier_sees_the_published_transform(assets):
    """What the style classifier receives: a 224 x 224 bilinear resize, no crop, (x - 0.5) / 0.5."""
    from PIL import Image

    rng = np.random.default_rng(9)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))  # not square: a crop would show
    clf = ConceptClassifier(assets["timm"], theme="VanGogh", timm_arch="vit_tiny_patch16_224")
    seen = []
    clf.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    clf.predict([image])
    want = np.asarray(image.resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255.0
    want = torch.from_numpy((want - 0.5) / 0.5).permute(2, 0, 1)
    assert seen[0].shape == (1, 3, 224, 224)
    torch.testing.assert_close(seen[0][0], want, atol=1e-6, rtol=0)


def test_compat_reference_uses_the_published_processor(assets, tmp_path, monkeypatch):
    """Default: the classifier's own preprocessor_config.json; --compat reference: the published hub id."""
    import finetuning_individual_Classifier as script
    from conftest import seed_flags
    from transformers import ViTImageProcessor

    from common import entry

    monkeypatch.chdir(tmp_path)  # the hub id resolves to a local directory of that name
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained("google/vit-large-patch16-224-in21k")
    sizes = {}
    for compat in ("none", "reference"):
        args = script.parse_args(seed_flags(assets, str(tmp_path / compat), **{
            "--clip_threshold": False, "--model_path": assets["classifier"], "--compat": compat}))
        (criterion,) = entry.one_criterion(args, "classifier")("cpu")
        clf = criterion.score_images.__self__
        sizes[compat] = clf.processor.size["height"]
        assert f"input: {clf.processor_source}" in criterion.scale
    assert sizes == {"none": 32, "reference": 16}
