#!/usr/bin/env python
"""Import a published unlearned checkpoint: a base SD pipeline plus one weights file -> a complete pipeline directory.

    python tools/import_model.py --pretrained_model_name_or_path sd-v1-4 \\
        --checkpoint esd-x-golf_ball.safetensors --output_dir models/esd-x-golf_ball

The shapes unlearning papers publish, detected from the file (``--format``
overrides): a full UNet state dict in diffusers key names (``diffusers-unet``),
one in the original CompVis/LDM names (``ldm``: ``model.diffusion_model.*``,
converted with diffusers' own single-file conversion), a partial UNet state
dict merged over the base (``partial``: e.g. only cross-attention weights), a
text-encoder-only state dict (``text-encoder``) and a diffusers LoRA file fused
at ``--lora_scale`` (``lora``). The output is what the fine-tuning scripts,
eval_model.py and tools/unlearn.py take, with ``import_card.json`` saying what
came from where. Only weights-only files are read (safetensors, or torch files
loaded with ``weights_only=True``): a pickle that would run code is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.cli import Parser  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import EMA_UNET, TRAINED_UNET, check_pipeline_dir, resolve_model_path  # noqa: E402

PROG = "import_model.py"
CARD_FILE = "import_card.json"
FORMATS = ("diffusers-unet", "ldm", "partial", "text-encoder", "lora")
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
LDM_UNET_PREFIX = "model.diffusion_model."
# Buffers that some transformers versions save and others do not: never a reason to refuse a text encoder.
OPTIONAL_TEXT_KEYS = ("text_model.embeddings.position_ids",)


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="the base pipeline the checkpoint was made from (a diffusers SD directory, e.g. SD-1.4)")
    p.add_argument("--checkpoint", required=True,
                   help="the published weights file (" + ", ".join(SUFFIXES) + ")")
    p.add_argument("--output_dir", required=True, help="the pipeline directory to write (must not exist)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                   help="the checkpoint's shape (default: detected from its keys)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="--format lora: the scale the LoRA is fused at")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_input_error(PROG):
        check_pipeline_dir(args.pretrained_model_name_or_path)
        if not os.path.isfile(args.checkpoint):
            raise InputError(f"--checkpoint {args.checkpoint}: no such file")
        if not args.checkpoint.endswith(SUFFIXES):
            raise InputError(f"--checkpoint {args.checkpoint}: expected one of {', '.join(SUFFIXES)}")
        if os.path.exists(args.output_dir):
            raise InputError(f"--output_dir {args.output_dir}: already exists; choose a new directory")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Reading and recognising a checkpoint


def read_weights(path: str) -> Dict[str, object]:
    """The tensors of a weights file, never running a pickle's code (InputError for anything else)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:  # noqa: BLE001 - a corrupt header is bad input
            raise InputError(f"--checkpoint {path}: not a readable safetensors file ({err})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, or a zip that is no torch file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"--checkpoint {path}: refused: not a weights-only torch file, so loading it could run "
                             f"arbitrary code ({first[:160]}); re-save its tensors with safetensors") from None
    # Lightning/LDM files wrap the weights: {"state_dict": {...}, "global_step": ...}.
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = flatten(state) if isinstance(state, dict) else {}
    if not tensors:
        raise InputError(f"--checkpoint {path}: holds no tensors (expected a state dict)")
    return tensors


