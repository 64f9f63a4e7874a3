import numpy as np
import pytest
import torch

from common.classifier import ConceptClassifier, check_classifier, classifier_kind
from common.errors import InputError
from common.tiny import COLOURS, SHAPES, draw_shape


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


def test_nudenet_missing_and_theme_mismatches(assets, tmp_path):
    try:
        import nudenet  # noqa: F401
        pytest.skip("nudenet is installed here")
    except ImportError:
        pass
    with pytest.raises(InputError, match="pip install nudenet"):
        check_classifier(None, "Nudity")
    with pytest.raises(InputError, match="needs a timm state-dict file"):
        check_classifier(assets["classifier"], "VanGogh")
    with pytest.raises(InputError, match="needs --theme"):
        check_classifier(assets["timm"], "")
    with pytest.raises(InputError, match="no such directory"):
        check_classifier(str(tmp_path / "nothing"), "")
