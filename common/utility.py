"""Utility beside revival (docs/utility.md): FID, KID and CLIP score on a caption set, image change vs the base model.

FID and KID are torchmetrics' (``FrechetInceptionDistance``,
``KernelInceptionDistance``), fed features this module extracts once per image:
Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, the torch-fidelity port of
the TensorFlow FID network, 2048-d pool features) or the run's CLIP image
embeddings (common/clip_score.py, the one CLIP of the toolkit). Reference
features are cached in a file keyed by the extractor's weights, the resolution
and the image set, and refused when any of them differs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import InputError

UTILITY_STREAM = 2  # image_seed's stream of the caption set: its noise differs from the prompts' (0) and retention's (1)
INCEPTION, CLIP_FEATURES = "inception", "clip"
FEATURES = (INCEPTION, CLIP_FEATURES)
INCEPTION_DIM = 2048  # pool3 features of Inception-v3, the FID standard (Heusel et al. 2017)
# The FID authors' reference code (TTUR, Heusel et al. 2017) asks for more samples than feature dimensions (else the
# covariance is singular: refused here) and at least 10,000 (warned here): FID's expected value falls with the
# sample size towards its limit (Chong & Forsyth 2020), so small sets give higher, incomparable numbers.
STABLE_FID_IMAGES = 10_000
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. (2018) and torchmetrics' defaults
STATS_VERSION = 1
STATS_SUFFIX = ".npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("caption", "text", "prompt")  # a CSV's caption column: the first of these it has (any case)


# ---------------------------------------------------------------------------------------------------- input checks

def read_captions(path: str, flag: str = "--utility") -> List[str]:
    """Captions from a CSV with a caption column (COCO-30k style) or a text file with one per non-empty line."""
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.lower().endswith(".csv"):
        import io

        reader = csv.DictReader(io.StringIO(text))  # a quoted caption may hold commas and line breaks
        rows = list(reader)
        header = {name.strip().lower(): name for name in reader.fieldnames or []}
        column = next((header[c] for c in CAPTION_COLUMNS if c in header), None)
        if column is None:
            raise InputError(f"{flag} {path}: no caption column (expected one of {', '.join(CAPTION_COLUMNS)}; "
                             f"found {', '.join(header.values()) or 'none'})")
        captions = [(r[column] or "").strip() for r in rows]
        captions = [c for c in captions if c]
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise InputError(f"{flag} {path}: no captions")
    return captions


def reference_images(folder: str) -> List[str]:
    """The image files of a reference folder (not its subfolders), in name order."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def read_stats_meta(path: str, flag: str = "--utility_reference") -> dict:
    """The metadata of a reference statistics file this module wrote (InputError for any other file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != STATS_VERSION or "features" not in z.files:
                raise ValueError
    except (OSError, ValueError, KeyError):
        raise InputError(f"{flag} {path}: not a reference statistics file written by eval_model.py --utility "
                         "(give the folder of real images instead)") from None
    return meta




def expected_dim(fid_features: str, clip_spec: str) -> Optional[int]:
    """The feature width, known before loading (Inception: 2048; a transformers CLIP: its config's projection_dim)."""
    if fid_features == INCEPTION:
        return INCEPTION_DIM
    from .models import resolve_model_path

    config = os.path.join(resolve_model_path(clip_spec), "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("projection_dim")
    return None  # open_clip, or a hub id: checked once the model is loaded


def check_reference_count(count: int, dim: Optional[int], where: str, flag: str = "--utility_reference",
                          warn: bool = True) -> None:
    """Refuse fewer reference images than feature dimensions (a singular covariance); warn below 10,000."""
    if dim is not None and count < dim:
        raise InputError(f"{flag} {where}: {count} images, fewer than the {dim} feature dimensions (at least {dim} "
                         f"needed for a full-rank covariance; {STABLE_FID_IMAGES} for a stable FID)")
    if warn and count < STABLE_FID_IMAGES:
        print(f"warning: {flag} {where}: {count} reference images; FID is biased upwards below "
              f"{STABLE_FID_IMAGES} (compare only numbers computed on the same sizes)", flush=True)


def check_reference(path: str, fid_features: str, clip_spec: str, resolution: Optional[int],
                    flag: str = "--utility_reference") -> None:
    """Parse-time checks of --utility_reference: a folder with enough images, or statistics that match."""
    dim = expected_dim(fid_features, clip_spec)
    if os.path.isdir(path):
        check_reference_count(len(reference_images(path)), dim, path, flag)
        return
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such folder or file")
    meta = read_stats_meta(path, flag)
    want = fid_features
    if meta["extractor"] != want:
        raise InputError(f"{flag} {path}: statistics of {meta['extractor']} features, not {want} (--fid_features; "
                         "recompute them from the image folder)")
    if resolution is not None and meta["resolution"] != resolution:
        raise InputError(f"{flag} {path}: statistics of images at {meta['resolution']} px, not --resolution "
                         f"{resolution}")
    check_reference_count(meta["images"], dim, path, flag)


# ------------------------------------------------------------------------------------------------- feature extractors

def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, bytes): which weights made the features."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def pil_to_uint8(images: Sequence) -> torch.Tensor:
    """PIL images (one size) as a uint8 N x 3 x H x W tensor, the input torch-fidelity's Inception expects."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


class InceptionFeatures:
    """Inception-v3 pool features (2048-d) as torchmetrics computes FID: torch-fidelity's network and weights.

    ``weights_path``: a state dict saved with ``torch.save`` (the file torch-fidelity downloads from its
    URL_INCEPTION_V3, ``weights-inception-2015-12-05-6726825d.pth``) for a cluster without internet; None:
    torch-fidelity downloads it.
    """

    def __init__(self, weights_path: Optional[str] = None, device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.name = INCEPTION
        self.device = torch.device(device)
        # antialias=False: torch-fidelity's port of TensorFlow 1's bilinear resize to 299 px, the original FID's
        # (torchmetrics' default, antialiased, gives other numbers than published FIDs).
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
                                      feature_extractor_weights_path=weights_path, antialias=False).to(self.device)
        self.dim = INCEPTION_DIM
        self.fingerprint = weights_hash(self.net)

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        """float64 features, one row per PIL image (resized to 299 px inside the network)."""
        return self.net(pil_to_uint8(images).to(self.device)).double().cpu()


class ClipFeatures:
    """The run's CLIP image embeddings (L2-normalised, those of the CLIP score) as FID features: computable offline."""

    def __init__(self, clip_scorer):
        self.clip = clip_scorer
        self.name = CLIP_FEATURES
        self.fingerprint = weights_hash(clip_scorer.model)
        self.dim = int(self([_blank()]).shape[1])

    def __call__(self, images: Sequence) -> torch.Tensor:
        return self.clip.embed_images(images).double().cpu()


def _blank():
    from PIL import Image

    return Image.new("RGB", (32, 32))


def extract(extractor, images: Sequence, batch_size: int = 64, desc: Optional[str] = None) -> torch.Tensor:
    """Features of a list of PIL images, ``batch_size`` at a time (a progress bar when ``desc`` is given)."""
    from tqdm.auto import tqdm

    rows = []
    for b in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
        rows.append(extractor(images[b : b + batch_size]))
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------- reference statistics

def as_reference_image(image, resolution: int):
    """A real image as the generated ones are: RGB, centre square crop, resized to ``resolution`` (PIL bicubic,
    antialiased, the resize clean-fid recommends), so both sets take the same path into the extractor."""
    from PIL import Image

    im = image.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im if s == resolution else im.resize((resolution, resolution), Image.BICUBIC)


def image_set_hash(paths: Sequence[str]) -> str:
    """sha256 over each file's name and contents: the same images give the same key wherever the folder lives."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def stats_file_name(extractor, resolution: int, set_hash: str) -> str:
    """reference-<extractor>-<res>px-<key>.npz, the key a hash of extractor weights, resolution and image set."""
    key = hashlib.sha256(f"{extractor.fingerprint}:{resolution}:{set_hash}".encode()).hexdigest()[:16]
    return f"reference-{extractor.name}-{resolution}px-{key}{STATS_SUFFIX}"


def save_stats(path: str, features: torch.Tensor, meta: dict) -> None:
    """Reference features (float64, as extracted) and their metadata, written under a temporary name then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=features.numpy(), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def check_stats(path: str, extractor, resolution: int, flag: str = "--utility_reference") -> None:
    """A statistics file refused (InputError) unless made by these weights at this size."""
    meta = read_stats_meta(path, flag)
    check_reference_count(meta["images"], extractor.dim, path, flag, warn=False)
    if meta["extractor"] != extractor.name or meta["fingerprint"] != extractor.fingerprint:
        raise InputError(f"{flag} {path}: made by another feature extractor ({meta['extractor']}, weights "
                         f"{meta['fingerprint'][:12]}) than this run's ({extractor.name}, weights "
                         f"{extractor.fingerprint[:12]})")
    if meta["resolution"] != resolution:
        raise InputError(f"{flag} {path}: statistics of images at {meta['resolution']} px, not {resolution} px")


def load_stats(path: str, extractor, resolution: int, flag: str = "--utility_reference") -> torch.Tensor:
    """Reference features of a statistics file, refused (InputError) unless made by these weights at this size."""
    check_stats(path, extractor, resolution, flag)
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["features"])