def flatten(state: dict, prefix: str = "") -> dict:
    """Tensors of a nested dict under dotted keys: ESD's first diffusers code saved {"unet.<module>": {"weight": t}}."""
    import torch

    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
    return out


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strip(state: dict, prefix: str) -> dict:
    """Drop a component prefix ('unet.', 'text_encoder.') when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_format(state: dict, unet_keys, text_keys) -> str:
    """Which of FORMATS a state dict is, from its keys alone."""
    keys = list(state)
    if any("lora" in k.lower() for k in keys):
        return "lora"
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "ldm"
    unet_state, text_state = set(_strip(state, "unet.")), set(_strip(state, "text_encoder."))
    if text_state <= set(text_keys):
        return "text-encoder"
    if unet_state <= set(unet_keys):
        return "diffusers-unet" if unet_state == set(unet_keys) else "partial"
    # Mostly UNet keys with some foreign ones: a partial file for another model; 'partial' reports them.
    return "partial" if len(unet_state & set(unet_keys)) >= len(unet_state) / 2 else "diffusers-unet"


def _listing(keys: List[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_match(state: dict, expected: dict, what: str, partial: bool = False,
                optional: Tuple[str, ...] = ()) -> None:
    """InputError unless the keys and shapes fit the target module (a partial file may leave keys out)."""
    unexpected = [k for k in state if k not in expected and k not in optional]
    if unexpected:
        raise InputError(f"--checkpoint: {len(unexpected)} key(s) match nothing in the base {what}: "
                         f"{_listing(unexpected)}")
    missing = [] if partial else [k for k in expected if k not in state and k not in optional]
    if missing:
        raise InputError(f"--checkpoint: {len(missing)} key(s) of the base {what} are missing: {_listing(missing)} "
                         "(a file with only some weights: --format partial)")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in state
             if k in expected and state[k].shape != expected[k].shape]
    if wrong:
        raise InputError(f"--checkpoint: {len(wrong)} tensor(s) have another shape than the base {what} (a "
                         f"checkpoint for another architecture?): {_listing(wrong, 3)}")


# ---------------------------------------------------------------------------------------------------------------
# The five formats


def unet_weights(state: dict, fmt: str, unet) -> Tuple[dict, int]:
    """The UNet state dict to install and how many of its tensors came from the file."""
    base = unet.state_dict()
    if fmt == "ldm":
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        state = convert_ldm_unet_checkpoint(state, dict(unet.config))
        if not state:
            raise InputError("--checkpoint: no UNet weights under model.diffusion_model.* after conversion")
    else:
        state = _strip(state, "unet.")
    check_match(state, base, "UNet", partial=fmt == "partial")
    return {**base, **state}, len(state)


def text_encoder_weights(state: dict, text_encoder) -> Tuple[dict, int]:
    base = text_encoder.state_dict()
    state = _strip(state, "text_encoder.")
    check_match(state, base, "text encoder", optional=OPTIONAL_TEXT_KEYS)
    return {**base, **{k: v for k, v in state.items() if k in base}}, len(state)


def fuse_lora(pipe, path: str, scale: float) -> List[str]:
    """Fuse a diffusers LoRA file into the pipeline's modules at ``scale``; the names of the modules changed."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        pipe.load_lora_weights(folder, weight_name=name, adapter_name="imported")
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"--checkpoint {path}: not a LoRA file diffusers can load into this pipeline "
                         f"({str(err).splitlines()[0][:200]})") from None
    components = [c for c in ("unet", "text_encoder") if getattr(pipe, c) is not None
                  and any("lora" in n for n, _ in getattr(pipe, c).named_parameters())]
    pipe.fuse_lora(components=components, lora_scale=scale)
    pipe.unload_lora_weights()
    return components


# ---------------------------------------------------------------------------------------------------------------


def main(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from common.results import atomic_write_json, library_versions

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    # Loading bars and "no LoRA keys for the text encoder" notes would bury the one line that matters.
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    base_dir = resolve_model_path(args.pretrained_model_name_or_path)
    with exit_on_input_error(PROG):
        # Phase 1: read the file (weights only) and the base pipeline; recognise the format.
        state = read_weights(args.checkpoint)
        pipe = StableDiffusionPipeline.from_pretrained(base_dir, dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        fmt = args.format if args.format != "auto" else detect_format(
            state, pipe.unet.state_dict(), pipe.text_encoder.state_dict())
        # Phase 2: the weights to install, every key and shape checked before anything is written.
        changed, replaced = [], 0
        if fmt == "lora":
            changed = fuse_lora(pipe, args.checkpoint, args.lora_scale)
            replaced = len(state)
        elif fmt == "text-encoder":
            weights, replaced = text_encoder_weights(state, pipe.text_encoder)
            pipe.text_encoder.load_state_dict(weights, strict=False)
            changed = ["text_encoder"]
        else:
            weights, replaced = unet_weights(state, fmt, pipe.unet)
            pipe.unet.load_state_dict(weights)
            changed = ["unet"]
    # Phase 3: base pipeline + the changed parts, written under a temporary name and renamed.
    card = {
        "source": os.path.abspath(args.checkpoint), "sha256": sha256(args.checkpoint), "format": fmt,
        "format_detected": args.format == "auto", "components_replaced": changed,
        "tensors_in_file": len(state), "tensors_from_file": replaced,
        "base_pipeline": os.path.abspath(base_dir), "lora_scale": args.lora_scale if fmt == "lora" else None,
        "file_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        "library_versions": library_versions(),
    }
    if fmt == "partial":
        card["tensors_kept_from_base"] = len(pipe.unet.state_dict()) - replaced
    if fmt == "ldm":  # a whole LDM model: its VAE and text encoder are not taken (the base pipeline's stay)
        card["tensors_ignored"] = sum(1 for k in state if not k.startswith(LDM_UNET_PREFIX))
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(args.output_dir)}.tmp-", dir=parent)
    try:
        shutil.rmtree(tmp)
        shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns(EMA_UNET, TRAINED_UNET, CARD_FILE))
        for component in changed:
            shutil.rmtree(os.path.join(tmp, component))
            getattr(pipe, component).save_pretrained(os.path.join(tmp, component))
        atomic_write_json(os.path.join(tmp, CARD_FILE), card)
        os.replace(tmp, args.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"imported {args.checkpoint} ({fmt}, {replaced} tensors from the file into {' and '.join(changed)}) "
          f"over {base_dir} -> {args.output_dir}")
    return card


if __name__ == "__main__":
    main(parse_args())
