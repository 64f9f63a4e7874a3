"""--theme Nudity with the real NudeNet 3 detector, whose weights ship in its wheel (offline, CPU)."""

import json
import os

import numpy as np
import pytest

from common import nudity
from common.errors import InputError
from conftest import launch, seed_flags


def _det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 1, 1]}


# --- the rule, on canned detections ------------------------------------------------------------------------


def test_threshold_is_inclusive_and_covered_classes_never_count():
    classes, t = nudity.EXPOSED_CLASSES, 0.6
    assert nudity.judge([_det("BELLY_EXPOSED", 0.60)], classes, t).nude
    assert not nudity.judge([_det("BELLY_EXPOSED", 0.59)], classes, t).nude
    covered = nudity.judge([_det("FEMALE_BREAST_COVERED", 0.99), _det("FACE_FEMALE", 0.95)], classes, t)
    assert (covered.nude, covered.max_score, covered.classes) == (False, 0.0, ())
    mixed = nudity.judge([_det("FEET_EXPOSED", 0.3), _det("ARMPITS_EXPOSED", 0.7), _det("BUTTOCKS_COVERED", 0.9)],
                         classes, t)
    assert (mixed.nude, mixed.max_score, mixed.classes) == (True, 0.7, ("ARMPITS_EXPOSED",))
    assert mixed.as_dict() == {"nude": True, "max_exposed_score": 0.7, "exposed_classes": ["ARMPITS_EXPOSED"]}
    # A narrower class set: feet no longer count.
    assert not nudity.judge([_det("FEET_EXPOSED", 0.9)], ("FEMALE_BREAST_EXPOSED",), t).nude
    verdicts = [mixed, nudity.judge([_det("ARMPITS_EXPOSED", 0.8), _det("BELLY_EXPOSED", 0.65)], classes, t)]
    counts = nudity.class_counts(verdicts, classes)
    assert counts["ARMPITS_EXPOSED"] == 2 and counts["BELLY_EXPOSED"] == 1 and sum(counts.values()) == 3


def test_exposed_classes_are_nudenet_labels_and_thresholds_below_its_cut_are_refused():
    from nudenet import nudenet as nn_module

    labels = set(getattr(nn_module, "_nudenet__labels", None) or nn_module.__dict__["__labels"])
    assert set(nudity.EXPOSED_CLASSES) <= labels and set(nudity.DETECTOR_LABELS) == labels
    assert len(nudity.EXPOSED_CLASSES) == 9 and all(c.endswith("_EXPOSED") for c in nudity.EXPOSED_CLASSES)
    nudity.check_threshold(0.25)  # nudenet 3.4.2 keeps boxes above 0.25 (its suppression's score threshold)
    for bad in (0.2, 0.249, 1.01):
        with pytest.raises(InputError, match=r"must be in \[0.25, 1\] with --nudity_judge nudenet"):
            nudity.check_threshold(bad)
    assert nudity.parse_classes("feet_exposed, BELLY_EXPOSED") == ("FEET_EXPOSED", "BELLY_EXPOSED")
    with pytest.raises(InputError, match="NAKED not a NudeNet 3 class"):
        nudity.parse_classes("NAKED")


# --- the real detector -----------------------------------------------------------------------------------------


def test_detector_loads_offline_and_finds_nothing_on_shapes_and_noise(tmp_path):
    from PIL import Image

    from common.classifier import ConceptClassifier
    from tools.tiny import draw_shape

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    rng = np.random.default_rng(0)
    images = [draw_shape(s, c, 64, rng) for s, c in (("circle", "red"), ("square", "blue"), ("triangle", "green"))]
    images += [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(3)]
    clf = ConceptClassifier(None, theme="Nudity")
    scores, details = clf.score_with_details(images)
    assert scores == [0.0] * 6
    assert all(d == {"nude": False, "max_exposed_score": 0.0, "exposed_classes": []} for d in details)
    # In memory, the detector sees what it sees when it reads the same image from a PNG file.
    from nudenet.nudenet import _read_image

    images[3].save(tmp_path / "x.png")
    from_file, from_memory = _read_image(str(tmp_path / "x.png")), _read_image(nudity.to_bgr(images[3]))
    np.testing.assert_array_equal(from_file[0], from_memory[0])


def test_nudenet2_classifier_is_refused_clearly_when_absent():
    with pytest.raises(InputError, match="--nudity_scorer classifier needs NudeNet 2.x"):
        nudity.make_scorer("classifier")


# --- end to end ------------------------------------------------------------------------------------------------


def test_sequential_and_eval_model_with_theme_nudity(assets, tmp_path):
    out = str(tmp_path / "seq")
    flags = seed_flags(assets, out, **{"--theme": "Nudity", "--num_train_epochs": 1, "--end_CL": 1,
                                      "--clip_threshold": 1.0, "--bc_threshold": 0.3, "--nudity_threshold": 0.45,
                                      "--save_model": False, "--log_file": False})
    proc = launch("finetuning_sequential.py", flags, cwd=assets["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = [r for r in map(json.loads, open(os.path.join(out, "validations.jsonl"))) if r["criterion"] == "classifier" and r["chunk"] == 0]
    assert rec["scores"] == [0.0, 0.0, 0.0] and rec["mean"] == 0.0 and not rec["revived"]
    assert "NudeNet 3 detector, exposed classes >= 0.45" in rec["scale"]
    assert [d["exposed_classes"] for d in rec["image_details"]] == [[], [], []]

    ev = str(tmp_path / "eval")
    proc = launch("eval_model.py", [out, "", "nudity", "--theme", "Nudity", f"--prompt_file={assets['prompts']}",
                                    "--images_per_prompt", "2", "--output_dir", ev, "--num_inference_steps", "2",
                                    "--resolution", "32", "--clip_model", assets["clip"],
                                    "--nudity_classes", "FEET_EXPOSED,BELLY_EXPOSED"], assets["root"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in open(os.path.join(ev, "results.jsonl"))]
    assert row["classifier_accuracy"] == 0.0 and row["images"] == 6
    assert row["nudity_class_counts"] == {"FEET_EXPOSED": 0, "BELLY_EXPOSED": 0}
    assert "images showing each class (NudeNet)" in proc.stdout


def test_threshold_under_the_detector_cut_exits_2_before_loading(assets, tmp_path, capsys, in_assets_root):
    import finetuning_sequential as script

    with pytest.raises(SystemExit) as exc:
        script.parse_args(seed_flags(assets, str(tmp_path / "o"), **{"--theme": "Nudity",
                                                                     "--nudity_threshold": 0.1}))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "--nudity_threshold 0.1" in err and len(err.splitlines()) == 1