def reference_features(reference: str, extractor, resolution: int, cache_dir: str,
                       flag: str = "--utility_reference") -> tuple:
    """(features, statistics file): loaded from a statistics file, or from the cache, or computed and cached."""
    if os.path.isfile(reference):
        return load_stats(reference, extractor, resolution, flag), reference
    paths = reference_images(reference)
    check_reference_count(len(paths), extractor.dim, reference, flag, warn=False)  # warned at parse time
    set_hash = image_set_hash(paths)
    cached = os.path.join(cache_dir, stats_file_name(extractor, resolution, set_hash))
    if os.path.isfile(cached):
        return load_stats(cached, extractor, resolution, flag), cached
    from PIL import Image

    def load(p):
        with Image.open(p) as im:
            return as_reference_image(im, resolution)

    rows = []
    from tqdm.auto import tqdm

    for b in tqdm(range(0, len(paths), 64), desc="reference features", leave=False):
        rows.append(extractor([load(p) for p in paths[b : b + 64]]))
    features = torch.cat(rows)
    save_stats(cached, features, {"version": STATS_VERSION, "extractor": extractor.name,
                                  "fingerprint": extractor.fingerprint, "dim": int(features.shape[1]),
                                  "resolution": resolution, "images": len(paths), "image_set_sha256": set_hash,
                                  "source": os.path.abspath(reference)})
    return features, cached


