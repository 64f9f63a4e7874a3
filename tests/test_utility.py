"""Utility beside revival (common/utility.py, eval_model.py --utility): FID, KID, CLIP score, change vs the base."""

import json
import os
from types import SimpleNamespace
import shutil

import numpy as np
import pytest
import torch

import eval_model
from common import utility
from common.errors import InputError

CAPTIONS = ("a red circle", "a blue square", "a green triangle")
REFERENCE_IMAGES = 40  # more than the tiny CLIP's 32 feature dimensions


def _gaussian(n, d, seed, scale=1.0, shift=0.0):
    g = np.random.default_rng(seed)
    mix = g.normal(size=(d, d)) * scale  # a correlated covariance, not the identity
    return torch.from_numpy(g.normal(size=(n, d)) @ mix + shift)


# ------------------------------------------------------------------------------------------------------ the metrics

def test_fid_of_a_set_with_itself_is_zero_and_a_mean_shift_adds_its_square():
    x = _gaussian(400, 6, seed=0)
    assert abs(utility.fid(x, x)) < 1e-6
    # Same covariance, means 0.5 apart in each of 6 dimensions: FID = |shift|^2 = 6 x 0.25 exactly.
    assert utility.fid(x, x + 0.5) == pytest.approx(1.5, abs=1e-6)
    assert utility.fid(x, x + 1.0) == pytest.approx(6.0, abs=1e-6)


def test_fid_equals_the_frechet_distance_computed_with_scipy_sqrtm():
    from scipy import linalg

    real, fake = _gaussian(500, 8, seed=1), _gaussian(300, 8, seed=2, scale=1.3, shift=0.2)
    a, b = real.numpy(), fake.numpy()
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert want > 1.0
    assert utility.fid(real, fake) == pytest.approx(want, abs=1e-3)


def test_kid_subsets_are_seeded():
    real, fake = _gaussian(60, 5, seed=3), _gaussian(50, 5, seed=4, shift=0.3)
    state = torch.get_rng_state()
    first = utility.kid(real, fake, seed=7, subsets=20, subset_size=30)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random numbers are left alone
    assert utility.kid(real, fake, seed=7, subsets=20, subset_size=30) == first
    other = utility.kid(real, fake, seed=8, subsets=20, subset_size=30)
    assert other["kid_mean"] != first["kid_mean"] and other["kid_std"] != first["kid_std"]
    assert first["kid_mean"] > 0 and first["kid_subset_size"] == 30
    assert utility.kid(real, fake, seed=7, subsets=2)["kid_subset_size"] == 50  # capped at the smaller set


