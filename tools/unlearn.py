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
from datetime import datetime, timezone
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.cli import Parser, check_resolution  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import check_pipeline_dir, resolve_model_path, vae_scale_factor  # noqa: E402
from common.training import select_trainable  # noqa: E402
from tools.unlearning import ESD_METHODS, METHODS, TOKEN_MODES  # noqa: E402

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


def _fill_method_defaults(args: argparse.Namespace) -> None:
    """Reject the other method's flags, then fill this method's defaults."""
    esd = args.method in ESD_METHODS
    own, other = (ESD_DEFAULTS, UCE_DEFAULTS) if esd else (UCE_DEFAULTS, ESD_DEFAULTS)
    stray = [_flag(k) for k in other if getattr(args, k) is not None]
    _require(not stray, f"{', '.join(stray)}: not used by --method {args.method}")
    for k, v in own.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _check_text(value: str, flag: str) -> str:
    _require(value.strip() != "", f"{flag}: empty concept")
    return value


def _finite(value: float, flag: str, low: float, strict: bool) -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _require(ok, f"{flag} {value}: must be {'>' if strict else '>='} {low:g}")


def resolve_device(value: str) -> str:
    """'auto' -> cuda when available, else cpu; anything else must name a device this machine has."""
    import torch

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


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model weights: flags, then the model and output directories."""
    _fill_method_defaults(args)
    if args.concept is not None:
        _check_text(args.concept, "--concept")
    if args.method in ESD_METHODS:
        _require(args.concept is not None, f"--concept: required for --method {args.method}")
        _finite(args.eta, "--eta", 0, strict=False)
        _require(args.iterations >= 1, f"--iterations {args.iterations}: must be at least 1")
        _finite(args.learning_rate, "--learning_rate", 0, strict=True)
        _require(args.ddim_steps >= 1, f"--ddim_steps {args.ddim_steps}: must be at least 1")
        _finite(args.sample_guidance, "--sample_guidance", 0, strict=False)
        _require(args.probe_samples >= 0, f"--probe_samples {args.probe_samples}: must be >= 0")
        check_resolution(args.resolution)
    else:
        for c in args.erase:
            _check_text(c, "--erase")
        args.erase = list(args.erase) + ([args.concept] if args.concept is not None else [])
        _require(args.erase, "--erase (or --concept): give at least one concept to erase")
        _require(len(args.guide) in (1, len(args.erase)),
                 f"--guide: give one guide, or one per erased concept ({len(args.erase)}), not {len(args.guide)}")
        for c in args.preserve:
            _check_text(c, "--preserve")
            _require(c not in args.erase, f"--preserve {c!r}: also erased; a concept cannot be both")
        _finite(args.lamb, "--lamb", 0, strict=True)
        _finite(args.erase_scale, "--erase_scale", 0, strict=True)
        _finite(args.preserve_scale, "--preserve_scale", 0, strict=True)
    args.device = resolve_device(args.device)
    # Then files, still before any model loads.
    check_pipeline_dir(args.pretrained_model_name_or_path)
    model_dir = resolve_model_path(args.pretrained_model_name_or_path)
    _require(not os.path.isfile(args.output_dir), f"--output_dir {args.output_dir}: is a file")
    if os.path.isdir(model_dir):
        _require(os.path.realpath(args.output_dir) != os.path.realpath(model_dir),
                 f"--output_dir {args.output_dir}: is the base model's directory; write the unlearned copy elsewhere")
        if args.method in ESD_METHODS:
            blocks = _config_value(model_dir, "vae/config.json", "block_out_channels")
            factor = vae_scale_factor(SimpleNamespace(block_out_channels=blocks)) if isinstance(blocks, list) and blocks \
                else None
            if args.resolution is not None and factor:
                _require(args.resolution % factor == 0,
                         f"--resolution {args.resolution}: must be a multiple of the VAE's scale factor {factor}")
            train_steps = _config_value(model_dir, "scheduler/scheduler_config.json", "num_train_timesteps") or 1000
            _require(args.ddim_steps <= train_steps,
                     f"--ddim_steps {args.ddim_steps}: at most the model's {train_steps} training timesteps")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the card
    with exit_on_input_error(parser.prog):
        validate(args)
    return args


# ---- running ------------------------------------------------------------------

def hyperparameters(args: argparse.Namespace) -> dict:
    """The method's settings as the card records them."""
    keys = ESD_DEFAULTS if args.method in ESD_METHODS else UCE_DEFAULTS
    return {k: getattr(args, k) for k in keys if k not in ("erase", "guide", "preserve")}