# ------------------------------------------------------------------------------------------------------- the metrics

class GivenFeatures(torch.nn.Module):
    """The identity, as torchmetrics' ``feature`` module: the metrics then run on features extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between two feature sets (float64 throughout)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute off: under several processes only the main one scores (the others would never join the gather).
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE) -> dict:
    """torchmetrics' KID: mean and std over ``subsets`` random subsets, drawn from ``seed`` (the global RNG is left as
    it was). The subset size is capped at the smaller set's size."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)  # main process only, as fid()
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid_mean": float(mean), "kid_std": float(std), "kid_subsets": subsets, "kid_subset_size": size}


LPIPS_NETS = ("alex", "vgg", "squeeze")


def image_change(base_images: Sequence, images: Sequence, lpips: Optional[str] = None) -> dict:
    """Per image pair (same caption, same seed): SSIM and PSNR (dB) of a checkpoint's image against the base model's,
    torchmetrics' functions on [0, 1] RGB (SSIM: 11 px Gaussian window, sigma 1.5); with ``lpips`` (a backbone of
    LPIPS_NETS) also torchmetrics' LPIPS, its backbone's torchvision weights read from torch's hub cache
    ($TORCH_HOME/hub/checkpoints; downloaded there when missing)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = pil_to_uint8(images).double() / 255
    b = pil_to_uint8(base_images).double() / 255
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    out = {"ssim": ssim.tolist(), "psnr": psnr.tolist()}
    if lpips is not None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=lpips, reduction="none", normalize=True,
                                                       sync_on_compute=False)  # main process only, as fid()
        for i in range(0, len(a), 64):
            metric.update(a[i : i + 64].float(), b[i : i + 64].float())
        out["lpips"] = metric.compute().reshape(-1).double().tolist()
    return out


def distribution(values: Sequence[float]) -> dict:
    """mean, std, min, 10th/50th/90th percentiles and max of per-image values (inf PSNR of identical images kept)."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    q = np.percentile(v, [0, 10, 50, 90, 100]) if len(finite) == len(v) else [float(np.min(v)), *np.percentile(
        v, [10, 50, 90]), float(np.max(v))]
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(q[0]), "p10": float(q[1]),
            "median": float(q[2]), "p90": float(q[3]), "max": float(q[4]), "n": int(len(v))}


# ------------------------------------------------------------------------------------------------- images on disk

IMAGES_DIR, SETTINGS_FILE, UTILITY_FILE, ROWS_FILE = "images", "settings.json", "utility.json", "results.jsonl"


def image_name(k: int) -> str:
    return f"c{k:05d}.png"


