"""tools/concept_inversion.py: textual inversion against the frozen unlearned (here: tiny) model.

One probe runs in-process (5 steps, validation every 2: at steps 0, 2, 4 and
the last, 5) and every test reads it: only the placeholder's embedding row
changes, the saved embedding reloads into a fresh pipeline with diffusers'
load_textual_inversion and makes the same images, the records and summary
agree with each other and with the thresholds. Bad inputs stop before anything
is written.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import RESOLUTION, launch
from tools import concept_inversion as ci

PLACEHOLDER, INITIALIZER, CONCEPT = "<concept>", "circle", "red circle"
STEPS, EVERY, BATCH, SEED = 5, 2, 2, 3
PROMPTS = ("a photo of a <concept>", "a <concept> on a grey background", "a blue square")  # the last: no token
CLIP_THRESHOLD = -1.0  # the tiny CLIP's random cosines all exceed it: crossed at step 0, a known answer


def _prompts(tmp, lines=PROMPTS) -> str:
    path = tmp / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _argv(assets, prompts: str, out: str, **over) -> list:
    flags = {"--pretrained_model_name_or_path": assets["sd"], "--train_data_dir": assets["data"],
             "--validation_prompts": prompts, "--placeholder_token": PLACEHOLDER,
             "--initializer_token": INITIALIZER, "--concept_name": CONCEPT, "--resolution": RESOLUTION,
             "--num_inference_steps": 2, "--max_train_steps": STEPS, "--validation_steps": EVERY,
             "--train_batch_size": BATCH, "--seed": SEED, "--clip_model": assets["clip"],
             "--clip_threshold": CLIP_THRESHOLD, "--model_path": assets["classifier"], "--output_dir": out,
             "--tag": "method=tiny", "--save_validation_images": None, "--quiet": None, "--center_crop": None}
    flags.update(over)
    argv = []
    for k, v in flags.items():
        if v is not False:
            argv += [k] if v is None else [k, str(v)]
    return argv


@pytest.fixture(scope="module")
def probe(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inversion")
    out = str(tmp / "probe")
    result = ci.main(ci.parse_args(_argv(assets, _prompts(tmp), out)))
    return {"out": out, "result": result}


@pytest.fixture(scope="module")
def original(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


def _records(out):
    from common.results import read_jsonl

    return read_jsonl(os.path.join(out, "validations.jsonl"))


def _json(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def test_only_the_placeholder_row_changes(probe, original):
    """The new row moved away from the initializer's; every other weight of every part is the original, bit for bit."""
    parts, token_id = probe["result"].parts, probe["result"].token_id
    vocab = len(original.tokenizer)
    assert token_id == vocab and len(parts.tokenizer) == vocab + 1
    assert parts.tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids == [token_id]
    init_id = original.tokenizer.encode(INITIALIZER, add_special_tokens=False)
    assert len(init_id) == 1

    before, after = original.text_encoder.state_dict(), parts.text_encoder.state_dict()
    assert before.keys() == after.keys()
    # Named by identity: transformers 5 names it embeddings.token_embedding.weight, 4 text_model.embeddings....
    table = parts.text_encoder.get_input_embeddings().weight
    emb = next(n for n, p in parts.text_encoder.named_parameters() if p is table)
    for name in before:
        if name != emb:
            assert torch.equal(before[name], after[name].cpu()), name
    old, new = before[emb], after[emb].cpu()
    assert new.shape == (vocab + 1, old.shape[1])
    changed = (new[:vocab] != old).any(dim=1).nonzero().flatten().tolist()
    assert changed == [], f"rows other than the placeholder's changed: {changed[:10]}"
    # The training prompts' words ("a", "photo", ...) had gradients: they stayed only because they were restored.
    assert not torch.equal(new[token_id], old[init_id[0]])

    for part in ("unet", "vae"):
        a, b = getattr(original, part).state_dict(), getattr(parts, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k].cpu()) for k in a), part

    saved = load_file(os.path.join(probe["out"], ci.EMBEDS_FILE))
    assert list(saved) == [PLACEHOLDER]
    assert saved[PLACEHOLDER].dtype == torch.float32 and saved[PLACEHOLDER].shape == (old.shape[1],)
    assert torch.equal(saved[PLACEHOLDER], new[token_id])


def test_saved_embedding_reloads_and_reproduces_the_images(probe, assets):
    """load_textual_inversion (token named by the file's key) into a fresh unlearned pipeline: same final images."""
    from common.models import load_sd_parts
    from common.validation import build_pipeline, generate_images, image_seed

    parts = load_sd_parts(assets["sd"])
    pipe = build_pipeline(parts, parts.unet)
    pipe.load_textual_inversion(os.path.join(probe["out"], ci.EMBEDS_FILE))
    assert parts.tokenizer.convert_tokens_to_ids(PLACEHOLDER) == probe["result"].token_id
    images = generate_images(pipe, PROMPTS, [image_seed(SEED, k) for k in range(len(PROMPTS))],
                             batch_size=len(PROMPTS), num_inference_steps=2, resolution=RESOLUTION)
    folder = os.path.join(probe["out"], ci.IMAGES_DIR, f"step-{STEPS:05d}")
    assert sorted(os.listdir(folder)) == [f"{k:04d}.png" for k in range(len(PROMPTS))]
    for k, im in enumerate(images):
        saved = np.asarray(Image.open(os.path.join(folder, f"{k:04d}.png")), dtype=np.int16)
        assert np.abs(np.asarray(im, dtype=np.int16) - saved).max() <= 1, k
    # The learned token matters: before training (step 0, the initializer's embedding) the first image differed.
    first = np.asarray(Image.open(os.path.join(probe["out"], ci.IMAGES_DIR, "step-00000", "0000.png")), np.int16)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - first).max() > 1


