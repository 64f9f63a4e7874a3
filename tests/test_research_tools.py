"""tools/generate_training_data.py and tools/train_classifier.py on tiny models (issue 7)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tools import classifier_training as ct
from tools import datagen
from common.errors import InputError
from conftest import RESOLUTION, launch


def run_direct(script, args, cwd):
    """Run a tool with plain python (accelerate launch reports a child's exit 2 as 1)."""
    return launch(script, args, cwd, timeout=300)

# ---- pure functions ---------------------------------------------------------------------------------


def test_read_concepts_json_and_text(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"templates": ["a photo of a {concept}", "{concept} on a table"],
                             "concepts": ["cassette player", {"name": "golf ball", "prompts": ["a {concept} on grass"]}]}))
    cs = datagen.read_concepts(str(j))
    assert [c.name for c in cs] == ["cassette player", "golf ball"]
    assert cs[0].prompts == ("a photo of a cassette player", "cassette player on a table")
    assert cs[1].prompts == ("a golf ball on grass",)
    t = tmp_path / "c.txt"
    t.write_text("# general first\nchurch\n\ngolf ball: a golf ball | a ball for {concept}s  # close\n")
    cs = datagen.read_concepts(str(t), templates=["an image of {concept}"])
    assert [(c.name, c.prompts) for c in cs] == [("church", ("an image of church",)),
                                                  ("golf ball", ("a golf ball", "a ball for golf balls"))]


@pytest.mark.parametrize("text,name,msg", [
    ("[]", "c.json", "no concepts"), ("{", "c.json", "not valid JSON"), ('[{"prompts": []}]', "c.json", "a name"),
    ('["x {bad}"]', "c.json", None), ("x: {other}", "c.txt", "cannot be filled"),
])
def test_read_concepts_errors(tmp_path, text, name, msg):
    p = tmp_path / name
    p.write_text(text)
    if msg is None:  # a name with braces is fine: only templates are formatted
        assert datagen.read_concepts(str(p))[0].prompts == ("a photo of a x {bad}",)
        return
    with pytest.raises(InputError, match=msg):
        datagen.read_concepts(str(p))


def test_plan_images_order_prompts_and_seeds():
    cs = [datagen.Concept("a b", ("p0", "p1")), datagen.Concept("c", ("q",))]
    jobs = datagen.plan_images(cs, 3, seed=5)
    assert [(j.chunk, j.index, j.prompt) for j in jobs] == [(0, 0, "p0"), (0, 1, "p1"), (0, 2, "p0"),
                                                           (1, 0, "q"), (1, 1, "q"), (1, 2, "q")]
    assert jobs[0].file_name == "images/000-a-b/0000.png" and jobs[5].file_name == "images/001-c/0002.png"
    assert len({j.seed for j in jobs}) == 6
    assert datagen.curriculum_string(2, 3) == "3,6"


def test_binary_metrics_hand_computed():
    m = ct.binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert math.isnan(ct.binary_metrics([0, 0], [0, 0])["recall"])


def test_stratified_split_is_seeded_and_per_class():
    pos, neg = [f"p{i}" for i in range(10)], [f"n{i}" for i in range(20)]
    a = ct.stratified_split(pos, neg, 0.2, seed=1)
    assert sum(y for _, y in a.heldout) == 2 and len(a.heldout) == 6 and len(a.train) == 24
    assert a == ct.stratified_split(pos, neg, 0.2, seed=1) and a != ct.stratified_split(pos, neg, 0.2, seed=2)
    assert not {p for p, _ in a.heldout} & {p for p, _ in a.train}


# ---- generate_training_data.py ------------------------------------------------------------------------


def _gen_args(assets, concepts, out, *extra):
    return ["--pretrained_model_name_or_path", assets["sd"], "--concepts", concepts, "--output_dir", out,
            "--images_per_concept", 3, "--batch_size", 2, "--num_inference_steps", 2, "--resolution", RESOLUTION,
            "--seed", 7, *extra]