def prepare_folder(folder: str, settings: dict) -> None:
    """Keep the images of an interrupted run with the same settings (resume); start afresh for any other."""
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == settings:
                return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, IMAGES_DIR))
    from .results import atomic_write_json

    atomic_write_json(path, settings)


def missing_captions(folder: str, count: int) -> List[int]:
    """Indices of the captions whose image is not on disk yet (the first one is where a killed run resumes)."""
    present = set(os.listdir(os.path.join(folder, IMAGES_DIR))) if os.path.isdir(os.path.join(folder, IMAGES_DIR)) \
        else set()
    return [k for k in range(count) if image_name(k) not in present]


def save_image(image, folder: str, k: int) -> None:
    """One caption's image, under a temporary name then renamed: a kill never leaves a half-written PNG."""
    path = os.path.join(folder, IMAGES_DIR, image_name(k))
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def load_images(folder: str, count: int) -> list:
    """The ``count`` caption images of a folder, in caption order."""
    from PIL import Image

    out = []
    for k in range(count):
        with Image.open(os.path.join(folder, IMAGES_DIR, image_name(k))) as im:
            out.append(im.convert("RGB"))
    return out


# ------------------------------------------------------------------------------------------------ models and runs

def native_resolution(path: str) -> int:
    """A saved pipeline's own image size: the UNet's sample size x the VAE's scale (a LoRA folder: its base's)."""
    from .evaluation import is_lora_dir, lora_base
    from .models import resolve_model_path

    path = resolve_model_path(lora_base(path) if is_lora_dir(path) else path)
    with open(os.path.join(path, "unet", "config.json")) as f:
        sample = json.load(f)["sample_size"]
    with open(os.path.join(path, "vae", "config.json")) as f:
        blocks = len(json.load(f)["block_out_channels"])
    return int(sample) * 2 ** (blocks - 1)


def run_base_model(checkpoint: str) -> Optional[str]:
    """The pipeline a run fine-tuned (its config's --pretrained_model_name_or_path): the checkpoint's own
    run_config.json, else config.json in its folder or the folder above (a curriculum-* folder's run); None if none."""
    from .checkpointing import RUN_CONFIG_FILE
    from .results import CONFIG_FILE

    folder = os.path.normpath(checkpoint)
    for path in (os.path.join(folder, RUN_CONFIG_FILE), os.path.join(folder, CONFIG_FILE),
                 os.path.join(os.path.dirname(folder), CONFIG_FILE)):
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    base = (json.load(f).get("args") or {}).get("pretrained_model_name_or_path")
            except (ValueError, AttributeError):
                continue
            if base:
                return base
    return None


# ----------------------------------------------------------------------------------------------- one checkpoint

def generate_caption_images(path: str, captions: Sequence[str], folder: str, settings: dict, seed: int,
                            batch_size: int, num_inference_steps: int, guidance_scale: float, resolution: int,
                            device, dtype, weights: str, state, desc: str, scheduler: Optional[str] = None) -> None:
    """One image per caption (seed ``image_seed(seed, k, 0, UTILITY_STREAM)``), saved as it is drawn; the captions
    already on disk are skipped (a killed run resumes at its first unfinished caption), the rest shared among the
    processes (strided). Every process returns once every image exists."""
    import functools

    from tqdm.auto import tqdm

    from . import faults
    from .evaluation import load_pipeline
    from .validation import generate_images, generation_precision, image_seed, shard

    if state.is_main_process:
        prepare_folder(folder, settings)
    state.wait_for_everyone()
    mine = shard(missing_captions(folder, len(captions)), state.num_processes, state.process_index)
    if mine:
        pipe = load_pipeline(path, device, dtype, weights, scheduler)
        bar = tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process)
        for b in range(0, len(mine), batch_size):
            batch = mine[b : b + batch_size]
            images = generate_images(pipe, [captions[k] for k in batch],
                                     [image_seed(seed, k, 0, UTILITY_STREAM) for k in batch], batch_size,
                                     num_inference_steps, guidance_scale, resolution,
                                     autocast=functools.partial(generation_precision, pipe))
            for k, image in zip(batch, images):
                save_image(image, folder, k)
                faults.maybe_fail("utility_image")  # REVIVAL_FAULT=utility_image:n: killed after the n-th image
            bar.update(len(batch))
        bar.close()
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()


