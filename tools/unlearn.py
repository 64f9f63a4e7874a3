#!/usr/bin/env python
"""Make an unlearned Stable Diffusion model (ESD, UCE or another registered method) to measure its concept revival.

    python tools/unlearn.py --method esd-x --concept "Van Gogh" \\
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --output_dir esd-x-vangogh
    python tools/unlearn.py --method uce --erase "golf ball" --preserve "tennis ball" \\
        --pretrained_model_name_or_path sd-v1-4 --output_dir uce-golfball

Reads a diffusers SD directory and writes a full pipeline directory (loadable
with StableDiffusionPipeline.from_pretrained, ready for the fine-tuning
scripts) plus unlearning_card.json and README.md. The methods live in
tools/unlearning/ (one module each, a registry); each one's flags are a group
of --help. docs/unlearning.md says what each method does and which choices we made.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.cli import Parser, add_tf32_arg  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import check_pipeline_dir, resolve_model_path  # noqa: E402
from tools.unlearning import METHODS, base  # noqa: E402
from tools.unlearning.base import Flag, Method, check_text, require  # noqa: E402

CARD_FILE = "unlearning_card.json"
PROG = "unlearn.py"
TRAINING_FLAGS = ("resume", "checkpoint_every")  # flags of the methods that train (Method.trains)
PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "vae": "VAE"}


def _declared() -> Dict[str, List[Tuple[Method, Flag]]]:
    """Each method flag's dest -> the (method, flag) pairs that declare it, in registration order."""
    out: Dict[str, List[Tuple[Method, Flag]]] = {}
    for m in METHODS.values():
        for f in m.flags:
            pairs = out.setdefault(f.dest, [])
            if pairs and pairs[0][1].spec() != f.spec():
                raise ValueError(f"{f.name}: {m.name} declares it with another type, nargs, choices or switch than "
                                 f"{pairs[0][0].name}; a flag several methods share must be the same flag")
            pairs.append((m, f))
    return out


def _code(flag: Flag, shown: str) -> str:
    """A default as docs/flags.md writes it: a value in backticks, words ("none", "the model's") as they are."""
    return shown if flag.default_text is not None or shown in ("none", "off", "on") else f"`{shown}`"


def _by_text(pairs) -> List[Tuple[List[str], str, str]]:
    """[(method names, help, shown default)]: the methods that give a flag the same help and default, together."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for m, f in pairs:
        groups.setdefault((f.help, f.shown_default()), []).append(m.name)
    return [(names, text, default) for (text, default), names in groups.items()]


def _add_flag(g, pairs) -> None:
    """One method flag, with its help and default, or each method's own where the methods differ."""
    groups = _by_text(pairs)
    flag = pairs[0][1]
    if len(groups) == 1:
        _, text, default = groups[0]
        help_text, default_text = f"{text} (default: {default})", _code(flag, default)
    else:
        help_text = "; ".join(f"{'/'.join(names)}: {text} (default: {default})" for names, text, default in groups)
        default_text = "per method: " + "; ".join(f"{'/'.join(names)} {_code(flag, default)}"
                                                  for names, _, default in groups)
    g.add_argument(flag.name, help=help_text, **flag.argparse_kwargs()).default_text = default_text  # flags_reference


def _add_method_flags(p: Parser) -> None:
    """The flags several method families share, then each family's own group (--help lists them so)."""
    declared = _declared()
    families: Dict[str, List[Method]] = {}
    for m in METHODS.values():
        families.setdefault(m.family, []).append(m)
    shared = [d for d, pairs in declared.items() if len({m.family for m, _ in pairs}) > 1]
    if shared:
        g = p.add_argument_group("settings several methods share (each method's own default)")
        for d in shared:
            _add_flag(g, declared[d])
    for family, methods in families.items():
        own = [d for d in declared if d not in shared and declared[d][0][0].family == family]
        if own:
            g = p.add_argument_group(f"{family} (--method {', '.join(m.name for m in methods)})")
            for d in own:
                _add_flag(g, declared[d])


def build_parser() -> Parser:
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=tuple(METHODS),
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path",
                   required=True, help="the base model: a diffusers Stable Diffusion directory")
    p.add_argument("--output_dir", required=True, help="where the unlearned pipeline directory is written")
    p.add_argument("--concept", default=None, help="the concept to erase, as a prompt (ESD: required)")
    p.add_argument("--seed", type=int, default=0, help="seeds the method's sampling and noise (ESD)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    add_tf32_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--concept_probe", type=int, default=4,
                   help="seeded noise latents on which the card compares the model's concept direction (concept "
                        "minus unconditional prediction) before and after, for every method (0: off)")

    trainers = [m.name for m in METHODS.values() if m.trains]
    g = p.add_argument_group(f"checkpoints and resume (--method {', '.join(trainers)})")
    g.add_argument("--resume", action="store_true", default=None,
                   help=f"continue the killed run whose checkpoint is in OUTPUT_DIR/{base.CHECKPOINT_DIR}/ (refused "
                        "when it was written with other settings; none there: start from the beginning)")
    g.add_argument("--checkpoint_every", type=int, default=None,
                   help="training steps between checkpoints (0: none; default: the method's, ESD 100); the "
                        "checkpoint is removed once the model is written")
    for a in g._group_actions:
        a.default_text = "off" if a.dest == "resume" else "the method's"
    _add_method_flags(p)
    return p


