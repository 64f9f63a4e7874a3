"""eval_model.py --utility end to end with Inception features, and on two processes (docs/utility.md)."""

import json
import math
import os

import numpy as np
import pytest
import torch

import eval_model
from common import utility
from conftest import launch

CAPTIONS = ("a red circle", "a blue square", "a green triangle")  # three: two processes draw 2 + 1
REFERENCE_ROWS = utility.INCEPTION_DIM + 1  # the fewest a 2048-d covariance accepts
SUPPORT = 16  # reference features nonzero in these coordinates only (see the fixture)


def _random_inception():
    """torch-fidelity's Inception with random weights (He-initialised, so that features are O(1), not 1e-8)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    mp = pytest.MonkeyPatch()
    mp.setattr(fx, "load_state_dict_from_url", lambda *a, **k: {})  # build the network without its download
    mp.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    try:
        with torch.random.fork_rng(devices=[]):  # the suite's random numbers left as they were
            torch.manual_seed(0)
            net = fx.FeatureExtractorInceptionV3("inception-v3-compat", [str(utility.INCEPTION_DIM)])
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    finally:
        mp.undo()
    return net.eval()


@pytest.fixture(scope="module")
def inception_run(assets, tmp_path_factory):
    """One process, in-process: --fid_features inception --inception_weights FILE against a statistics file.

    2,049 real images through Inception on the CPU would take minutes, so the reference is a statistics file
    written here, carrying the sha256 of the weights file's parameters as eval_model.py's own files do (a file of
    other weights is refused): random features nonzero in 16 of the 2,048 coordinates (torchmetrics' FID takes
    the eigenvalues of a 2048 x 2048 product, which LAPACK's balancing reduces to 16 x 16 when the other rows are
    zero: ~1 s instead of ~10-50 s). The generated images go through the whole path: PNG, Inception, FID, KID,
    utility.json.
    """
    root = tmp_path_factory.mktemp("inception")
    net = _random_inception()
    weights = root / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    g = np.random.default_rng(0)
    reference = np.zeros((REFERENCE_ROWS, utility.INCEPTION_DIM))
    # The generated images' features are about 0.3 +- 0.4 (seen): the reference on their scale.
    reference[:, :SUPPORT] = g.normal(0.3, 0.4, size=(REFERENCE_ROWS, SUPPORT))
    stats = str(root / "reference.npz")
    sha256 = utility.weights_hash(net)
    utility.save_stats(stats, torch.from_numpy(reference),
                       {"version": utility.STATS_VERSION, "extractor": utility.INCEPTION,
                        "fingerprint": sha256, "dim": utility.INCEPTION_DIM,
                        "resolution": 32, "images": REFERENCE_ROWS, "image_set_sha256": "synthetic"})
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    argv = [assets["sd"], "none", "red circle", "--utility", str(captions), "--utility_reference", stats,
            "--fid_features", "inception", "--inception_weights", str(weights), "--clip_model", assets["clip"],
            "--num_inference_steps", "2", "--batch_size", "1", "--kid_subsets", "10"]
    out = str(root / "one")
    eval_model.main(eval_model.parse_args(argv + ["--output_dir", out]))
    return {"net": net, "sha256": sha256, "reference": reference, "argv": argv, "out": out, "root": root}


def _summary_and_rows(out):
    """The one model's utility.json and results.jsonl rows under OUTPUT_DIR/utility/."""
    root = os.path.join(out, "utility")
    (folder,) = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, utility.UTILITY_FILE))]
    summary = json.load(open(os.path.join(root, folder, utility.UTILITY_FILE)))
    rows = [json.loads(line) for line in open(os.path.join(root, folder, utility.ROWS_FILE))]
    return summary, rows


def _frechet(real_mean, real_cov, fake):
    """FID by hand, for fewer fake rows n than dimensions: the nonzero eigenvalues of S_r S_f are those of the
    n x n matrix X S_r X^T / (n - 1), X the centred fake rows (S_f = X^T X / (n - 1))."""
    x = fake - fake.mean(0)
    small = x @ real_cov @ x.T / (len(fake) - 1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    return float(((real_mean - fake.mean(0)) ** 2).sum() + np.trace(real_cov) + (x ** 2).sum() / (len(fake) - 1)
                 - 2 * trace_sqrt)


def test_inception_fid_end_to_end_equals_a_computation_by_hand(inception_run):
    summary, rows = _summary_and_rows(inception_run["out"])
    assert summary["features"] == "inception" and summary["images"] == len(CAPTIONS)
    assert summary["feature_weights_sha256"] == inception_run["sha256"]  # the weights file's
    assert summary["reference_images"] == REFERENCE_ROWS and summary["kid_subset_size"] == len(CAPTIONS)
    # The saved images through torch-fidelity's network directly (uint8 N x 3 x H x W, resized to 299 inside).
    images = utility.load_images(summary["folder"], len(CAPTIONS))
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        fake = inception_run["net"](pixels)[0].double().numpy()
    assert fake.shape == (3, 2048) and fake.std(0).max() > 1e-3  # the three images' features differ
    reference = inception_run["reference"]
    real_cov = np.zeros((2048, 2048))
    real_cov[:SUPPORT, :SUPPORT] = np.cov(reference[:, :SUPPORT], rowvar=False)  # zero elsewhere: zero features
    want = _frechet(reference.mean(0), real_cov, fake)
    assert math.isfinite(summary["fid"]) and summary["fid"] == pytest.approx(want, rel=1e-6)
    assert [r["caption"] for r in rows] == list(CAPTIONS)


@pytest.mark.two_processes
def test_two_processes_give_the_one_process_utility(assets, inception_run):
    """accelerate launch --num_processes 2: the captions shared 2 + 1, scored on the main process, the same
    utility.json (FID, KID, CLIP) and per-image records as the one-process run."""
    out = str(inception_run["root"] / "two")
    proc = launch("eval_model.py", inception_run["argv"] + ["--output_dir", out], cwd=assets["root"], num_processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one, one_rows), (two, two_rows) = _summary_and_rows(inception_run["out"]), _summary_and_rows(out)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-4, abs=1e-8)
    assert two["clip_cosine"] == pytest.approx(one["clip_cosine"], abs=1e-6)
    skip = ("folder", "fid", "kid_mean", "kid_std", "clip_cosine", "clip_logit_scale", "clip_cosine_distribution")
    assert {k: v for k, v in two.items() if k not in skip} == {k: v for k, v in one.items() if k not in skip}

    def records(rows):
        return {(r["caption_index"], r["caption"], r["seed"], r["file"]) for r in rows}

    assert records(two_rows) == records(one_rows) and len(two_rows) == len(CAPTIONS)
    assert [r["clip_cosine"] for r in two_rows] == pytest.approx([r["clip_cosine"] for r in one_rows], abs=1e-6)