def score_utility(folder: str, captions: Sequence[str], seed: int, clip_scorer, extractor=None,
                  reference: Optional[torch.Tensor] = None, kid_subsets: int = KID_SUBSETS,
                  kid_subset_size: int = KID_SUBSET_SIZE, base_folder: Optional[str] = None,
                  desc: Optional[str] = None, lpips: Optional[str] = None) -> tuple:
    """(summary, per-image rows) of a folder of caption images: CLIP score, FID and KID against the reference
    features (when given), SSIM and PSNR against the base model's images of the same captions and seeds (when given)."""
    from .clip_score import LOGIT_SCALE
    from .validation import image_seed

    images = load_images(folder, len(captions))
    clip = clip_scorer.score(images, list(captions))
    rows = [{"caption_index": k, "caption": c, "seed": image_seed(seed, k, 0, UTILITY_STREAM),
             "file": os.path.join(IMAGES_DIR, image_name(k)), "clip_cosine": s}
            for k, (c, s) in enumerate(zip(captions, clip))]
    summary = {"images": len(images), "clip_cosine": float(np.mean(clip)),
               "clip_logit_scale": float(np.mean(clip)) * LOGIT_SCALE, "clip_cosine_distribution": distribution(clip)}
    if extractor is not None and reference is not None:
        feats = extract(extractor, images, desc=desc)
        summary["fid"] = fid(reference, feats)
        summary.update(kid(reference, feats, seed, kid_subsets, kid_subset_size))
    if base_folder is not None:
        change = image_change(load_images(base_folder, len(captions)), images, lpips)
        for name, values in change.items():
            summary[name] = distribution(values)
            for row, v in zip(rows, values):
                row[f"{name}_vs_base"] = v
    return summary, rows