def test_generate_training_data_order_resume_and_use(assets, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("blue square: a blue square | a picture of a blue square\nred circle\n")
    out = str(tmp_path / "gen")
    r = launch("tools/generate_training_data.py", _gen_args(assets, str(concepts), out,
                                                            "--template", "a {concept}"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--curriculum 3,6" in r.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    assert [r_["prompt"] for r_ in rows] == ["a blue square", "a picture of a blue square", "a blue square",
                                            "a red circle", "a red circle", "a red circle"]
    assert [r_["chunk"] for r_ in rows] == [0, 0, 0, 1, 1, 1]
    from common.validation import image_seed

    assert [r_["seed"] for r_ in rows] == [image_seed(7, i, j) for i in range(2) for j in range(3)]
    first = {r_["file_name"]: os.path.getmtime(os.path.join(out, r_["file_name"])) for r_ in rows}
    from PIL import Image

    kept = np.asarray(Image.open(os.path.join(out, rows[4]["file_name"])))
    # Resume: delete one image, truncate another; a rerun regenerates exactly those two, identically.
    os.remove(os.path.join(out, rows[1]["file_name"]))
    with open(os.path.join(out, rows[4]["file_name"]), "r+b") as f:
        f.truncate(20)
    r = launch("tools/generate_training_data.py", _gen_args(assets, str(concepts), out,
                                                            "--template", "a {concept}"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 present, 2 to generate" in r.stdout
    for name, mtime in first.items():
        changed = os.path.getmtime(os.path.join(out, name)) != mtime
        assert changed == (name in (rows[1]["file_name"], rows[4]["file_name"])), name
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, rows[4]["file_name"]))), kept)
    # Other settings in the same folder: refused before loading anything, exit 2.
    r = run_direct("tools/generate_training_data.py", _gen_args(assets, str(concepts), out), tmp_path)
    assert r.returncode == 2 and "other settings (concepts)" in r.stderr
    # The dataset is accepted as it stands by the fine-tuning scripts' loader, in this order.
    from common.data import read_metadata

    paths, captions = read_metadata(out, "prompt")
    assert captions == [r_["prompt"] for r_ in rows]


@pytest.mark.two_processes
def test_generate_training_data_two_processes_match_one(assets, tmp_path):
    concepts = tmp_path / "c.json"
    concepts.write_text(json.dumps(["green triangle", "red circle"]))
    outs = []
    for n in (1, 2):
        outs.append(str(tmp_path / f"gen{n}"))
        r = launch("tools/generate_training_data.py", _gen_args(assets, str(concepts), outs[-1]), tmp_path,
                   num_processes=n)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"to generate on {n} process(es)" in r.stdout, r.stdout  # shared out, not run twice alone
    from PIL import Image

    one, two = (open(os.path.join(o, "metadata.jsonl")).read() for o in outs)
    assert one == two
    for row in map(json.loads, one.splitlines()):
        a, b = (np.asarray(Image.open(os.path.join(o, row["file_name"]))).astype(int) for o in outs)
        assert np.abs(a - b).max() <= 1, row["file_name"]  # gloo vs none: bit-identical or within one level


def test_generate_training_data_bad_input(assets, tmp_path):
    r = run_direct("tools/generate_training_data.py", _gen_args(assets, str(tmp_path / "none.txt"),
                                                                str(tmp_path / "o")), tmp_path)
    assert r.returncode == 2 and "--concepts" in r.stderr and "no such file" in r.stderr
    assert not os.path.exists(tmp_path / "o")


# ---- train_classifier.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """Red shapes (positive) vs blue and green shapes (negative), 32 px, 24 + 24 images."""
    from tools.tiny import draw_shape

    root = tmp_path_factory.mktemp("clfdata")
    rng = np.random.default_rng(0)
    for label, colours in (("positive", ["red"]), ("negative", ["blue", "green"])):
        os.makedirs(root / label)
        for i in range(24):
            draw_shape(rng.choice(["circle", "square", "triangle"]), colours[i % len(colours)], RESOLUTION,
                       rng).save(root / label / f"{i:03d}.png")
    return root


