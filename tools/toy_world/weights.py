"""The toy world's trained weights, committed in ``tools/toy_world/weights/``: trained once, assembled anywhere.

Training the toy CLIP, VAE, UNet and classifier is most of a world build
(about 340 of its 377 s on a 2-core Intel Xeon under the pin, 2026-12-02);
everything else (the pipelines, the curriculum data, the unlearned models,
the card's figures) takes under a minute. So the repository carries the four
trained parts (about 18 MB) with a manifest of the configuration they were
trained with, their training figures and a digest of every tensor, and a
world whose configuration matches is assembled from them instead of being
retrained. ``tools/build_toy_world.py --retrain`` (``make world``) trains
them again from their seeds and compares the digests: under the pin it gets
the same bits on every x86-64 AVX2 machine, which is the check that the
committed weights are what the code makes.

A part's digest is the sha256 of its tensors (name, dtype, shape, bytes, in
name order), so it does not depend on how a file was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = "trained.json"
PARTS = ("clip", "vae", "unet", "classifier")
_FILES = {  # per part: the files of its folder that hold it (tokenizers and processors are rebuilt from code)
    "clip": ("config.json", "model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "classifier": ("config.json", "model.safetensors", "preprocessor_config.json"),
}


class WeightsError(RuntimeError):
    """The committed weights are damaged, or retrained weights differ from them."""


def world_folders(world_dir: str) -> Dict[str, str]:
    """Where each trained part lives in a built world."""
    return {"clip": os.path.join(world_dir, "clip"), "vae": os.path.join(world_dir, "sd_base", "vae"),
            "unet": os.path.join(world_dir, "sd_base", "unet"), "classifier": os.path.join(world_dir, "classifier")}


def tensor_digest(folder: str) -> str:
    """sha256 of every tensor in ``folder``'s safetensors files: name, dtype, shape and bytes, in name order."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        tensors = load_file(os.path.join(folder, name))
        for key in sorted(tensors):
            t = tensors[key]
            h.update(f"{name}/{key}:{t.dtype}:{list(t.shape)}\n".encode())
            h.update(t.tobytes())
    return h.hexdigest()


def load(config: dict, weights_dir: Optional[str] = WEIGHTS_DIR) -> Optional[dict]:
    """The manifest of the committed weights when they were trained with ``config``, else None.

    WeightsError when they match the config but a file is missing or a digest
    differs from the manifest's (a damaged checkout: retrain with --retrain).
    """
    if weights_dir is None:
        return None
    try:
        with open(os.path.join(weights_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("config") != config:
        return None
    for part in PARTS:
        folder = os.path.join(weights_dir, part)
        missing = [f for f in _FILES[part] if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise WeightsError(f"{folder}: {', '.join(missing)} missing (git checkout incomplete?); "
                               "rebuild them with python tools/build_toy_world.py --retrain --write_weights")
        if tensor_digest(folder) != manifest["digests"][part]:
            raise WeightsError(f"{folder}: its tensors differ from {MANIFEST}'s digest (damaged?); rebuild them with "
                               "python tools/build_toy_world.py --retrain --write_weights")
    return manifest


def folder(part: str, weights_dir: str = WEIGHTS_DIR) -> str:
    """The committed folder of one part."""
    return os.path.join(weights_dir, part)


def write(world_dir: str, weights_dir: str = WEIGHTS_DIR) -> dict:
    """Store a built world's trained parts as the committed weights; return the manifest written."""
    from common.results import atomic_write_json

    with open(os.path.join(world_dir, "card.json"), encoding="utf-8") as f:
        card = json.load(f)
    if card.get("weights", {}).get("source") != "trained":
        raise WeightsError(f"{world_dir} was assembled from committed weights, not trained: nothing new to store")
    sources = world_folders(world_dir)
    digests = {}
    for part in PARTS:
        dest = os.path.join(weights_dir, part)
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        for name in _FILES[part]:
            shutil.copyfile(os.path.join(sources[part], name), os.path.join(dest, name))
        digests[part] = tensor_digest(dest)
    manifest = {
        "config": card["config"],
        "digests": digests,
        "figures": {part: card["figures"][part] for part in PARTS},
        "timings_seconds": {k: v for k, v in card["timings_seconds"].items()
                            if k in ("draw", "clip", "vae", "unet", "classifier")},
        "numeric_environment": card["numeric_environment"],
    }
    atomic_write_json(os.path.join(weights_dir, MANIFEST), manifest)
    return manifest


def compare(world_dir: str, manifest: dict) -> List[str]:
    """The parts of a built world whose tensors differ from the manifest's digests."""
    folders = world_folders(world_dir)
    return [part for part in PARTS if tensor_digest(folders[part]) != manifest["digests"][part]]
