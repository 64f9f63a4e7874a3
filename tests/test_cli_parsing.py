"""Flag parsing of the individual CLIP script, in process: real booleans and one-line errors."""

import importlib

import pytest

from conftest import seed_flags

pytestmark = pytest.mark.usefixtures("in_assets_root")  # hub-style ids are local folders there

clip_script = importlib.import_module("finetuning_individual_CLIP")


@pytest.mark.parametrize("text, value", [("True", True), ("False", False)])
def test_save_model_is_a_real_boolean(assets, tmp_path, text, value):
    args = clip_script.parse_args(seed_flags(assets, str(tmp_path / "o"), **{"--save_model": text}))
    assert args.save_model is value


def test_seed_readme_flags_parse(assets, tmp_path):
    args = clip_script.parse_args(seed_flags(assets, str(tmp_path / "o")))
    assert args.curriculum == "50,100" and args.use_ema and args.center_crop and args.random_flip
    assert args.clip_threshold == 0.31 and args.clip_epoch == 89 and args.validation_epochs == 2
    assert args.clip_model == "openai/clip-vit-base-patch32"


@pytest.mark.parametrize("over, message", [
    ({"--curriculum": "50,40"}, "strictly increasing"),
    ({"--curriculum": "50,101"}, "only 100 rows"),
    ({"--start_CL": 2}, "--start_CL 2"),
    ({"--save_model": "perhaps"}, "--save_model"),
    ({"--clip_threshold": "nan"}, "--clip_threshold"),
    ({"--validation_epochs": 0}, "--validation_epochs"),
    ({"--resolution": 30}, "--resolution 30"),
    ({"--caption_column": "text"}, "--caption_column 'text'"),
    ({"--clip_model": "./nowhere/clip"}, "--clip_model ./nowhere/clip: no such directory"),
    ({"--report_to": "wandb"}, "--report_to wandb: wandb is not installed"),
])
def test_bad_input_is_one_line_exit_2(assets, tmp_path, capsys, over, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        clip_script.parse_args(seed_flags(assets, str(out), **over))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_model_directory_missing_a_part(assets, tmp_path, capsys):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(assets["sd"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SystemExit):
        clip_script.parse_args(seed_flags(assets, str(tmp_path / "o"),
                                          **{"--pretrained_model_name_or_path": str(broken)}))
    assert "missing subfolder(s) vae" in capsys.readouterr().err


def test_published_defaults_per_script(assets, tmp_path):
    """The classifier script validates every epoch and the CLIP script every 2nd, as published; 2 checkpoints kept."""
    clf_script = importlib.import_module("finetuning_individual_Classifier")
    seq_script = importlib.import_module("finetuning_sequential")
    clip_args = clip_script.parse_args(seed_flags(assets, str(tmp_path / "a")))
    clf_args = clf_script.parse_args(seed_flags(assets, str(tmp_path / "b"), **{
        "--clip_threshold": False, "--model_path": assets["classifier"]}))
    seq_args = seq_script.parse_args(seed_flags(assets, str(tmp_path / "c")))
    assert (clip_args.validation_epochs, clf_args.validation_epochs) == (2, 1)
    assert clip_args.checkpoints_total_limit == clf_args.checkpoints_total_limit == seq_args.checkpoints_total_limit == 2
    assert clip_args.params == "full"


@pytest.mark.parametrize("offline, message", [
    ("1", "not in the Hugging Face cache (HF_HUB_OFFLINE is set)"),
    ("0", "the hub cannot be reached (ConnectError)"),
])
def test_hub_id_neither_local_nor_cached_is_one_line_before_loading(assets, tmp_path, capsys, monkeypatch,
                                                                     offline, message):
    """A hub-style id with no local folder: offline it must be cached; online the hub must answer (here a closed
    port stands in for a node without network)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline == "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        clip_script.parse_args(seed_flags(assets, str(out), **{"--clip_model": "nobody/some-clip"}))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetuning_individual_CLIP.py: error: --clip_model nobody/some-clip: no local directory")
    assert message in err, err
    assert "pass a local directory" in err and len(err.splitlines()) == 1
    assert not out.exists()