def _owners(dest: str) -> List[str]:
    """The methods with flag --dest."""
    if dest in TRAINING_FLAGS:
        return [m.name for m in METHODS.values() if m.trains]
    return [m.name for m in METHODS.values() if dest in m.defaults]


def _settings(args: argparse.Namespace, method: Method) -> dict:
    """This method's own flags with their defaults filled in; another method's flag, given, is refused."""
    own = set(method.defaults) | (set(TRAINING_FLAGS) if method.trains else set())
    others = {d for m in METHODS.values() for d in m.defaults} | set(TRAINING_FLAGS)
    stray = [d for d in sorted(others - own) if getattr(args, d, None) is not None]
    if stray:
        owners = [m for m in METHODS if any(m in _owners(d) for d in stray)]
        whose = (f"a flag of {', '.join(owners)}" if len(stray) == 1 else f"flags of {', '.join(owners)}")
        raise InputError(f"{', '.join('--' + d for d in stray)}: not used by --method {method.name} ({whose})")
    values = {k: (v if getattr(args, k, None) is None else getattr(args, k)) for k, v in method.defaults.items()}
    return {**values, **method.fixed}


def resolve_device(value: str) -> str:
    """'auto' -> cuda when available (this process's GPU under a launcher), else cpu (unless a GPU was asked for:
    common.precision.check_cuda); anything else must name a device this machine has."""
    import torch

    from common.precision import check_cuda

    check_cuda()
    if value == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{os.environ['LOCAL_RANK']}" if os.environ.get("LOCAL_RANK") else "cuda"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {value}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {value}: CUDA is not available on this machine")
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def _check_launch(method: Method) -> None:
    """A method whose authors' code runs on one GPU refuses a multi-process launch (every process would write)."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    require(world <= 1 or method.multi_gpu,
            f"--method {method.name}: runs in one process on one device (as the authors' code); start it with "
            f"python or accelerate launch --num_processes 1, not {world} processes")


def _check_checkpoint(output_dir: str, resume: bool, fingerprint: dict) -> None:
    """An unfinished run's checkpoint in --output_dir is continued with --resume and the same settings, never lost."""
    info = base.checkpoint_info(output_dir)
    if info is None:
        return
    folder = os.path.join(output_dir, base.CHECKPOINT_DIR)
    require(resume, f"--output_dir {output_dir}: holds the checkpoint of an unfinished run (step {info.get('step')} "
                    f"of {info.get('iterations')}); add --resume to continue it, or delete {folder}")
    differ = base.fingerprint_differences(info.get("fingerprint") or {}, fingerprint)
    require(not differ, f"--resume: {folder} was written with other settings ({', '.join(differ)}); resume with "
                        "the same flags, or use another --output_dir")


@dataclass(frozen=True)
class Request:
    """A validated unlearning request; parse_args builds it and never changes the parsed flags."""

    method: str
    settings: dict  # the method's own flags with defaults filled, its fixed settings, plus the concept(s)
    model: str
    output_dir: str
    device: str
    seed: int
    quiet: bool
    argv: tuple  # the command line, for the card
    allow_tf32: bool = False
    concept_probe: int = 4
    resume: bool = False
    checkpoint_every: int = 0
    fingerprint: Optional[dict] = None  # what a checkpoint must have been written with to be resumed


def validate(args: argparse.Namespace, argv) -> Request:
    """Every check that needs no model weights: the method's flags, then the model and output directories."""
    method = METHODS[args.method]
    _check_launch(method)
    if args.concept is not None:
        check_text(args.concept, "--concept")
    device = resolve_device(args.device)
    # Files, still before any model loads.
    check_pipeline_dir(args.pretrained_model_name_or_path)
    model_dir = resolve_model_path(args.pretrained_model_name_or_path)
    require(not os.path.isfile(args.output_dir), f"--output_dir {args.output_dir}: is a file")
    local = os.path.isdir(model_dir)
    if local:
        require(os.path.realpath(args.output_dir) != os.path.realpath(model_dir),
                f"--output_dir {args.output_dir}: is the base model's directory; write the unlearned copy elsewhere")
    settings = method.check(_settings(args, method), args.concept, model_dir if local else None)
    base.check_8bit_adam(bool(settings.get("use_8bit_adam")), device)
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1 and "batch_size" in settings:  # every process trains on its rows of each step's batch
        require(settings["batch_size"] >= world, f"--batch_size {settings['batch_size']}: at least one image per "
                                                 f"process ({world} processes)")
    require(args.concept_probe >= 0, f"--concept_probe {args.concept_probe}: must be >= 0")
    every = method.checkpoint_every if args.checkpoint_every is None else args.checkpoint_every
    require(every >= 0, f"--checkpoint_every {every}: must be >= 0 (0: no checkpoints)")
    # Gradient checkpointing gives the same bits: a run may be resumed with or without it.
    same_bits = {k: v for k, v in settings.items() if k != base.GRADIENT_CHECKPOINTING.dest}
    fingerprint = base.normalise({"method": args.method, "settings": same_bits, "seed": args.seed,
                                  "base_model": os.path.abspath(model_dir) if local else model_dir,
                                  "allow_tf32": args.allow_tf32})
    if method.trains:
        _check_checkpoint(args.output_dir, bool(args.resume), fingerprint)
    return Request(args.method, settings, args.pretrained_model_name_or_path, args.output_dir, device, args.seed,
                   args.quiet, tuple(argv), args.allow_tf32, args.concept_probe, bool(args.resume),
                   every if method.trains else 0, fingerprint)


