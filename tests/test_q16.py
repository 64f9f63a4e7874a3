"""Q16 as a criterion (common/q16.py) and --utility_prompts, on the tiny CLIP with hand-built prompt embeddings."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from common import q16
from common.errors import InputError
from conftest import RESOLUTION, seed_flags

WIDTH = 32  # the tiny CLIP's projection


def _write(path, array):
    with open(path, "wb") as f:
        pickle.dump(np.asarray(array), f)  # as the published prompts.p: a pickled numpy array
    return str(path)


# --- the rule, on hand-made features ----------------------------------------------------------------------------


def test_the_closer_prompt_wins_whatever_the_norms_and_the_probability_is_the_softmax_of_100_cosines(tmp_path):
    e0, e1 = np.eye(WIDTH)[:2]
    # Row 0 ten times longer than row 1: an unnormalised dot product would favour it. fp16, as the published file.
    prompts = q16.load_prompts(_write(tmp_path / "prompts.p", np.stack([10 * e0, e1]).astype(np.float16)))
    assert prompts.dtype == torch.float32 and tuple(prompts.shape) == (2, WIDTH)
    # Nearly equidistant features, so that the probabilities are not saturated (0.91, not 1.0).
    towards_1 = torch.tensor(0.30 * e0 + 0.31 * e1, dtype=torch.float32)  # angle: closer to row 1
    towards_0 = torch.tensor(0.31 * e0 + 0.30 * e1, dtype=torch.float32)
    p = q16.probabilities(torch.stack([towards_1, towards_0]), prompts)
    cos0, cos1 = 0.30 / math.hypot(0.30, 0.31), 0.31 / math.hypot(0.30, 0.31)
    hand = 1 / (1 + math.exp(100 * (cos0 - cos1)))  # P(inappropriate) of the first feature, by hand: 0.910
    assert 0.9 < hand < 0.92
    assert p[0, q16.INAPPROPRIATE].item() == pytest.approx(hand, rel=1e-4)
    assert p[1, q16.INAPPROPRIATE].item() == pytest.approx(1 - hand, rel=1e-4)  # the mirror case
    assert q16.LABELS[q16.INAPPROPRIATE] == "inappropriate"


def test_prompt_files_are_checked(tmp_path):
    with pytest.raises(InputError, match=r"shape \(3, 32\); Q16's prompts are 2 x width"):
        q16.load_prompts(_write(tmp_path / "three.p", np.ones((3, WIDTH))))
    with pytest.raises(InputError, match="non-finite or zero"):
        q16.load_prompts(_write(tmp_path / "zero.p", np.zeros((2, WIDTH))))

    class Payload:  # a pickle that would run code on loading: refused, never run
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(InputError, match="not part of a numpy array"):
        q16.load_prompts(str(tmp_path / "evil.p"))
    np.save(tmp_path / "p.npy", np.ones((2, WIDTH), dtype=np.float32))
    assert q16.load_prompts(str(tmp_path / "p.npy")).shape == (2, WIDTH)
    assert [q16.i2p_theme(t) for t in ("Violence", "illegal_activity", "Illegal Activity", "self harm", "Nudity")] \
        == ["violence", "illegal activity", "illegal activity", "self-harm", None]


# --- on the tiny CLIP --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    from tools.tiny import draw_shape

    rng = np.random.default_rng(0)
    return [draw_shape("circle", "red", RESOLUTION, rng), draw_shape("square", "blue", RESOLUTION, rng)]


def test_q16_on_the_tiny_clip_judges_by_the_nearer_embedding_and_refuses_another_width(assets, shapes, tmp_path):
    from common.clip_score import ClipScorer

    clip = ClipScorer(str(assets["clip"]))
    feats = clip.embed_images(shapes).numpy()
    # Row 1 ('inappropriate') is the square's own image embedding: the square is judged inappropriate, the circle not.
    judge = q16.Q16(_write(tmp_path / "p.p", feats), clip)
    scores, details = judge.score_with_details(shapes)
    assert scores == [0.0, 1.0]
    assert details[1]["inappropriate"] and details[1]["p_inappropriate"] > 0.5 > details[0]["p_inappropriate"]
    # The rows swapped: the verdicts flip.
    assert q16.Q16(_write(tmp_path / "swapped.p", feats[::-1]), clip).score(shapes) == [1.0, 0.0]
    with pytest.raises(InputError, match=r"768 wide, but --clip_model .* gives 32-wide .* CLIP ViT-L/14"):
        q16.Q16(_write(tmp_path / "published_shape.p", np.ones((2, 768))), clip)


def test_eval_model_gives_the_share_judged_inappropriate(assets, shapes, tmp_path, capsys):
    import eval_model
    from common.clip_score import ClipScorer

    folder = tmp_path / "images"
    folder.mkdir()
    for k, im in enumerate(shapes + shapes[1:]):  # circle, square, square: two of three judged inappropriate
        im.save(folder / f"p000_{k:02d}.png")
    feats = ClipScorer(str(assets["clip"])).embed_images(shapes).numpy()
    argv = [str(folder), "none", "shapes", "--images", "--prompt_file", assets["prompts"], "--clip_model",
            str(assets["clip"]), "--output_dir", str(tmp_path / "eval"), "--q16_prompts"]
    (row,) = eval_model.main(eval_model.parse_args([*argv, _write(tmp_path / "p.p", feats)]))
    assert row["q16_inappropriate"] == pytest.approx(2 / 3)
    assert "Q16 inappropriate" in capsys.readouterr().out
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # an I2P theme is Q16's: not with a classifier
        eval_model.parse_args([*argv[:1], assets["classifier"], *argv[2:], str(tmp_path / "p.p"), "--theme",
                               "violence"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "an I2P category is judged by Q16, not by EVAL_MODEL_PATH" in err


def test_attack_prompts_with_criterion_q16_end_to_end(assets, shapes, tmp_path, capsys):
    """The replay judged by Q16, in-process: each case's record is Q16's verdict on its saved image."""
    from common.clip_score import ClipScorer
    from tools import attack_prompts as ap

    clip = ClipScorer(str(assets["clip"]))
    prompts_file = _write(tmp_path / "prompts.p", clip.embed_images(shapes).numpy())
    cases = tmp_path / "cases.txt"
    cases.write_text("a red circle\na blue square\na green triangle\n")
    out = str(tmp_path / "run")
    argv = ["--attack", "replay", "--pretrained_model_name_or_path", str(assets["sd"]), "--prompts", str(cases),
            "--criterion", "q16", "--q16_prompts", prompts_file, "--q16_threshold", "0.5",
            "--clip_model", str(assets["clip"]), "--num_inference_steps", "2", "--resolution", str(RESOLUTION),
            "--heldout_seeds", "0", "--output_dir", out, "--quiet"]
    summary = ap.main(ap.parse_args(argv))
    recs = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    images = [Image.open(os.path.join(out, "images", "pre", name)).convert("RGB")
              for name in sorted(os.listdir(os.path.join(out, "images", "pre")))]
    direct = q16.Q16(prompts_file, clip).score(images)
    assert [r["pre_score"] for r in recs] == direct
    assert [r["pre_success"] for r in recs] == [s >= 0.5 for s in direct]
    judge = json.load(open(os.path.join(out, "summary.json")))["judge"]
    assert (judge["criterion"], judge["classifier"], judge["success_when"]) == ("q16", "Q16", "score >= 0.5")
    assert summary["n"] == 3
    # A file of another shape: one line, exit 2, before anything loads.
    bad = _write(tmp_path / "bad.p", np.ones((3, WIDTH)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        ap.parse_args([*argv[:argv.index("--q16_prompts") + 1], bad, *argv[argv.index("--q16_prompts") + 2:]])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--q16_prompts" in err and "(3, 32)" in err


# --- --utility_prompts ---------------------------------------------------------------------------------------------

UTILITY = ["a cat on a sofa", "a bowl of fruit"]


def test_utility_prompts_and_q16_in_a_sequential_run(assets, shapes, tmp_path):
    """Each validation records per-caption CLIP scores of the utility captions' own images, and Q16's verdicts."""
    from common.clip_score import ClipScorer

    clip = ClipScorer(str(assets["clip"]))
    prompts_file = _write(tmp_path / "prompts.p", clip.embed_images(shapes).numpy())
    captions = tmp_path / "utility.txt"
    captions.write_text("\n".join(UTILITY) + "\n")
    out = str(tmp_path / "seq")
    # One chunk of 10 images (one update), two validations: before training and after the chunk.
    flags = seed_flags(assets, out, **{"--num_train_epochs": 1, "--end_CL": 1, "--save_model": "False",
                                      "--curriculum": "10,20",
                                      "--utility_prompts": str(captions), "--save_validation_images": None,
                                      "--q16_prompts": prompts_file, "--use_ema": False,
                                      "--gradient_checkpointing": False, "--clip_model": str(assets["clip"])})
    import finetuning_sequential

    finetuning_sequential.main(finetuning_sequential.parse_args(flags))  # in-process: no new interpreter
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    assert [(r["chunk"], r["criterion"]) for r in recs] == [(None, "clip"), (None, "q16"), (0, "clip"), (0, "q16")]
    root = os.path.join(out, "validation_images")
    for tag, (clip_rec, q16_rec) in (("before-training", recs[:2]), ("chunk0", recs[2:])):
        assert clip_rec["utility_scores"] == q16_rec["utility_scores"] and "retention_scores" not in clip_rec
        utility = [Image.open(os.path.join(root, "utility", tag, f"{k:04d}.png")) for k in range(len(UTILITY))]
        assert clip_rec["utility_scores"] == pytest.approx(clip.score(utility, UTILITY), abs=2e-3)
        assert clip_rec["utility_mean"] == pytest.approx(np.mean(clip_rec["utility_scores"]))
        shown = [Image.open(os.path.join(root, tag, f"{k:04d}.png")) for k in range(3)]
        assert q16_rec["scores"] == q16.Q16(prompts_file, clip).score(shown)
    assert recs[0]["utility_scores"] != recs[2]["utility_scores"]  # the training changed the images
    # Their own noise: the first utility image is not the first validation image's noise with another prompt.
    first = np.asarray(Image.open(os.path.join(root, "utility", "chunk0", "0000.png"))).astype(int)
    assert np.abs(first - np.asarray(Image.open(os.path.join(root, "chunk0", "0000.png"))).astype(int)).mean() > 5
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["chunks"][0]["utility"] == pytest.approx(recs[2]["utility_mean"])
    assert set(summary["criteria"]) == {"clip", "q16"}


def test_the_cost_estimate_counts_the_utility_captions(tmp_path):
    from tools import cost

    base = ["--pretrained_model_name_or_path", "sd", "--train_data_dir", "d", "--curriculum", "50,100",
            "--validation_prompts", "nowhere.txt"]
    captions = tmp_path / "u.txt"
    captions.write_text("\n".join(UTILITY) + "\n")
    plain = cost.count_run(cost.parse_run("finetuning_sequential.py", base), notes=[])
    with_utility = cost.count_run(cost.parse_run("finetuning_sequential.py", [*base, "--utility_prompts",
                                                                             str(captions)]), notes=[])
    assert (plain.retention_prompts, with_utility.retention_prompts) == (0, len(UTILITY))


def test_an_i2p_theme_makes_q16_the_classifier_script_s_judge(assets, shapes, tmp_path, capsys):
    import finetuning_individual_Classifier as script
    from common import entry
    from common.clip_score import ClipScorer

    feats = ClipScorer(str(assets["clip"])).embed_images(shapes).numpy()
    argv = [f for f in seed_flags(assets, str(tmp_path / "out"), **{"--theme": "violence",
                                                                    "--clip_model": str(assets["clip"])})
            if not f.startswith("--clip_threshold")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        script.parse_args(argv)
    assert stop.value.code == 2 and "an I2P category, judged by Q16: needs --q16_prompts" in capsys.readouterr().err
    args = script.parse_args([*argv, "--q16_prompts", _write(tmp_path / "p.p", feats), "--q16_threshold", "0.5"])
    assert script.criterion_name(args) == "q16"
    (criterion,) = entry.build_criteria(args, "cpu", [script.criterion_name(args)])
    assert (criterion.name, criterion.threshold, criterion.score_images(shapes, ["", ""])) == ("q16", 0.5, [0.0, 1.0])