def run_esd(args, parts, device) -> dict:
    """Train the UNet with ESD in place; return what the card records."""
    import copy

    from tools import unlearning as ul

    unet = parts.unet.to(device)
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    parts.text_encoder.to(device)
    cond, uncond = ul.encode_prompts(parts.tokenizer, parts.text_encoder, [args.concept, ""], device).chunk(2)
    parts.text_encoder.to("cpu")
    factor = vae_scale_factor(parts.vae.config)
    resolution = args.resolution or unet.config.sample_size * factor
    args.resolution = resolution
    latent_shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    scheduler = ul.make_ddim(parts.inference_scheduler.config, args.ddim_steps)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    names = ul.esd_trainable_names(unet, args.method)
    params = select_trainable(unet, names)
    # Held-out: their own seed stream, fixed before training (the frozen model makes them).
    probes = ul.esd_probe_set(frozen, scheduler, cond, uncond, args.probe_samples, latent_shape, args.seed + 1,
                              args.sample_guidance, args.eta, device)
    before = ul.esd_objective(unet, probes, cond)
    losses = ul.train_esd(unet, frozen, scheduler, cond, uncond, params, iterations=args.iterations,
                          learning_rate=args.learning_rate, eta=args.eta, guidance=args.sample_guidance,
                          latent_shape=latent_shape, seed=args.seed, device=device, progress=not args.quiet)
    after = ul.esd_objective(unet, probes, cond)
    if args.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    del frozen
    unet.requires_grad_(False).to("cpu")
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "trained_parameters": {"tensors": len(params), "numel": sum(p.numel() for p in params)},
        "loss": {"first": losses[0], "last": losses[-1], "mean_last_10pct": sum(tail) / len(tail)},
        "objective_on_probes": {"samples": args.probe_samples, "before": before if probes else None,
                                "after": after if probes else None},
        "latent_shape": list(latent_shape),
    }


def run_uce(args, parts, device) -> dict:
    """Edit the UNet's cross-attention key/value projections in place; return what the card records."""
    from tools import unlearning as ul

    guides = args.guide * len(args.erase) if len(args.guide) == 1 else list(args.guide)
    parts.text_encoder.to(device)
    E, G, P = ul.uce_embeddings(parts.tokenizer, parts.text_encoder, args.erase, guides, args.preserve,
                                args.token_positions, device)
    parts.text_encoder.to("cpu")
    M = ul.uce_transform(E, G, P, args.lamb, args.erase_scale, args.preserve_scale)
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


def write_readme(path: str, card: dict) -> None:
    from common.results import atomic_write_text

    what = card["concept"] if card["method"] in ESD_METHODS else ", ".join(card["erase"])
    text = (f"# Unlearned model: {card['method']}, erased {what!r}\n\n"
            f"Made by `tools/unlearn.py` from `{card['base_model']}` on {card['created']}; "
            f"every setting is in `{CARD_FILE}`. Only the UNet differs from the base model.\n\n"
            "Measure how fast the concept comes back (see docs/unlearning.md):\n\n"
            f"    accelerate launch finetuning_individual_CLIP.py --pretrained_model_name_or_path={path} ...\n")
    atomic_write_text(os.path.join(path, "README.md"), text)


def main(args: argparse.Namespace) -> dict:
    """Load, unlearn, save the pipeline and its card; return the card."""
    start = time.time()
    import torch

    from common.models import load_sd_parts, save_pipeline
    from common.results import atomic_write_json, library_versions

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    base = resolve_model_path(args.pretrained_model_name_or_path)
    print(f"{PROG}: loading {base}", flush=True)
    parts = load_sd_parts(base)
    results = run_esd(args, parts, device) if args.method in ESD_METHODS else run_uce(args, parts, device)
    save_pipeline(parts, parts.unet, args.output_dir)
    card = {
        "method": args.method,
        "concept": args.concept,
        "erase": args.erase if args.method == "uce" else [args.concept],
        "guide": results.pop("guides", None),
        "preserve": args.preserve if args.method == "uce" else None,
        "hyperparameters": hyperparameters(args),
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "output_dir": os.path.abspath(args.output_dir),
        "seed": args.seed,
        "device": str(device),
        "results": results,
        "library_versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["tools/unlearn.py"] + args.argv,
    }
    card["wall_seconds"] = round(time.time() - start, 3)
    atomic_write_json(os.path.join(args.output_dir, CARD_FILE), card)
    write_readme(args.output_dir, card)
    print(f"{PROG}: wrote {args.output_dir} ({args.method}, {card['wall_seconds']:.1f} s)", flush=True)
    return card


if __name__ == "__main__":
    with exit_on_input_error(PROG):
        main(parse_args())
