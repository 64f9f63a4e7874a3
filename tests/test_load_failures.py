"""Failures while loading or adapting a model the user named are bad input too: one line naming the flag and the
file, exit status 2, nothing written (docs/protocols.md: robustness). One case per kind of failure: damaged
weights (truncated, garbage header), a missing weight file, a config that is not JSON, a config that does not match
its weights, a damaged tokenizer, the criteria's models (CLIP, classifier, the retention scorer) and peft's
adapter targets."""

import importlib
import json
import os
import shutil

import pytest

from conftest import seed_flags

pytestmark = pytest.mark.usefixtures("in_assets_root")

CLIP, CLF = "finetuning_individual_CLIP", "finetuning_individual_Classifier"


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _garbage(path):
    open(path, "wb").write(b"not a safetensors file" * 10)


def _json(path, change):
    config = json.load(open(path))
    change(config)
    json.dump(config, open(path, "w"))


def _widen_cross_attention(c):
    c["cross_attention_dim"] *= 2


# (case, model copied (assets key), damage (relative path, function), flags (the copy is "{copy}"), file named)
CASES = [
    ("weights-truncated", "sd", ("unet/diffusion_pytorch_model.safetensors", _truncate), {},
     "--pretrained_model_name_or_path", "unet/diffusion_pytorch_model.safetensors"),
    ("weights-garbage-header", "sd", ("text_encoder/model.safetensors", _garbage), {},
     "--pretrained_model_name_or_path", "text_encoder/model.safetensors"),
    ("weights-missing", "sd", ("unet/diffusion_pytorch_model.safetensors", os.unlink), {},
     "--pretrained_model_name_or_path", ""),
    ("config-not-json", "sd", ("vae/config.json", lambda p: open(p, "w").write("{not json")), {},
     "--pretrained_model_name_or_path", "vae/config.json"),
    ("config-does-not-match-weights", "sd", ("unet/config.json", lambda p: _json(p, _widen_cross_attention)), {},
     "--pretrained_model_name_or_path", ""),
    ("tokenizer-damaged", "sd", ("tokenizer/tokenizer.json", lambda p: open(p, "w").write("{not json")), {},
     "--pretrained_model_name_or_path", ""),
    ("clip-criterion-weights", "clip", ("model.safetensors", _truncate), {"--clip_model": "{copy}"},
     "--clip_model", "model.safetensors"),
    ("classifier-weights", "classifier", ("model.safetensors", _garbage),
     {"--model_path": "{copy}", "--clip_threshold": False, "--bc_threshold": 0.3}, "--model_path", "model.safetensors"),
    ("retention-clip-weights", "clip", ("model.safetensors", _garbage),
     {"--model_path": "{classifier}", "--clip_threshold": False, "--bc_threshold": 0.3, "--clip_model": "{copy}",
      "--retention_prompts": "{prompts}"}, "--clip_model", "model.safetensors"),
    ("lora-target-not-in-unet", None, None, {"--params": "lora", "--lora_targets": "no_such_module"},
     "--lora_targets no_such_module", ""),
]


@pytest.mark.parametrize("case, model, damage, over, flag, file", CASES, ids=[c[0] for c in CASES])
def test_a_model_that_does_not_load_is_one_line_exit_2_nothing_written(assets, tmp_path, capsys, case, model, damage,
                                                                         over, flag, file):
    copy = None
    if model:
        copy = str(tmp_path / "model")
        shutil.copytree(assets[model], copy)
        rel, spoil = damage
        spoil(os.path.join(copy, rel))
    values = {"copy": copy, "classifier": assets["classifier"], "prompts": assets["prompts"]}
    flags = {k: (v.format(**values) if isinstance(v, str) else v) for k, v in over.items()}
    if model == "sd":
        flags["--pretrained_model_name_or_path"] = copy
    out = str(tmp_path / "out")
    script = importlib.import_module(CLF if "--model_path" in flags else CLIP)
    with pytest.raises(SystemExit) as exc:
        script.main(script.parse_args(seed_flags(assets, out, **{"--log_file": False, **flags})))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err
    assert line.startswith(f"{script.__name__}.py: error: {flag}")
    if copy and flag != "--lora_targets no_such_module":
        assert f"{flag} {copy}: cannot load" in line
    if file:
        assert os.path.join(copy, file) in line, line
    assert not os.path.exists(out)  # nothing written: no lock file, no log, no config
