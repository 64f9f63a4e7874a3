"""Bad input across the four scripts: one clear line naming the flag or file, exit status 2, no traceback,
no model loaded and the output directory left as it was (docs/protocols.md: robustness)."""

import importlib
import json
import os
import shutil

import pytest

from conftest import seed_flags

pytestmark = pytest.mark.usefixtures("in_assets_root")  # hub-style ids are local folders there

SCRIPTS = {name: importlib.import_module(name) for name in (
    "finetuning_individual_CLIP", "finetuning_individual_Classifier", "finetuning_sequential", "eval_model")}


@pytest.fixture(scope="module")
def bad(assets, tmp_path_factory):
    """Broken inputs built from the good tiny assets."""
    root = tmp_path_factory.mktemp("bad")
    paths = {}

    def data_copy(name):
        d = root / name
        shutil.copytree(assets["data"], d)
        return d

    d = data_copy("not_json")
    lines = (d / "metadata.jsonl").read_text().splitlines()
    (d / "metadata.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[4:]) + "\n")
    paths["not_json"] = d
    d = data_copy("bad_image")
    (d / "00007.png").write_bytes(b"\x89PNG garbage")
    paths["bad_image"] = d
    d = data_copy("missing_image")
    (d / "00009.png").unlink()
    paths["missing_image"] = d
    d = root / "no_meta"
    d.mkdir()
    paths["no_meta"] = d
    d = root / "sd_no_vae"
    shutil.copytree(assets["sd"], d)
    shutil.rmtree(d / "vae")
    paths["sd_no_vae"] = d
    (root / "empty.txt").write_text("\n  \n")
    paths["empty_prompts"] = root / "empty.txt"
    (root / "a_file").write_text("x")
    paths["a_file"] = root / "a_file"
    d = root / "other_run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"script": "finetuning_sequential.py"}))
    paths["other_run"] = d
    d = root / "old_results"
    d.mkdir()
    (d / "validations.jsonl").write_text('{"chunk": 0}\n')
    paths["old_results"] = d
    d = root / "partial_ckpt"
    d.mkdir()
    paths["partial_ckpt"] = d
    d = root / "run_without_curriculum"
    d.mkdir()
    paths["no_curr"] = d
    return {k: str(v) for k, v in paths.items()}


def _train(script, over, needs_classifier=False):
    def argv(assets, bad, out):
        base = {"--model_path": assets["classifier"]} if needs_classifier else {}
        if script != "finetuning_individual_CLIP":
            base["--clip_threshold"] = False if script == "finetuning_individual_Classifier" else 0.31
        flags = {**base, **{k: (v(assets, bad) if callable(v) else v) for k, v in over.items()}}
        return seed_flags(assets, out, **flags)
    return script, argv


def _eval(args):
    def argv(assets, bad, out):
        values = {"sd": assets["sd"], "clf": assets["classifier"], "prompts": assets["prompts"], **bad}
        return [a.format(**values) for a in args] + ["--output_dir", out]
    return "eval_model", argv


CLIP, CLF, SEQ = "finetuning_individual_CLIP", "finetuning_individual_Classifier", "finetuning_sequential"
CASES = [
    # (case id, (script, argv builder), expected words in the message)
    ("curriculum-decreasing", _train(CLIP, {"--curriculum": "50,40"}), "strictly increasing"),
    ("curriculum-too-long", _train(CLIP, {"--curriculum": "50,100,150"}), "only 100 rows"),
    ("curriculum-empty-item", _train(CLIP, {"--curriculum": "50,,100"}), "--curriculum"),
    ("curriculum-zero", _train(CLIP, {"--curriculum": "0,50"}), "positive"),
    ("start-cl-out-of-range", _train(CLIP, {"--start_CL": 5}), "--start_CL 5"),
    ("end-cl-before-start", _train(CLIP, {"--start_CL": 1, "--end_CL": 1}), "--end_CL 1"),
    ("data-dir-missing", _train(CLIP, {"--train_data_dir": "/nonexistent/data"}), "--train_data_dir /nonexistent/data"),
    ("data-dir-no-metadata", _train(CLIP, {"--train_data_dir": lambda a, b: b["no_meta"]}), "no metadata.jsonl"),
    ("metadata-not-json", _train(CLIP, {"--train_data_dir": lambda a, b: b["not_json"]}), "line 4: not valid JSON"),
    ("caption-column", _train(CLIP, {"--caption_column": "text"}), "--caption_column 'text'"),
    ("unreadable-image", _train(CLIP, {"--train_data_dir": lambda a, b: b["bad_image"]}), "00007.png: unreadable image"),
    ("missing-image", _train(CLIP, {"--train_data_dir": lambda a, b: b["missing_image"]}), "00009.png does not exist"),
    ("two-data-sources", _train(CLIP, {"--dataset_name": "some/dataset"}), "exactly one of --train_data_dir"),
    ("prompts-missing", _train(CLIP, {"--validation_prompts": "/nonexistent/p.txt"}), "--validation_prompts /nonexistent/p.txt: no such file"),
    ("prompts-empty", _train(CLIP, {"--validation_prompts": lambda a, b: b["empty_prompts"]}), "has no prompts"),
    ("model-missing", _train(CLIP, {"--pretrained_model_name_or_path": "/nonexistent/sd"}), "--pretrained_model_name_or_path /nonexistent/sd: no such directory"),
    ("model-without-vae", _train(CLIP, {"--pretrained_model_name_or_path": lambda a, b: b["sd_no_vae"]}), "missing subfolder(s) vae"),
    ("clip-threshold-nan", _train(CLIP, {"--clip_threshold": "nan"}), "--clip_threshold nan"),
    ("clip-threshold-below-range", _train(CLIP, {"--clip_threshold": -2}), "--clip_threshold -2.0"),
    ("resolution-not-multiple-of-8", _train(CLIP, {"--resolution": 30}), "--resolution 30"),
    ("batch-size-zero", _train(CLIP, {"--train_batch_size": 0}), "--train_batch_size 0"),
    ("save-model-not-bool", _train(CLIP, {"--save_model": "perhaps"}), "--save_model"),
    ("compat-unknown", _train(CLIP, {"--compat": "paper"}), "--compat"),
    ("clip-model-missing", _train(CLIP, {"--clip_model": "/nonexistent/clip"}), "--clip_model /nonexistent/clip: no such directory"),
    ("checkpointing-negative", _train(CLIP, {"--checkpointing_steps": -1}), "--checkpointing_steps -1"),
    ("resume-incomplete-checkpoint", _train(CLIP, {"--resume_from_checkpoint": lambda a, b: b["partial_ckpt"]}), "incomplete checkpoint"),
    ("classifier-required", _train(CLF, {"--bc_threshold": 0.3}), "--model_path: a classifier is required"),
    ("theme-style-with-directory", _train(CLF, {"--theme": "VanGogh"}, True), "needs a timm state-dict file"),
    ("state-dict-without-theme", _train(CLF, {"--model_path": lambda a, b: a["timm"]}), "needs --theme"),
    ("nudity-threshold-under-detector-cut", _train(CLF, {"--theme": "Nudity", "--model_path": False,
                                                          "--nudity_threshold": 0.15}), "--nudity_threshold 0.15"),
    ("nudity-class-unknown", _train(CLF, {"--theme": "Nudity", "--model_path": False,
                                         "--nudity_classes": "NAKED"}), "NAKED not a NudeNet 3 class"),
    ("bc-threshold-negative", _train(CLF, {"--bc_threshold": -0.5}, True), "--bc_threshold -0.5"),
    ("bc-threshold-above-one", _train(CLF, {"--bc_threshold": 1.5}, True), "at most 1. To train past revival on purpose: --no_early_stop"),
    ("clip-threshold-logit-scale", _train(CLIP, {"--clip_threshold": 31}),
     "31 looks like the 100 x cosine logit scale, which is 0.31 on the cosine scale"),
    ("seq-clip-threshold-logit-scale", _train(SEQ, {"--clip_threshold": 30}), "which is 0.3 on the cosine scale"),
    ("concept-index-negative", _train(CLF, {"--concept_index": -1}, True), "--concept_index -1"),
    ("chunk-epochs-count", _train(SEQ, {"--chunk_epochs": "8,8,8"}), "--chunk_epochs '8,8,8': need 2"),
    ("checkpoint-chunk-out-of-range", _train(SEQ, {"--curriculum_checkpoints": "4"}), "--curriculum_checkpoints '4'"),
    ("num-train-epochs-zero", _train(SEQ, {"--num_train_epochs": 0}), "--num_train_epochs 0"),
    ("eval-model-missing", _eval(["/nonexistent/model", "{clf}", "red circle", "--prompt_file={prompts}"]), "/nonexistent/model: no such directory"),
    ("eval-not-a-pipeline", _eval(["{no_curr}", "{clf}", "red circle", "--prompt_file={prompts}"]), "no model_index.json"),
    ("eval-curr-without-checkpoints", _eval(["{no_curr}", "{clf}", "red circle", "--prompt_file={prompts}", "--curr"]), "curriculum-* pipelines"),
    ("eval-prompts-empty", _eval(["{sd}", "{clf}", "red circle", "--prompt_file={empty_prompts}"]), "--prompt_file"),
    ("eval-images-per-prompt", _eval(["{sd}", "{clf}", "red circle", "--prompt_file={prompts}", "--images_per_prompt", "0"]), "--images_per_prompt 0"),
    ("eval-classifier-theme-mismatch", _eval(["{sd}", "{clf}", "red circle", "--prompt_file={prompts}", "--theme", "VanGogh"]), "EVAL_MODEL_PATH"),
]

OUTPUT_CASES = [
    ("output-is-a-file", "a_file", {}, "is a file"),
    ("output-holds-old-results", "old_results", {}, "holds results of an earlier run"),
    ("output-of-another-script", "other_run", {"--resume_from_checkpoint": "latest"}, "holds results of finetuning_sequential.py"),
]


def _snapshot(path):
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return ("file", os.path.getsize(path), os.path.getmtime(path))
    return sorted((n, os.path.getmtime(os.path.join(path, n))) for n in os.listdir(path))


def _expect_exit_2(module, argv, capsys, message, out):
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(out) == before  # the output directory is untouched (or still absent)


@pytest.mark.parametrize("case, spec, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(assets, bad, tmp_path, capsys, case, spec, message):
    script, argv = spec
    out = str(tmp_path / "out")
    _expect_exit_2(SCRIPTS[script], argv(assets, bad, out), capsys, message, out)


@pytest.mark.parametrize("case, where, over, message", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_bad_output_dir(assets, bad, capsys, case, where, over, message):
    out = bad[where]
    _expect_exit_2(SCRIPTS[CLIP], seed_flags(assets, out, **{"--log_file": False, **over}), capsys, message, out)


def test_case_count():
    assert len(CASES) + len(OUTPUT_CASES) >= 25
    assert {spec[0] for _, spec, _ in CASES} == set(SCRIPTS)  # every script is covered
