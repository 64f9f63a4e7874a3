"""tools/prefetch.py: the models for offline nodes, fetched with a fake snapshot_download over the repositories' real
layouts (no hub here); the dry run, the printed flags, failures, resuming, and the docs' hf download lines."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest

from tools import prefetch
from tools.flags_reference import load_parser
from conftest import ROOT

# The repositories' main branches as the hub lists them (huggingface.co/REPO/tree/main), plus a .ckpt that must
# never be fetched.
REPOS = {
    "CompVis/stable-diffusion-v1-4": [
        ".gitattributes", "README.md", "model_index.json", "v1-variants-scores.jpg", "sd-v1-4.ckpt",
        "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
        "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin"],
    "openai/clip-vit-base-patch32": [  # no model.safetensors on main: the .bin is the one
        "README.md", "config.json", "flax_model.msgpack", "merges.txt", "preprocessor_config.json",
        "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json",
        "vocab.json"],
    "openai/clip-vit-large-patch14": [
        "README.md", "config.json", "flax_model.msgpack", "merges.txt", "model.safetensors",
        "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"],
    "google/vit-large-patch16-224-in21k": [
        "README.md", "config.json", "flax_model.msgpack", "model.safetensors", "preprocessor_config.json",
        "pytorch_model.bin", "tf_model.h5"],
    "timm/vit_large_patch16_224.augreg_in21k": ["README.md", "config.json", "model.safetensors", "pytorch_model.bin"],
}
SD14_FETCHED = {
    "model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


class FakeHub:
    """snapshot_download over REPOS: writes the files allow_patterns match (fnmatch, as huggingface_hub does),
    records each call, and raises for the repositories in ``broken``."""

    def __init__(self, broken=()):
        self.calls, self.broken = [], set(broken)

    def __call__(self, repo_id, local_dir, allow_patterns):
        self.calls.append((repo_id, tuple(allow_patterns)))
        if repo_id in self.broken:
            raise OSError("401 Client Error: Unauthorized for url\nsecond line, not shown")
        for name in REPOS[repo_id]:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                os.makedirs(os.path.dirname(os.path.join(local_dir, name)), exist_ok=True)
                open(os.path.join(local_dir, name), "w").write(name)
        return local_dir


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}


class FakeWeb:
    """download_url: writes the file, records the address."""

    def __init__(self):
        self.calls = []

    def __call__(self, url, path):
        self.calls.append(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(url)


def _run(argv, monkeypatch, capsys, hub, web=None):
    monkeypatch.setattr(prefetch, "snapshot_download", hub)
    monkeypatch.setattr(prefetch, "download_url", web or FakeWeb())
    monkeypatch.setattr(prefetch, "hub_offline", lambda: False)  # the suite sets HF_HUB_OFFLINE
    code = prefetch.main(prefetch.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_downloads_only_what_the_programs_load_and_prints_their_flags(tmp_path, monkeypatch, capsys):
    out = tmp_path / "models"
    hub, web = FakeHub(), FakeWeb()
    code, stdout, stderr = _run(["--out", str(out)], monkeypatch, capsys, hub, web)
    assert code == 0 and stderr == ""
    # FID's Inception weights: torch-fidelity's own file, from its own address.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert web.calls == [URL_INCEPTION_V3]
    assert _files(out / "inception") == {os.path.basename(URL_INCEPTION_V3), prefetch.MARKER}
    assert _files(out / "stable-diffusion-v1-4") == SD14_FETCHED | {prefetch.MARKER}  # no .ckpt, .bin, safety checker
    assert _files(out / "clip-vit-base-patch32") == {
        "config.json", "merges.txt", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json", prefetch.MARKER}
    assert "pytorch_model.bin" not in _files(out / "clip-vit-large-patch14")  # safetensors first when there
    assert _files(out / "vit_large_patch16_224.augreg_in21k") == {"config.json", "model.safetensors", prefetch.MARKER}
    # clip-b32 took a second call for its .bin; every other model one call.
    assert [r for r, _ in hub.calls] == ["CompVis/stable-diffusion-v1-4", "openai/clip-vit-base-patch32",
                                         "openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14",
                                         "google/vit-large-patch16-224-in21k", "timm/vit_large_patch16_224.augreg_in21k"]
    lines = stdout.splitlines()
    for flag in (f"--pretrained_model_name_or_path {out}/stable-diffusion-v1-4",
                 f"--clip_model {out}/clip-vit-base-patch32", f"--model_name_or_path {out}/vit-large-patch16-224-in21k",
                 f"--timm_arch vit_large_patch16_224.augreg_in21k --init_weights "
                 f"{out}/vit_large_patch16_224.augreg_in21k/model.safetensors",
                 f"--inception_weights {out}/inception/{os.path.basename(URL_INCEPTION_V3)}", "export HF_HUB_OFFLINE=1"):
        assert f"    {flag}" in lines or f"  {flag}" in lines, flag
    # Again: every folder is finished, nothing is fetched.
    hub.calls.clear()
    web.calls.clear()
    code, stdout, _ = _run(["--out", str(out)], monkeypatch, capsys, hub, web)
    assert code == 0 and hub.calls == web.calls == [] and stdout.count("already in") == len(prefetch.MODELS)


def test_a_failed_download_is_one_line_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "models"
    hub = FakeHub(broken={"CompVis/stable-diffusion-v1-4"})
    code, stdout, stderr = _run(["--out", str(out), "--what", "sd14,clip-b32"], monkeypatch, capsys, hub)
    assert code == 1
    assert stderr.splitlines() == [
        "prefetch.py: sd14 (CompVis/stable-diffusion-v1-4) not downloaded: OSError: 401 Client Error: Unauthorized "
        "for url",
        "prefetch.py: 1 of 2 model(s) not downloaded: sd14 (run the same command again to retry)"]
    assert "--clip_model" in stdout and "--pretrained_model_name_or_path" not in stdout
    assert not (out / "stable-diffusion-v1-4" / prefetch.MARKER).exists()
    # Retried: only the one that failed is fetched.
    hub = FakeHub()
    code, _, _ = _run(["--out", str(out), "--what", "sd14,clip-b32"], monkeypatch, capsys, hub)
    assert code == 0 and [r for r, _ in hub.calls] == ["CompVis/stable-diffusion-v1-4"]


def test_a_repository_without_the_weights_is_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REPOS, "timm/vit_large_patch16_224.augreg_in21k", ["config.json"])
    code, _, stderr = _run(["--out", str(tmp_path), "--what", "timm-vit-l16-in21k"], monkeypatch, capsys, FakeHub())
    assert code == 1 and "the repository has none of the weight files model.safetensors" in stderr


def test_dry_run_lists_sizes_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    def no_hub(**_):
        raise AssertionError("a dry run downloads nothing")

    monkeypatch.setattr(prefetch, "snapshot_download", no_hub)  # HF_HUB_OFFLINE stays set: no hub needed
    code = prefetch.main(prefetch.parse_args(["--out", str(tmp_path / "m"), "--dry_run"]))
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and not (tmp_path / "m").exists()
    for m in prefetch.MODELS:
        assert any(line.startswith(m.key + " ") and m.repo_id in line and f"{m.size_gb:.2f} GB" in line
                   for line in lines), m.key
    total = sum(m.size_gb for m in prefetch.MODELS)
    assert [line.split()[:3] for line in lines if line.startswith("total")] == [["total", f"{total:.2f}", "GB"]]
    assert any(line.startswith("nudenet") and "nothing to download" in line for line in lines)
    assert f"    --clip_model {tmp_path}/m/clip-vit-base-patch32" in lines


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "prefetch.py"), "--out", str(tmp_path), "--what",
                        "sd14,sd15"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "prefetch.py: error: --what sd14,sd15: unknown sd15; choose from sd14, clip-b32, clip-l14, vit-l16-in21k, "
        "timm-vit-l16-in21k, inception or all"]
    monkeypatch.setattr(prefetch, "hub_offline", lambda: True)
    with pytest.raises(SystemExit) as err:
        prefetch.parse_args(["--out", str(tmp_path)])
    assert err.value.code == 2


def test_the_models_are_the_code_s_defaults_and_the_flags_exist():
    from common.classifier import DEFAULT_PROCESSOR, DEFAULT_TIMM_ARCH
    from common.clip_score import DEFAULT_CLIP
    from tools.train_classifier import DEFAULT_BACKBONE

    m = prefetch.BY_KEY
    assert m["clip-b32"].repo_id == DEFAULT_CLIP
    assert m["vit-l16-in21k"].repo_id == DEFAULT_BACKBONE == DEFAULT_PROCESSOR
    assert m["timm-vit-l16-in21k"].repo_id == "timm/" + DEFAULT_TIMM_ARCH
    assert f"--timm_arch {DEFAULT_TIMM_ARCH} " in m["timm-vit-l16-in21k"].flags[0]
    users = {"sd14": ["tools/generate_training_data.py", "tools/unlearn.py", "finetuning_sequential.py"],
             "clip-b32": ["finetuning_sequential.py", "eval_model.py", "tools/concept_inversion.py",
                          "tools/attack_prompts.py"],
             "clip-l14": ["eval_model.py"],
             "vit-l16-in21k": ["tools/train_classifier.py", "eval_model.py"],
             "timm-vit-l16-in21k": ["tools/train_classifier.py"],
             "inception": ["eval_model.py", "finetuning_sequential.py"]}
    parsers = {p: load_parser(p) for p in {p for ps in users.values() for p in ps}}
    for key, programs in users.items():
        for flag in (w for f in m[key].flags for w in f.split() if w.startswith("--")):
            assert any(flag in parsers[p]._option_string_actions for p in programs), (key, flag)


def test_the_docs_give_the_hf_download_equivalents():
    text = " ".join((ROOT / "docs" / "protocols.md").read_text().replace("\\\n", " ").split())  # lines joined
    for model in prefetch.MODELS:
        assert prefetch.hf_command(model, "/data/models") in text, model.key
    assert "python tools/prefetch.py --out /data/models" in text


def test_a_file_from_an_address_arrives_whole_or_not_at_all(tmp_path):
    src = tmp_path / "src.pth"
    src.write_bytes(b"weights" * 1000)
    dest = tmp_path / "models" / "inception" / "w.pth"
    prefetch.download_url(src.as_uri(), str(dest))  # urllib reads file:// as it reads https://
    assert dest.read_bytes() == src.read_bytes() and not os.path.exists(str(dest) + ".part")
    with pytest.raises(OSError):
        prefetch.download_url((tmp_path / "missing.pth").as_uri(), str(tmp_path / "other" / "w.pth"))
    assert not os.path.exists(tmp_path / "other" / "w.pth")  # a failed download leaves no file to be taken for it