def test_image_change_is_zero_distance_for_equal_images_and_per_image_otherwise():
    from PIL import Image

    g = np.random.default_rng(0)
    a = [Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    noisy = [Image.fromarray(np.clip(np.asarray(im, int) + g.integers(-40, 41, (32, 32, 3)), 0, 255).astype(np.uint8))
             for im in a]
    same = utility.image_change(a, a)
    assert same["ssim"] == pytest.approx([1.0] * 3) and all(np.isinf(same["psnr"]))
    change = utility.image_change(a, [a[0], noisy[1], noisy[2]])
    assert change["ssim"][0] == pytest.approx(1.0) and max(change["ssim"][1:]) < 0.99
    # PSNR by hand: 10 log10(1 / MSE) on [0, 1] pixels.
    mse = np.mean((np.asarray(noisy[1], float) / 255 - np.asarray(a[1], float) / 255) ** 2)
    assert change["psnr"][1] == pytest.approx(10 * np.log10(1 / mse), abs=1e-6)


def test_lpips_reads_its_backbone_from_the_local_torch_cache(tmp_path, monkeypatch):
    """--lpips offline: torchvision's weights file of the backbone (here a random SqueezeNet 1.1) in
    $TORCH_HOME/hub/checkpoints is what LPIPS loads; nothing is downloaded."""
    import torchvision
    from PIL import Image

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = torchvision.models.squeezenet1_1(weights=None)
    torch.save(backbone.state_dict(), cache / os.path.basename(torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    g = np.random.default_rng(0)
    a = [Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    b = [a[0], Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    change = utility.image_change(a, b, lpips="squeeze")
    assert change["lpips"][0] == pytest.approx(0.0, abs=1e-7) and change["lpips"][1] > 1e-4
    assert change["ssim"] == utility.image_change(a, b)["ssim"]


# ----------------------------------------------------------------------------------------------------- bad input

def test_captions_csv_text_and_empty(tmp_path):
    (tmp_path / "c.csv").write_text('image_id,Caption\n1,"a dog, running"\n2, a cat \n3,"two\nlines"\n')
    assert utility.read_captions(str(tmp_path / "c.csv")) == ["a dog, running", "a cat", "two\nlines"]
    (tmp_path / "c.txt").write_text("one\n\n two \n")
    assert utility.read_captions(str(tmp_path / "c.txt")) == ["one", "two"]
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(InputError, match="--utility .*no captions"):
        utility.read_captions(str(tmp_path / "e.txt"))
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="no caption column"):
        utility.read_captions(str(tmp_path / "n.csv"))


def _refused(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        eval_model.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_bad_utility_input_is_one_line_exit_2_nothing_written(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = [assets["sd"], "none", "red circle", "--output_dir", str(out), "--clip_model", assets["clip"]]
    (tmp_path / "empty.txt").write_text("\n")
    _refused(capsys, base + ["--utility", str(tmp_path / "empty.txt")], "--utility")
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS))
    few = tmp_path / "few"
    few.mkdir()
    for n in (1, 2):
        shutil.copy(os.path.join(assets["data"], sorted(f for f in os.listdir(assets["data"])
                                                        if f.endswith(".png"))[0]), few / f"{n}.png")
    # Fewer reference images than the tiny CLIP's 32 feature dimensions; Inception needs 2048.
    _refused(capsys, base + ["--utility", str(caps), "--utility_reference", str(few), "--fid_features", "clip"],
             "--utility_reference")
    _refused(capsys, base + ["--utility", str(caps), "--utility_reference", assets["data"]], "2048 feature dimensions")
    _refused(capsys, base + ["--prompt_file", assets["prompts"], "--utility_reference", assets["data"]],
             "--utility_reference: needs --utility")
    _refused(capsys, base + ["--utility", str(caps), "--inception_weights", str(tmp_path / "none.pth")],
             "--inception_weights")
    # Offline (the suite sets HF_HUB_OFFLINE), Inception's weights neither given nor in torch's cache: refused before
    # the run opens, not by the download. (The reference: statistics a 2,048-image set would have.)
    stats = str(tmp_path / "inception.npz")
    utility.save_stats(stats, torch.zeros(utility.INCEPTION_DIM, 4, dtype=torch.float64).T,
                       {"version": utility.STATS_VERSION, "extractor": utility.INCEPTION, "fingerprint": "0" * 64,
                        "dim": utility.INCEPTION_DIM, "resolution": 32, "images": utility.INCEPTION_DIM,
                        "image_set_sha256": "synthetic"})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    _refused(capsys, base + ["--utility", str(caps), "--utility_reference", stats],
             "HF_HUB_OFFLINE is set and the Inception weights are not in torch's cache")
    cached = tmp_path / "torch_hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # in the cache: the library loads it from there
    eval_model.parse_args(base + ["--utility", str(caps), "--utility_reference", stats])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ Inception

def test_inception_weights_load_from_a_local_file(assets, tmp_path, monkeypatch):
    """A randomly initialised Inception saved as torch-fidelity's weights file, loaded through --inception_weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    with monkeypatch.context() as m:  # build the network without its download: random weights
        m.setattr(fx, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        with torch.random.fork_rng(devices=[]):  # the suite's random numbers left as they were
            torch.manual_seed(0)
            random_net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_net.state_dict(), weights)
    (tmp_path / "caps.txt").write_text("a cat\n")
    args = eval_model.parse_args([assets["sd"], "none", "x", "--utility", str(tmp_path / "caps.txt"),
                                  "--inception_weights", str(weights), "--clip_model", assets["clip"]])
    with monkeypatch.context() as m:  # no download may happen from here on
        m.setattr(fx, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
        inception = utility.InceptionFeatures(args.inception_weights)
    got = inception.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in random_net.state_dict().items())
    from PIL import Image

    g = np.random.default_rng(0)
    feats = inception([Image.fromarray(g.integers(0, 256, (40, 40, 3), dtype=np.uint8))])
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all() and feats.dtype == torch.float64
    assert feats.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ eval_model.py

def _argv(assets, ckpt, captions, out, reference, base=True):
    return [ckpt, "none", "red circle", "--utility", captions, "--utility_reference", reference, "--fid_features",
            "clip", *(["--utility_base", assets["sd"]] if base else []), "--clip_model", assets["clip"],
            "--output_dir", out, "--num_inference_steps", "2", "--batch_size", "1", "--kid_subsets", "10"]


@pytest.fixture(scope="module")
def utility_run(assets, tmp_path_factory):
    """eval_model.py --utility on a checkpoint (the tiny SD with its UNet perturbed) and its base, CLIP features."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("utility")
    ckpt = str(root / "ckpt")
    shutil.copytree(assets["sd"], ckpt)
    unet = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    unet.save_pretrained(os.path.join(ckpt, "unet"))
    captions = root / "captions.csv"
    captions.write_text("image_id,caption\n" + "".join(f"{i},{c}\n" for i, c in enumerate(CAPTIONS)))
    reference = root / "reference"
    reference.mkdir()
    for name in sorted(f for f in os.listdir(assets["data"]) if f.endswith(".png"))[:REFERENCE_IMAGES]:
        shutil.copy(os.path.join(assets["data"], name), reference / name)
    out = str(root / "out")
    eval_model.main(eval_model.parse_args(_argv(assets, ckpt, str(captions), out, str(reference))))
    return {"ckpt": ckpt, "captions": str(captions), "out": out, "reference": str(reference)}


def _summaries(out):
    root = os.path.join(out, "utility")
    return {d: json.load(open(os.path.join(root, d, "utility.json"))) for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, "utility.json"))}


def test_eval_model_utility_end_to_end(assets, utility_run):
    from common.clip_score import ClipScorer

    found = _summaries(utility_run["out"])
    assert list(found) == ["000-base-sd", "001-ckpt"]
    base, ckpt = found["000-base-sd"], found["001-ckpt"]
    assert base["role"] == "base" and ckpt["role"] == "checkpoint" and ckpt["base"] == os.path.abspath(assets["sd"])
    for s in (base, ckpt):
        assert s["images"] == 3 and s["features"] == "clip" and s["reference_images"] == REFERENCE_IMAGES
        assert s["fid"] > 0 and s["kid_subset_size"] == 3 and s["kid_subsets"] == 10
    # The numbers, recomputed from the saved images and the cached reference features.
    folder = os.path.join(utility_run["out"], "utility", "001-ckpt")
    images = utility.load_images(folder, 3)
    scorer = ClipScorer(assets["clip"])
    clip = scorer.score(images, list(CAPTIONS))
    assert ckpt["clip_cosine"] == pytest.approx(float(np.mean(clip)), abs=1e-6)
    reference = utility.load_stats(ckpt["reference"], utility.ClipFeatures(scorer), 32)
    feats = scorer.embed_images(images).double()
    assert ckpt["fid"] == pytest.approx(utility.fid(reference, feats), abs=1e-9)
    change = utility.image_change(utility.load_images(os.path.join(utility_run["out"], "utility", "000-base-sd"), 3),
                                  images)
    assert ckpt["ssim"]["mean"] == pytest.approx(float(np.mean(change["ssim"])))
    assert 0 < ckpt["ssim"]["mean"] < 1 and base.get("ssim") is None  # the checkpoint's images did change
    # ... a little: drawn from the base's noise (about 0.91 here; images from other noise score far lower).
    assert ckpt["ssim"]["min"] > 0.6 and ckpt["psnr"]["min"] > 15
    rows = [json.loads(line) for line in open(os.path.join(folder, "results.jsonl"))]
    assert [r["caption"] for r in rows] == list(CAPTIONS)
    assert [r["ssim_vs_base"] for r in rows] == pytest.approx(change["ssim"])
    # Every image of a caption is drawn from the same seed for base and checkpoint.
    base_rows = [json.loads(line) for line in open(os.path.join(utility_run["out"], "utility", "000-base-sd",
                                                                  "results.jsonl"))]
    assert [r["seed"] for r in rows] == [r["seed"] for r in base_rows] and len({r["seed"] for r in rows}) == 3


def test_killed_run_resumes_at_the_first_unfinished_caption(assets, utility_run, tmp_path, monkeypatch):
    """Killed after the checkpoint's second image, rerun: the same numbers in utility.json; cached reference statistics
    give the same FID as the features recomputed from the folder. (No base model here: the checkpoint alone, its
    numbers but SSIM/PSNR are the end-to-end run's.)"""
    from common import faults, validation

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def kill_at_second(point):
        calls["n"] += point == "utility_image"
        if calls["n"] == 2:
            raise Killed

    first = _summaries(utility_run["out"])
    cached = first["001-ckpt"]["reference"]
    out = str(tmp_path / "out")
    argv = _argv(assets, utility_run["ckpt"], utility_run["captions"], out, cached, base=False)
    monkeypatch.setattr(faults, "maybe_fail", kill_at_second)
    with pytest.raises(Killed):
        eval_model.main(eval_model.parse_args(argv))
    monkeypatch.undo()
    folder = os.path.join(out, "utility", "000-ckpt")
    assert sorted(os.listdir(os.path.join(folder, "images"))) == ["c00000.png", "c00001.png"]
    assert not os.path.exists(os.path.join(folder, "utility.json"))
    drawn = []
    original = validation.generate_images
    monkeypatch.setattr(validation, "generate_images", lambda pipe, prompts, *a, **k: drawn.extend(prompts) or
                        original(pipe, prompts, *a, **k))
    eval_model.main(eval_model.parse_args(argv))
    assert drawn == [CAPTIONS[2]]  # only the caption the kill left undrawn
    got, want = _summaries(out)["000-ckpt"], first["001-ckpt"]
    assert got.pop("reference") == cached and got.pop("base") is None and "ssim" not in got
    assert got == {k: v for k, v in want.items() if k not in ("folder", "reference", "base", "ssim", "psnr")} | {
        "folder": folder}


def test_statistics_of_other_weights_or_size_are_refused(assets, utility_run, tmp_path, monkeypatch):
    from common.clip_score import ClipScorer

    clip = utility.ClipFeatures(ClipScorer(assets["clip"]))
    path = _summaries(utility_run["out"])["001-ckpt"]["reference"]
    assert os.path.basename(path).startswith("reference-clip-32px-")
    # The cache file's name is the key: these weights, this size, this image set (found again, not recomputed).
    assert os.path.basename(path) == utility.stats_file_name(
        clip, 32, utility.image_set_hash(utility.reference_images(utility_run["reference"])))
    assert utility.load_stats(path, clip, 32).shape == (REFERENCE_IMAGES, 32)
    with pytest.raises(InputError, match="not 64 px"):
        utility.load_stats(path, clip, 64)
    clip.fingerprint = "0" * 64  # another CLIP's weights
    with pytest.raises(InputError, match="another feature extractor"):
        utility.load_stats(path, clip, 32)
    # The fine-tuning scripts' other processes refuse it too (they load no reference): none waits for a stopped main.
    monkeypatch.setattr(utility, "ClipFeatures", lambda scorer: clip)
    with pytest.raises(InputError, match="another feature extractor"):
        utility.load_reference(path, "clip", None, None, 32, str(tmp_path), "cpu", is_main=False)
    # eval_model.py's: the main process's refusal, broadcast, is every process's (a fake broadcast of 2 processes).
    from accelerate import utils as accelerate_utils

    sent = []
    monkeypatch.setattr(accelerate_utils, "broadcast_object_list", lambda objs, from_process: sent.append(objs) or objs)
    main, other = SimpleNamespace(is_main_process=True, num_processes=2), SimpleNamespace(is_main_process=False,
                                                                                          num_processes=2)
    with pytest.raises(InputError, match="another feature extractor"):
        utility.on_main_process(main, lambda: utility.load_stats(path, clip, 32))
    assert len(sent) == 1 and "another feature extractor" in sent[0][0]
    monkeypatch.setattr(accelerate_utils, "broadcast_object_list", lambda objs, from_process: ["error: from rank 0"])
    with pytest.raises(InputError, match="from rank 0"):
        utility.on_main_process(other, lambda: pytest.fail("only the main process runs it"))
    assert utility.on_main_process(SimpleNamespace(is_main_process=True, num_processes=1), lambda: 7) == 7
    with pytest.raises(InputError, match="clip features, not inception"):
        utility.check_reference(path, "inception", assets["clip"], None)
    with pytest.raises(InputError, match="at 32 px, not --resolution 64"):
        utility.check_reference(path, "clip", assets["clip"], 64)
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a reference statistics file"):
        utility.check_reference(str(tmp_path / "x.npz"), "clip", assets["clip"], None)


def test_report_utility_table_and_probes_column(tmp_path, capsys):
    from test_report import _seq

    from tools import report

    def summary(folder, label, role, fid, clip, ssim=None):
        os.makedirs(folder)
        s = {"label": label, "role": role, "images": 30, "features": "inception", "reference_images": 10000,
             "fid": fid, "kid_mean": 0.0123, "kid_std": 0.0004, "clip_cosine": clip,
             "ssim": None if ssim is None else {"mean": ssim}, "psnr": None if ssim is None else {"mean": 21.456}}
        json.dump(s, open(os.path.join(folder, "utility.json"), "w"))

    ev = tmp_path / "eval"
    summary(ev / "utility" / "000-base-sd", "sd", "base", 12.345, 0.3112)
    summary(ev / "utility" / "001-esd-x", "esd-x", "checkpoint", 14.5, 0.3001, ssim=0.71234)
    full = _seq(tmp_path, "full", "esd-x", 0, [0.3, 0.5, 0.85], point={"chunk": 1, "images_seen": 100})
    lora = _seq(tmp_path, "lora", "esd-x", 0, [0.3, 0.4, 0.6])
    cfg = json.load(open(os.path.join(lora, "config.json")))
    cfg["args"]["params"] = "lora"
    json.dump(cfg, open(os.path.join(lora, "config.json"), "w"))
    out = tmp_path / "report"
    report.main(report.parse_args([full, lora, "--out", str(out), "--utility", str(ev)]))
    table = (out / "utility_table.md").read_text()
    assert "| sd | base | 30 | inception (10000) | 12.35 | 0.0123 +- 0.0004 | 0.3112 | - | - | - |" in table
    assert "| esd-x | checkpoint | 30 | inception (10000) | 14.50 | 0.0123 +- 0.0004 | 0.3001 | 0.7123 | 21.46 | - |" \
        in table
    assert (out / "utility_table.csv").read_text().splitlines()[0].startswith("model,role,images")
    probes = (out / "probes_table.md").read_text()
    assert probes.splitlines()[0].endswith("| utility: FID, CLIP, SSIM vs base |")
    assert "| FID 14.50, CLIP 0.300, SSIM vs base 0.712 |" in probes
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        report.parse_args([full, "--utility", str(tmp_path)])
    assert exc.value.code == 2 and "--utility" in capsys.readouterr().err
