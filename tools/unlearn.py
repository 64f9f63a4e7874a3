#!/usr/bin/env python
"""Make an unlearned Stable Diffusion model with ESD or UCE, to measure its concept revival.

    python tools/unlearn.py --method esd-x --concept "Van Gogh" \\
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --output_dir esd-x-vangogh
    python tools/unlearn.py --method uce --erase "golf ball" --preserve "tennis ball" \\
        --pretrained_model_name_or_path sd-v1-4 --output_dir uce-golfball

Reads a diffusers SD directory and writes a full pipeline directory (loadable
with StableDiffusionPipeline.from_pretrained, ready for the fine-tuning
scripts) plus unlearning_card.json and README.md. Only the UNet changes.
docs/unlearning.md says what each method does and which choices we made.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.cli import Parser, add_tf32_arg, check_resolution  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import check_pipeline_dir, resolve_model_path, vae_scale_factor  # noqa: E402
from common.training import select_trainable  # noqa: E402
from tools.unlearning import METHODS, TOKEN_MODES  # noqa: E402

CARD_FILE = "unlearning_card.json"
PROG = "unlearn.py"

# Flags of one method only default to None so that giving one to the other method is an error, not ignored.
ESD_DEFAULTS = {"eta": 1.0, "iterations": 1000, "learning_rate": 1e-5, "ddim_steps": 50, "sample_guidance": 3.0,
                "probe_samples": 4, "resolution": None, "gradient_checkpointing": False}
UCE_DEFAULTS = {"erase": [], "guide": [""], "preserve": [], "lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0,
                "token_positions": "all"}


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=METHODS,
                   help="esd-x: ESD on cross-attention; esd-u: ESD on everything else; uce: closed-form edit")
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path",
                   required=True, help="the base model: a diffusers Stable Diffusion directory")
    p.add_argument("--output_dir", required=True, help="where the unlearned pipeline directory is written")
    p.add_argument("--concept", default=None, help="the concept to erase, as a prompt (ESD: required)")
    p.add_argument("--seed", type=int, default=0, help="seeds the method's sampling and noise (ESD)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    add_tf32_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("ESD (esd-x, esd-u)")
    g.add_argument("--eta", type=float, default=None, help="negative guidance strength (default 1.0)")
    g.add_argument("--iterations", type=int, default=None, help="training iterations, one example each (default 1000)")
    g.add_argument("--learning_rate", type=float, default=None, help="Adam learning rate (default 1e-5)")
    g.add_argument("--ddim_steps", type=int, default=None,
                   help="DDIM steps of the schedule x_t is sampled on; each iteration stops at a random one (default 50)")
    g.add_argument("--sample_guidance", type=float, default=None,
                   help="classifier-free guidance when sampling x_t with the frozen model (default 3.0, as the authors)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: the UNet's sample_size x the VAE's scale factor)")
    g.add_argument("--probe_samples", type=int, default=None,
                   help="fixed held-out examples on which the ESD objective is reported before and after (default 4; 0: off)")
    g.add_argument("--gradient_checkpointing", action="store_true", default=None, help="save GPU memory")

    g = p.add_argument_group("UCE")
    g.add_argument("--erase", nargs="+", default=None, help="concepts to erase (with --concept, that one too)")
    g.add_argument("--guide", nargs="+", default=None,
                   help="concept the erased ones are mapped to: one for all, or one per erased concept (default '')")
    g.add_argument("--preserve", nargs="*", default=None, help="concepts whose cross-attention outputs are kept")
    g.add_argument("--lamb", type=float, default=None, help="regularisation toward the old weights (default 0.5)")
    g.add_argument("--erase_scale", type=float, default=None, help="weight of the erase terms (default 1.0)")
    g.add_argument("--preserve_scale", type=float, default=None, help="weight of the preserve terms (default 1.0)")
    g.add_argument("--token_positions", default=None, choices=TOKEN_MODES,
                   help="which token embeddings stand for a concept: all (its words and EOS; default) or last "
                        "(its last word, as the authors' script)")
    return p


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _flag(name: str) -> str:
    return "--" + name


def _settings(args: argparse.Namespace, method) -> dict:
    """This method's own flags with their defaults filled in; the other methods' flags are refused."""
    stray = sorted({f"--{k}" for m in METHODS_BY_NAME.values() if m is not method for k in m.defaults
                    if k not in method.defaults and getattr(args, k, None) is not None})
    _require(not stray, f"{', '.join(stray)}: not used by --method {args.method}")
    return {k: (v if getattr(args, k, None) is None else getattr(args, k)) for k, v in method.defaults.items()}


def _check_text(value: str, flag: str) -> str:
    _require(value.strip() != "", f"{flag}: empty concept")
    return value


def _finite(value: float, flag: str, low: float, strict: bool) -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _require(ok, f"{flag} {value}: must be {'>' if strict else '>='} {low:g}")


def resolve_device(value: str) -> str:
    """'auto' -> cuda when available, else cpu (unless a GPU was asked for: common.precision.check_cuda); anything
    else must name a device this machine has."""
    import torch

    from common.precision import check_cuda

    check_cuda()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {value}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        _require(torch.cuda.is_available(), f"--device {value}: CUDA is not available on this machine")
        _require(device.index is None or device.index < torch.cuda.device_count(),
                 f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def _config_value(model_dir: str, rel_path: str, key: str):
    """One entry of a part's JSON config, or None when unreadable here (the model load then reports it)."""
    import json

    try:
        with open(os.path.join(model_dir, rel_path), encoding="utf-8") as f:
            return json.load(f)[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_esd(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """ESD's flags, and against the model's own configuration when it is local."""
    _require(concept is not None, "--concept: required for ESD")
    _finite(settings["eta"], "--eta", 0, strict=False)
    _require(settings["iterations"] >= 1, f"--iterations {settings['iterations']}: must be at least 1")
    _finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    _require(settings["ddim_steps"] >= 1, f"--ddim_steps {settings['ddim_steps']}: must be at least 1")
    _finite(settings["sample_guidance"], "--sample_guidance", 0, strict=False)
    _require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    check_resolution(settings["resolution"])
    if model_dir is not None:
        blocks = _config_value(model_dir, "vae/config.json", "block_out_channels")
        factor = vae_scale_factor(SimpleNamespace(block_out_channels=blocks)) if isinstance(blocks, list) and blocks \
            else None
        if settings["resolution"] is not None and factor:
            _require(settings["resolution"] % factor == 0,
                     f"--resolution {settings['resolution']}: must be a multiple of the VAE's scale factor {factor}")
        train_steps = _config_value(model_dir, "scheduler/scheduler_config.json", "num_train_timesteps") or 1000
        _require(settings["ddim_steps"] <= train_steps,
                 f"--ddim_steps {settings['ddim_steps']}: at most the model's {train_steps} training timesteps")
    return {**settings, "concept": concept}


def _check_uce(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """UCE's flags: what to erase (--erase and --concept), guides, what to preserve, the scales."""
    for c in settings["erase"]:
        _check_text(c, "--erase")
    erase = list(settings["erase"]) + ([concept] if concept is not None else [])
    _require(erase, "--erase (or --concept): give at least one concept to erase")
    _require(len(settings["guide"]) in (1, len(erase)),
             f"--guide: give one guide, or one per erased concept ({len(erase)}), not {len(settings['guide'])}")
    for c in settings["preserve"]:
        _check_text(c, "--preserve")
        _require(c not in erase, f"--preserve {c!r}: also erased; a concept cannot be both")
    _finite(settings["lamb"], "--lamb", 0, strict=True)
    _finite(settings["erase_scale"], "--erase_scale", 0, strict=True)
    _finite(settings["preserve_scale"], "--preserve_scale", 0, strict=True)
    return {**settings, "erase": erase, "concept": concept}


@dataclass(frozen=True)
class Request:
    """A validated unlearning request; parse_args builds it and never changes the parsed flags."""

    method: str
    settings: dict  # the method's own flags with defaults filled, plus the concept(s)
    model: str
    output_dir: str
    device: str
    seed: int
    quiet: bool
    argv: tuple  # the command line, for the card
    allow_tf32: bool = False


def validate(args: argparse.Namespace, argv) -> Request:
    """Every check that needs no model weights: the method's flags, then the model and output directories."""
    method = METHODS_BY_NAME[args.method]
    if args.concept is not None:
        _check_text(args.concept, "--concept")
    device = resolve_device(args.device)
    # Files, still before any model loads.
    check_pipeline_dir(args.pretrained_model_name_or_path)
    model_dir = resolve_model_path(args.pretrained_model_name_or_path)
    _require(not os.path.isfile(args.output_dir), f"--output_dir {args.output_dir}: is a file")
    local = os.path.isdir(model_dir)
    if local:
        _require(os.path.realpath(args.output_dir) != os.path.realpath(model_dir),
                 f"--output_dir {args.output_dir}: is the base model's directory; write the unlearned copy elsewhere")
    settings = method.check(_settings(args, method), args.concept, model_dir if local else None)
    return Request(args.method, settings, args.pretrained_model_name_or_path, args.output_dir, device, args.seed,
                   args.quiet, tuple(argv), args.allow_tf32)


def parse_args(argv=None) -> Request:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    with exit_on_input_error(parser.prog):
        return validate(args, argv)


# ---- running ------------------------------------------------------------------

def run_esd(settings: dict, parts, device, seed: int, quiet: bool) -> dict:
    """Train the UNet with ESD in place; return what the card records."""
    import copy

    from tools import unlearning as ul

    unet = parts.unet.to(device)
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    parts.text_encoder.to(device)
    cond, uncond = ul.encode_prompts(parts.tokenizer, parts.text_encoder, [settings["concept"], ""], device).chunk(2)
    parts.text_encoder.to("cpu")
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    scheduler = ul.make_ddim(parts.inference_scheduler.config, settings["ddim_steps"])
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()

    names = ul.esd_trainable_names(unet, settings["variant"])
    params = select_trainable(unet, names)
    # Held-out: their own seed stream, fixed before training (the frozen model makes them).
    probes = ul.esd_probe_set(frozen, scheduler, cond, uncond, settings["probe_samples"], latent_shape, seed + 1,
                              settings["sample_guidance"], settings["eta"], device)
    before = ul.esd_objective(unet, probes, cond)
    losses = ul.train_esd(unet, frozen, scheduler, cond, uncond, params, iterations=settings["iterations"],
                          learning_rate=settings["learning_rate"], eta=settings["eta"], guidance=settings["sample_guidance"],
                          latent_shape=latent_shape, seed=seed, device=device, progress=not quiet)
    after = ul.esd_objective(unet, probes, cond)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    del frozen
    unet.requires_grad_(False).to("cpu")
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "trained_parameters": {"tensors": len(params), "numel": sum(p.numel() for p in params)},
        "loss": {"first": losses[0], "last": losses[-1], "mean_last_10pct": sum(tail) / len(tail)},
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before if probes else None,
                                "after": after if probes else None},
        "latent_shape": list(latent_shape),
        "resolution": resolution,  # the card's hyperparameter, resolved from the model when not given
    }


def run_uce(settings: dict, parts, device, seed: int, quiet: bool) -> dict:
    """Edit the UNet's cross-attention key/value projections in place; return what the card records."""
    from tools import unlearning as ul

    guides = settings["guide"] * len(settings["erase"]) if len(settings["guide"]) == 1 else list(settings["guide"])
    parts.text_encoder.to(device)
    E, G, P = ul.uce_embeddings(parts.tokenizer, parts.text_encoder, settings["erase"], guides, settings["preserve"],
                                settings["token_positions"], device)
    parts.text_encoder.to("cpu")
    M = ul.uce_transform(E, G, P, settings["lamb"], settings["erase_scale"], settings["preserve_scale"])
    old = ul.apply_uce(parts.unet, M)
    weights = dict(parts.unet.named_parameters())
    per_layer = {name: ul.uce_residuals(w, weights[name], E, G, P) for name, w in old.items()}
    summary = {}
    for key in ("erase", "preserve"):
        values = [r[key] for r in per_layer.values() if key in r]
        if values:
            summary[key] = {"max": max(values), "mean": sum(values) / len(values)}
    return {
        "guides": guides,
        "edited_parameters": sorted(old),
        "token_vectors": {"erase": E.shape[0], "preserve": P.shape[0]},
        "residuals": summary,
        "residuals_note": "erase: ||W_new c_i - W_old c_guide|| / ||W_old c_i - W_old c_guide|| (0 = reached); "
                          "preserve: ||W_new c_j - W_old c_j|| / ||W_old c_j||; over the edited projections",
    }




@dataclass(frozen=True)
class Method:
    """One unlearning method: its own flags and their defaults, their checks, the edit itself, what it erased."""

    name: str
    defaults: Dict[str, object]  # only this method's flags; another method's flag is refused, not ignored
    check: Callable[[dict, Optional[str], Optional[str]], dict]  # (settings, --concept, local model dir) -> settings
    run: Callable  # (settings, parts, device, seed, quiet) -> results for the card; edits parts.unet in place
    erased: Callable[[dict], List[str]]


METHODS_BY_NAME: Dict[str, Method] = {m.name: m for m in (
    Method("esd-x", {**ESD_DEFAULTS, "variant": "esd-x"}, _check_esd, run_esd, lambda s: [s["concept"]]),
    Method("esd-u", {**ESD_DEFAULTS, "variant": "esd-u"}, _check_esd, run_esd, lambda s: [s["concept"]]),
    Method("uce", UCE_DEFAULTS, _check_uce, run_uce, lambda s: s["erase"]),
)}


def write_readme(path: str, card: dict) -> None:
    from common.results import atomic_write_text

    what = ", ".join(card["erase"])
    text = (f"# Unlearned model: {card['method']}, erased {what!r}\n\n"
            f"Made by `tools/unlearn.py` from `{card['base_model']}` on {card['created']}; "
            f"every setting is in `{CARD_FILE}`. Only the UNet differs from the base model.\n\n"
            "Measure how fast the concept comes back (see docs/unlearning.md):\n\n"
            f"    accelerate launch finetuning_individual_CLIP.py --pretrained_model_name_or_path={path} ...\n")
    atomic_write_text(os.path.join(path, "README.md"), text)


def main(request: Request) -> dict:
    """Load, unlearn, save the pipeline and its card; return the card."""
    start = time.time()
    import torch

    from common import numerics
    from common.models import load_sd_parts, save_pipeline
    from common.precision import set_tf32
    from common.results import atomic_write_json, library_versions

    method, settings = METHODS_BY_NAME[request.method], request.settings
    set_tf32(request.allow_tf32)
    torch.manual_seed(request.seed)
    device = torch.device(request.device)
    base = resolve_model_path(request.model)
    print(f"{PROG}: loading {base}", flush=True)
    parts = load_sd_parts(base)
    results = method.run(settings, parts, device, request.seed, request.quiet)
    save_pipeline(parts, parts.unet, request.output_dir)
    hyper = {k: settings[k] for k in method.defaults if k not in ("erase", "guide", "preserve", "variant")}
    if "resolution" in results:
        hyper["resolution"] = results.pop("resolution")
    card = {
        "method": request.method,
        "concept": settings["concept"],
        "erase": method.erased(settings),
        "guide": results.pop("guides", None),
        "preserve": settings.get("preserve"),
        "hyperparameters": hyper,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "output_dir": os.path.abspath(request.output_dir),
        "seed": request.seed,
        "device": str(device),
        "results": results,
        "library_versions": library_versions(),
        "numeric_environment": numerics.describe(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["tools/unlearn.py", *request.argv],
    }
    card["wall_seconds"] = round(time.time() - start, 3)
    atomic_write_json(os.path.join(request.output_dir, CARD_FILE), card)
    write_readme(request.output_dir, card)
    print(f"{PROG}: wrote {request.output_dir} ({request.method}, {card['wall_seconds']:.1f} s)", flush=True)
    return card


if __name__ == "__main__":
    with exit_on_input_error(PROG):
        main(parse_args())