def write_utility(folder: str, summary: dict, rows: Sequence[dict]) -> None:
    """results.jsonl (one row per image) and utility.json (the checkpoint's numbers), each rewritten whole."""
    from .results import atomic_write_json, atomic_write_text, writing

    with writing("results", folder):
        atomic_write_text(os.path.join(folder, ROWS_FILE), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(os.path.join(folder, UTILITY_FILE), summary)


UTILITY_COLUMNS = (("fid", "FID", ".2f"), ("kid_mean", "KID", ".4f"), ("kid_std", "KID std", ".4f"),
                   ("clip_cosine", "CLIP cos", ".4f"))


def format_utility_table(summaries: Sequence[dict]) -> str:
    """Plain-text table of the utility numbers, one row per model ('n/a' where a number was not computed)."""
    with_lpips = any(s.get("lpips") for s in summaries)
    head = f"{'model':<40} {'images':>6} " + " ".join(f"{h:>9}" for _, h, _ in UTILITY_COLUMNS) + \
        f" {'SSIM vs base':>12} {'PSNR vs base':>12}" + (f" {'LPIPS vs base':>13}" if with_lpips else "")
    lines = [head, "-" * len(head)]
    for s in summaries:
        cells = [(f"{s[k]:{fmt}}" if s.get(k) is not None else "n/a").rjust(9) for k, _, fmt in UTILITY_COLUMNS]
        ssim = f"{s['ssim']['mean']:.4f}" if s.get("ssim") else "n/a"
        psnr = f"{s['psnr']['mean']:.2f}" if s.get("psnr") else "n/a"
        lpips = (f" {s['lpips']['mean']:>13.4f}" if s.get("lpips") else f" {'n/a':>13}") if with_lpips else ""
        lines.append(f"{s['label'][:40]:<40} {s['images']:>6} " + " ".join(cells) + f" {ssim:>12} {psnr:>12}" + lpips)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ eval_model.py's work

REFERENCE_CACHE = os.path.join("utility", "reference_stats")  # under --output_dir


def on_main_process(state, fn):
    """``fn()`` on the main process (None elsewhere); an InputError it raises is raised on every process, so none is
    left waiting in a collective for a main process that stopped (a statistics file of other weights, say)."""
    error, result = None, None
    if state.is_main_process:
        try:
            result = fn()
        except InputError as err:
            error = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise InputError(error)
    return result


def load_reference(reference: Optional[str], fid_features: str, inception_weights: Optional[str], clip_scorer,
                   resolution: int, output_dir: str, device, is_main: bool = True) -> tuple:
    """(extractor, reference features, statistics file) for FID and KID; (None, None, None) without a reference.

    Runs before anything is written: a statistics file of other weights or size raises InputError here. The main
    process extracts (or loads) the reference features; the others only need none (they do not score).
    """
    if reference is None:
        return None, None, None
    extractor = (InceptionFeatures(inception_weights, device) if fid_features == INCEPTION
                 else ClipFeatures(clip_scorer))
    if not is_main:
        # Every process refuses a statistics file of other weights or size, as the main process does: a main process
        # alone stopping would leave the others waiting in their next collective.
        if os.path.isfile(reference):
            check_stats(reference, extractor, resolution)
        return extractor, None, None
    features, path = reference_features(reference, extractor, resolution, os.path.join(output_dir, REFERENCE_CACHE))
    return extractor, features, path


def _settings(path: str, weights: str, captions: Sequence[str], seed: int, num_inference_steps: int,
              guidance_scale: float, resolution: int, dtype, scheduler: Optional[str]) -> dict:
    """What an images folder was drawn with: a resumed run keeps its images only when all of it is the same."""
    return {"checkpoint": os.path.abspath(path), "weights": weights, "captions": len(captions),
            "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(), "seed": seed,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "resolution": resolution,
            "dtype": str(dtype).replace("torch.", ""), "scheduler": scheduler}


def utility_models(checkpoints: Sequence[str], base: Optional[str], log=print) -> tuple:
    """(models to draw, each checkpoint's base or None): the base models first (--utility_base, else each run's
    own base pipeline when it is a local folder), then the checkpoints; a path listed twice is drawn once."""
    from .evaluation import is_pipeline_dir
    from .models import resolve_model_path

    bases = {}
    for ckpt in checkpoints:
        b = base or run_base_model(ckpt)
        local = resolve_model_path(b) if b else None
        if local and is_pipeline_dir(local):
            bases[ckpt] = os.path.abspath(local)
        else:
            bases[ckpt] = None
            log(f"utility: {ckpt}: no base model pipeline found ({b or 'no run config names one'}; --utility_base): "
                "no SSIM/PSNR against it")
    models = []
    for p in [b for b in bases.values() if b] + [os.path.abspath(c) for c in checkpoints]:
        if p not in models:
            models.append(p)
    return models, bases


def run_utility(checkpoints: Sequence[str], captions: Sequence[str], output_dir: str, clip_scorer, extractor,
                reference: Optional[torch.Tensor], reference_path: Optional[str], base: Optional[str], seed: int,
                batch_size: int, num_inference_steps: int, guidance_scale: float, resolution: int, device, dtype,
                weights: str, kid_subsets: int, kid_subset_size: int, state, log=print,
                lpips: Optional[str] = None, scheduler: Optional[str] = None) -> List[dict]:
    """Each model's caption images (sharded, resumable), then on the main process its utility.json and per-image
    results.jsonl under OUTPUT_DIR/utility/<n>-<label>/; returns the summaries (main process; [] on the others)."""
    from .evaluation import checkpoint_label, unet_folder
    from .models import resolve_model_path

    models, bases = utility_models(checkpoints, base, log if state.is_main_process else (lambda _: None))
    root = os.path.join(output_dir, "utility")
    folders = {}
    for n, path in enumerate(models):
        role = "base" if path in bases.values() else "checkpoint"
        label = checkpoint_label(path)
        folders[path] = os.path.join(root, f"{n:03d}-{'base-' if role == 'base' else ''}" + label.replace("/", "__"))
        generate_caption_images(path, captions, folders[path],
                                _settings(path, weights, captions, seed, num_inference_steps, guidance_scale,
                                          resolution, dtype, scheduler), seed, batch_size, num_inference_steps,
                                guidance_scale, resolution, device, dtype, weights, state, desc=f"utility {label}",
                                scheduler=scheduler)
    if not state.is_main_process:
        return []
    summaries = []
    for path in models:
        label = checkpoint_label(path)
        ckpt = next((c for c in checkpoints if os.path.abspath(c) == path), None)
        base_path = bases.get(ckpt) if ckpt else None
        base_folder = folders[base_path] if base_path and base_path != path else None
        summary, rows = score_utility(folders[path], captions, seed, clip_scorer, extractor, reference, kid_subsets,
                                      kid_subset_size, base_folder, desc=f"features {label}", lpips=lpips)
        summary = {"label": label, "checkpoint": ckpt or path, "role": "checkpoint" if ckpt else "base",
                   "weights": unet_folder(resolve_model_path(path), weights)[1], **summary,
                   "features": extractor.name if extractor is not None else None,
                   "feature_weights_sha256": extractor.fingerprint if extractor is not None else None,
                   "reference": reference_path, "reference_images": None if reference is None else len(reference),
                   "base": base_path if base_folder else None, "seed": seed, "resolution": resolution,
                   "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "scheduler": scheduler or "model's own", "dtype": str(dtype).replace("torch.", ""),
                   "folder": folders[path]}
        write_utility(folders[path], summary, rows)
        summaries.append(summary)
    return summaries


# ------------------------------------------------------------------------------------------------- eval_model's flags

def add_options(group) -> None:
    """eval_model.py's utility flags."""
    group.add_argument("--utility", default=None, metavar="CAPTIONS",
                       help="utility beside revival: one image per caption (a CSV with a caption column, COCO-30k "
                            "style, or one caption per line) per checkpoint, scored with FID and KID against "
                            "--utility_reference, CLIP score, and SSIM/PSNR against the base model's images of the "
                            "same captions and seeds; OUTPUT_DIR/utility/<n>-<model>/utility.json (docs/utility.md)")
    group.add_argument("--utility_base", default=None,
                       help="the base (original) model whose images each checkpoint's are compared with at equal "
                            "seeds (default: each run's --pretrained_model_name_or_path, when a local pipeline)")
    group.add_argument("--lpips", default=None, choices=LPIPS_NETS,
                       help="also LPIPS against the base model's images (torchmetrics; 'alex' is the LPIPS authors' "
                            "choice). Its backbone's torchvision weights come from torch's hub cache, "
                            "$TORCH_HOME/hub/checkpoints (e.g. alexnet-owt-7be5be79.pth): offline, copy the file there")
    add_fid_options(group, "Without it: CLIP score and SSIM/PSNR only")


def add_fid_options(group, without_reference: str) -> None:
    """The FID/KID flags of eval_model.py --utility and of the fine-tuning scripts' --utility_fid (one definition)."""
    group.add_argument("--utility_reference", default=None,
                       help="real images for FID and KID: a folder of images (centre-cropped and resized to the "
                            "generation resolution; their features cached under OUTPUT_DIR/utility/reference_stats/) "
                            f"or such a cached statistics file (.npz). {without_reference}")
    group.add_argument("--fid_features", default=INCEPTION, choices=FEATURES,
                       help="FID/KID features: 'inception' (Inception-v3 pool3, 2048-d, the standard; weights from "
                            "--inception_weights or torch-fidelity's download) or 'clip' (the --clip_model image "
                            "embeddings: offline, not comparable with published FIDs)")
    group.add_argument("--inception_weights", default=None,
                       help="local copy of torch-fidelity's Inception weights "
                            "(weights-inception-2015-12-05-6726825d.pth) for nodes without internet")
    group.add_argument("--kid_subsets", type=int, default=KID_SUBSETS, help="KID: random subsets (seeded by --seed)")
    group.add_argument("--kid_subset_size", type=int, default=KID_SUBSET_SIZE,
                       help="KID: images per subset (capped at the smaller set's size)")


def check_fid_args(args) -> None:
    """Parse-time checks of the FID/KID flags both programs share (InputError): KID's numbers, the Inception weights
    file, the reference (enough images, or statistics that match)."""
    for flag, value in (("--kid_subsets", args.kid_subsets), ("--kid_subset_size", args.kid_subset_size)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be >= 1")
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise InputError(f"--inception_weights {args.inception_weights}: no such file")
    if args.utility_reference is not None:
        check_reference(args.utility_reference, args.fid_features, args.clip_model, args.resolution)
        check_inception_download(args.fid_features, args.inception_weights)


def inception_cache_file() -> str:
    """Where torch-fidelity's download of the Inception weights lands (torch's hub cache, as
    torch.hub.load_state_dict_from_url names it)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def check_inception_download(fid_features: str, inception_weights: Optional[str]) -> None:
    """Offline (HF_HUB_OFFLINE, the toolkit's switch for nodes without internet), Inception features need their
    weights given or already in torch's cache: refused here, in one line, not by the download once the run opens."""
    from .models import hub_offline

    if fid_features != INCEPTION or inception_weights is not None or not hub_offline():
        return
    cached = inception_cache_file()
    if not os.path.isfile(cached):
        raise InputError(f"--fid_features inception: HF_HUB_OFFLINE is set and the Inception weights are not in "
                         f"torch's cache ({cached}); give --inception_weights FILE (docs/utility.md: where to get it)")


def check_args(args) -> Optional[List[str]]:
    """Parse-time checks of the utility flags (InputError); the captions, or None without --utility."""
    from .models import looks_local

    if args.utility is None:
        for flag in ("utility_reference", "utility_base", "inception_weights", "lpips"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag}: needs --utility CAPTIONS")
        return None
    if args.images:
        raise InputError("--utility: generates images; it cannot score --images folders")
    captions = read_captions(args.utility)
    if args.utility_base is not None and looks_local(args.utility_base) and not os.path.isdir(args.utility_base):
        raise InputError(f"--utility_base {args.utility_base}: no such directory")
    check_fid_args(args)
    return captions


# ----------------------------------------------------------------------- the fine-tuning scripts' --utility_fid

MIN_FID_IMAGES = 2  # torchmetrics' FID needs more than one image on each side (a covariance of one sample is undefined)


def add_validation_fid_options(group) -> None:
    """The fine-tuning scripts' FID/KID flags: --utility_fid and the flags eval_model.py --utility has for it."""
    group.add_argument("--utility_fid", action="store_true",
                       help="FID and KID of the --utility_prompts captions' images (those the validation draws; none "
                            "drawn again) against --utility_reference, at the last validation of each chunk (and the "
                            "sequential script's before-training one); that record gains utility_fid, "
                            "utility_kid_mean, utility_kid_std and the features used (docs/utility.md)")
    add_fid_options(group, "Needed by --utility_fid")


def check_caption_count(count: int, flag: str) -> None:
    """The generated side of an FID: refused below MIN_FID_IMAGES, warned below the FID authors' 10,000."""
    if count < MIN_FID_IMAGES:
        raise InputError(f"{flag}: {count} caption(s); FID and KID need at least {MIN_FID_IMAGES} images")
    if count < STABLE_FID_IMAGES:
        print(f"warning: {flag}: {count} captions; FID is biased upwards below {STABLE_FID_IMAGES} images (compare "
              "only numbers computed on the same sizes; KID is unbiased)", flush=True)


def check_validation_fid(args, captions: Optional[int]) -> None:
    """Parse-time checks of --utility_fid (InputError); ``captions``: the --utility_prompts count (None: no file)."""
    if not args.utility_fid:
        for flag in ("utility_reference", "inception_weights"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag}: needs --utility_fid")
        return
    if captions is None:
        raise InputError("--utility_fid: needs --utility_prompts (the captions whose validation images it scores)")
    if args.utility_reference is None:
        raise InputError("--utility_fid: needs --utility_reference (the real images FID and KID compare with)")
    check_fid_args(args)
    check_caption_count(captions, "--utility_prompts")


@dataclass(frozen=True)
class FidConfig:
    """--utility_fid's settings (the seed of KID's subsets is the run's --seed)."""

    reference: str
    features: str = INCEPTION
    inception_weights: Optional[str] = None
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE


class CaptionSetFid:
    """FID and KID of a caption set's generated features against fixed reference features (a validation's fields)."""

    def __init__(self, extractor, reference: Optional[torch.Tensor], reference_path: Optional[str], seed: int,
                 kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE):
        self.extractor, self.reference, self.reference_path = extractor, reference, reference_path
        self.seed, self.kid_subsets, self.kid_subset_size = seed, kid_subsets, kid_subset_size

    def features(self, images: Sequence) -> torch.Tensor:
        return extract(self.extractor, images)

    def fields(self, features: torch.Tensor) -> dict:
        """The validation record's utility_fid, utility_kid_* and what made them (main process: it holds the reference)."""
        k = kid(self.reference, features, self.seed, self.kid_subsets, self.kid_subset_size)
        return {"utility_fid": fid(self.reference, features), "utility_kid_mean": k["kid_mean"],
                "utility_kid_std": k["kid_std"], "utility_kid_subset_size": k["kid_subset_size"],
                "utility_fid_images": int(features.shape[0]), "utility_fid_features": self.extractor.name,
                "utility_fid_weights_sha256": self.extractor.fingerprint,
                "utility_fid_reference": self.reference_path, "utility_fid_reference_images": len(self.reference)}


def validation_fid(cfg: FidConfig, clip_scorer, resolution: int, output_dir: str, device, seed: int,
                   is_main: bool = True) -> CaptionSetFid:
    """eval_model.py's extractor (every process: each extracts its share of the images) and reference features (the
    main process), cached under OUTPUT_DIR/utility/reference_stats/ as eval_model.py caches them."""
    extractor, features, path = load_reference(cfg.reference, cfg.features, cfg.inception_weights, clip_scorer,
                                               resolution, output_dir, device, is_main)
    return CaptionSetFid(extractor, features, path, seed, cfg.kid_subsets, cfg.kid_subset_size)