def parse_args(argv=None) -> Request:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    with exit_on_input_error(parser.prog):
        return validate(args, argv)


# ---- running ------------------------------------------------------------------

def write_readme(path: str, card: dict, edits=("unet",)) -> None:
    from common.results import atomic_write_text

    what = ", ".join(card["erase"])
    changed = " and ".join(PART_NAMES.get(e, e) for e in edits)
    text = (f"# Unlearned model: {card['method']}, erased {what!r}\n\n"
            f"Made by `tools/unlearn.py` from `{card['base_model']}` on {card['created']}; "
            f"every setting is in `{CARD_FILE}`. Only the {changed} "
            f"differ{'s' if len(edits) == 1 else ''} from the base model.\n\n"
            "Measure how fast the concept comes back (see docs/unlearning.md):\n\n"
            f"    accelerate launch finetuning_individual_CLIP.py --pretrained_model_name_or_path={path} ...\n")
    atomic_write_text(os.path.join(path, "README.md"), text)


def main(request: Request) -> dict:
    """Load, unlearn, save the pipeline and its card; return the card."""
    start = time.time()
    import torch

    from common import numerics
    from common.models import save_pipeline
    from common.precision import set_tf32
    from common.results import atomic_write_json, library_versions

    method, settings = METHODS[request.method], request.settings
    set_tf32(request.allow_tf32)
    torch.manual_seed(request.seed)
    device = torch.device(request.device)
    model = resolve_model_path(request.model)
    print(f"{PROG}: loading {model}", flush=True)
    parts = base.load_parts(model)
    before = base.snapshot(parts, method.edits)
    probe = base.ConceptProbe(parts, method.erased(settings), request.concept_probe, request.seed, device,
                              text_encoder_edited="text_encoder" in method.edits)
    log = (lambda line: print(f"{PROG}: {line}", flush=True))
    parallel = base.start_parallel(device) if method.multi_gpu else base.Parallel()
    ctx = base.RunContext(request.output_dir, request.checkpoint_every, request.resume, request.fingerprint, log,
                          parallel=parallel)
    try:
        results: Dict[str, object] = method.run(settings, parts, device, request.seed, request.quiet, ctx)
    finally:
        base.stop_parallel(parallel)
    resolved = results.pop(base.RESOLVED, {})
    guide = results.pop(base.GUIDE, None)
    data = results.pop(base.DATA, None)
    changed = base.changed_parameters(before, parts)
    del before
    hyper = {k: settings[k] for k in method.defaults if k not in method.target_flags}
    hyper.update(resolved)
    card = {
        "method": request.method,
        "concept": settings["concept"],
        "erase": method.erased(settings),
        "guide": guide,
        "preserve": settings.get("preserve"),
        "hyperparameters": hyper,
        "base_model": os.path.abspath(model) if os.path.isdir(model) else model,
        "output_dir": os.path.abspath(request.output_dir),
        "seed": request.seed,
        "device": str(device),
        "results": results,
        "paper": method.paper,
        "code": method.code,
        "data": data,
        "changed_parameters": changed,
        "concept_probe": probe.after(parts),
        "training": ({"checkpoint_every": request.checkpoint_every, "resumed_from_step": ctx.resumed_from}
                     if method.trains else None),
        "library_versions": library_versions(),
        "numeric_environment": numerics.describe(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["tools/unlearn.py", *request.argv],
    }
    if not parallel.main:
        return card  # the main process writes
    save_pipeline(parts, parts.unet, request.output_dir)
    card["wall_seconds"] = round(time.time() - start, 3)
    atomic_write_json(os.path.join(request.output_dir, CARD_FILE), card)
    write_readme(request.output_dir, card, method.edits)
    base.remove_checkpoint(request.output_dir)  # the model is written: nothing left to resume
    print(f"{PROG}: wrote {request.output_dir} ({request.method}, {card['wall_seconds']:.1f} s)", flush=True)
    return card


if __name__ == "__main__":
    with exit_on_input_error(PROG):
        main(parse_args())