def test_train_classifier_transformers_reaches_high_accuracy_and_eval_accepts_it(assets, separable, tmp_path):
    from tools.tiny import tiny_vit_backbone

    backbone = tiny_vit_backbone(str(tmp_path / "backbone"), image_size=RESOLUTION, seed=0)
    out = str(tmp_path / "clf")
    r = launch("tools/train_classifier.py", ["--train_dir", separable, "--concept", "red thing", "--output_dir", out,
                                             "--model_name_or_path", backbone, "--num_epochs", 8, "--batch_size", 8,
                                             "--learning_rate", "3e-3", "--validation_split", 0.25], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["heldout_images"] == 12 and metrics["train_images"] == 36
    assert metrics["heldout"]["accuracy"] >= 0.9, metrics["history"]
    assert "held-out accuracy" in r.stdout
    from common.classifier import ConceptClassifier
    from tools.tiny import draw_shape

    clf = ConceptClassifier(out)
    rng = np.random.default_rng(5)
    fresh = [draw_shape("circle", c, RESOLUTION, rng) for c in ["red"] * 8 + ["blue"] * 8]
    assert np.mean(np.array(clf.predict(fresh)) == np.array([1] * 8 + [0] * 8)) >= 0.85
    # Its output directory works as eval_model.py's EVAL_MODEL_PATH.
    r = launch("eval_model.py", [assets["sd"], out, "red thing", "--prompt_file", assets["prompts"],
                                 "--images_per_prompt", 1, "--num_inference_steps", 2, "--clip_model", assets["clip"],
                                 "--resolution", RESOLUTION, "--output_dir", tmp_path / "eval"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "results.jsonl")]
    assert len(rows) == 1 and 0.0 <= rows[0]["classifier_accuracy"] <= 1.0 and rows[0]["images"] == 3


def test_train_classifier_timm_variant_loads_with_theme(separable, tmp_path):
    out = str(tmp_path / "style")
    r = launch("tools/train_classifier.py", ["--positive_dir", separable / "positive", "--negative_dir",
                                             separable / "negative", "--concept", "red style", "--output_dir", out,
                                             "--timm_arch", "test_vit", "--init_weights", "random",
                                             "--num_epochs", 6, "--batch_size", 8, "--learning_rate", "2e-3"],
               tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["kind"] == "timm" and metrics["heldout_images"] == 10
    assert metrics["heldout"]["accuracy"] >= 0.8, metrics["history"]
    from common.classifier import ConceptClassifier

    clf = ConceptClassifier(os.path.join(out, "classifier.safetensors"), theme="style", timm_arch="test_vit")
    from PIL import Image

    images = [Image.open(separable / "positive" / "000.png"), Image.open(separable / "negative" / "000.png")]
    assert len(clf.predict(images)) == 2


@pytest.mark.parametrize("argv,msg", [
    (["--concept", "x", "--output_dir", "o"], "no data"),
    (["--concept", "x", "--output_dir", "o", "--train_dir", "nowhere"], "--train_dir nowhere: no such directory"),
    (["--concept", "x", "--output_dir", "o", "--positive_dir", "P", "--negative_dir", "N", "--validation_split", "1"],
     "--validation_split"),
    (["--concept", "x", "--output_dir", "o", "--positive_dir", "P", "--negative_dir", "N", "--timm_arch", "nope"],
     "not a timm architecture"),
    (["--concept", "x", "--output_dir", "o", "--positive_dir", "P", "--negative_dir", "N", "--timm_arch", "test_vit"],
     "--timm_arch needs --init_weights FILE"),
])
def test_train_classifier_bad_input(separable, tmp_path, argv, msg):
    argv = [str(separable / "positive") if a == "P" else str(separable / "negative") if a == "N" else a for a in argv]
    r = run_direct("tools/train_classifier.py", argv, tmp_path)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