def test_records_summary_and_config(probe, assets):
    records, summary = _records(probe["out"]), _json(probe["out"], "summary.json")
    steps = [0, 2, 4, 5]
    assert ci.validation_steps(STEPS, EVERY) == steps
    assert [(r["step"], r["criterion"]) for r in records] == [(s, c) for s in steps for c in ("clip", "classifier")]
    thresholds = {"clip": CLIP_THRESHOLD, "classifier": 0.3}
    for r in records:
        assert len(r["scores"]) == len(PROMPTS)
        assert r["mean"] == pytest.approx(sum(r["scores"]) / len(r["scores"]))
        assert (r["min"], r["max"]) == (min(r["scores"]), max(r["scores"]))
        assert r["threshold"] == thresholds[r["criterion"]]
        assert r["revived"] == (r["mean"] > r["threshold"] if r["criterion"] == "clip" else r["mean"] >= r["threshold"])
        assert r["images_seen"] == r["step"] * BATCH
        assert (r["loss"] is None) == (r["step"] == 0) and (r["loss"] is None or r["loss"] > 0)
    assert summary["protocol"] == "inversion" and summary["criteria"] == thresholds and summary["steps"] == STEPS
    assert (summary["placeholder_token"], summary["initializer_token"], summary["concept_name"]) == (
        PLACEHOLDER, INITIALIZER, CONCEPT)
    for name in thresholds:
        mine = [r for r in records if r["criterion"] == name]
        assert summary["crossed"][name] == next((r["step"] for r in mine if r["revived"]), None)
        assert summary["final"][name] == mine[-1]["mean"]
        best = summary["best"][name]
        assert best["mean"] == max(r["mean"] for r in mine)
        assert best["step"] == next(r["step"] for r in mine if r["mean"] == best["mean"])  # the first at the best
    assert summary["crossed"]["clip"] == 0  # the threshold every cosine exceeds
    config = _json(probe["out"], "config.json")
    assert config["protocol"] == "inversion" and config["script"] == ci.SCRIPT and config["tags"] == {"method": "tiny"}


def test_clip_scores_the_concept_name_in_place_of_the_token(probe, assets):
    """CLIP compares each image with its prompt where the placeholder reads --concept_name; other prompts as written."""
    from common.clip_score import ClipScorer

    folder = os.path.join(probe["out"], ci.IMAGES_DIR, f"step-{STEPS:05d}")
    images = [Image.open(os.path.join(folder, f"{k:04d}.png")).convert("RGB") for k in range(len(PROMPTS))]
    texts = ["a photo of a red circle", "a red circle on a grey background", "a blue square"]
    final = [r for r in _records(probe["out"]) if r["criterion"] == "clip"][-1]
    scorer = ClipScorer(assets["clip"])
    assert final["scores"] == pytest.approx(scorer.score(images, texts), abs=1e-4)
    assert final["scores"][:2] != pytest.approx(scorer.score(images[:2], list(PROMPTS[:2])), abs=1e-4)


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _bad_data(tmp, kind: str) -> str:
    d = tmp / f"data_{kind}"
    d.mkdir()
    if kind == "empty_metadata":
        (d / "metadata.jsonl").write_text("")
    elif kind == "missing_image":
        (d / "metadata.jsonl").write_text('{"file_name": "00000.png"}\n')
    return str(d)  # "no_metadata": an empty folder


BAD = [
    ("prompts_without_token", {}, "no prompt holds the placeholder"),
    ("initializer_two_tokens", {"--initializer_token": "golf ball"}, "makes 2 tokens"),
    ("initializer_unknown_split", {"--initializer_token": "zzqxjv"}, "exactly one token"),
    ("placeholder_in_vocab", {"--placeholder_token": "cat"}, "already a token"),
    ("no_metadata", {}, "no metadata.jsonl"),
    ("empty_metadata", {}, "no rows"),
    ("missing_image", {}, "does not exist"),
    ("templates_without_slot", {}, "has no {}"),
    ("zero_steps", {"--max_train_steps": 0}, "--max_train_steps 0"),
    ("zero_validation_steps", {"--validation_steps": 0}, "--validation_steps 0"),
    ("zero_learning_rate", {"--learning_rate": 0}, "--learning_rate 0"),
    ("negative_learning_rate", {"--learning_rate": -1e-3}, "must be positive"),
]


@pytest.mark.parametrize("case,over,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_exit_2_nothing_written(assets, tmp_path, capsys, case, over, message):
    lines = {"prompts_without_token": ["a red circle"], "placeholder_in_vocab": ["a photo of a cat"]}
    prompts = _prompts(tmp_path, lines.get(case, PROMPTS))
    over = dict(over)
    if case in ("no_metadata", "empty_metadata", "missing_image"):
        over["--train_data_dir"] = _bad_data(tmp_path, case)
    if case == "templates_without_slot":
        (tmp_path / "templates.txt").write_text("a photo of a {}\na drawing\n")
        over["--templates"] = str(tmp_path / "templates.txt")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        ci.parse_args(_argv(assets, prompts, str(out), **over))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("concept_inversion.py: error: ") and message in err[0], err
    assert not out.exists()


def test_bad_input_from_the_command_line(assets, tmp_path):
    """As a user runs it: the tokenizer check, one line on stderr, status 2, no output directory."""
    out = tmp_path / "out"
    argv = _argv(assets, _prompts(tmp_path), str(out), **{"--initializer_token": "golf ball"})
    proc = launch("tools/concept_inversion.py", argv, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("concept_inversion.py: error: --initializer_token"), lines
    assert not out.exists()
