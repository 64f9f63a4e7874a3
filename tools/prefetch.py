#!/usr/bin/env python
"""Download the models the toolkit's configurations use into one folder, for compute nodes without network.

    python tools/prefetch.py --out /data/models --dry_run          # what, how big, the flags; nothing downloaded
    python tools/prefetch.py --out /data/models                    # every model
    python tools/prefetch.py --out /data/models --what sd14,clip-b32

Run it on a machine that reaches the Hugging Face hub (and GitHub: FID's Inception weights come from
torch-fidelity's release there). Each model goes to
OUT/FOLDER as plain files (snapshot_download's local_dir, not the cache), only
the files the toolkit loads (SD-1.4: the diffusers parts' fp32 safetensors, no
.ckpt, no safety checker, which no program loads). Then it prints the flags
that point the programs at them, and HF_HUB_OFFLINE=1 for the compute node
(docs/protocols.md: offline use). A model whose download fails is named in one
line with the hub's error and the others go on; the exit status is then 1. A
folder a finished download left (its prefetch.json) is skipped; an
interrupted one resumes where it stopped.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from common.errors import Parser
from common.errors import InputError, exit_on_input_error
from common.results import atomic_write_json

PROG = "prefetch.py"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
MARKER = "prefetch.json"  # written last: the folder holds a finished download


@dataclass(frozen=True)
class Model:
    key: str  # the --what name
    repo_id: str
    folder: str  # under --out; stable, so printed flags and grids can name it
    files: Tuple[str, ...]  # allow_patterns besides the weights: configs, tokenizers, processors
    weights: Tuple[Tuple[str, ...], ...]  # alternatives, in order of preference: the first the repository has
    size_gb: float  # approximate download, GB (10^9 bytes) as the hub lists the files
    flags: Tuple[str, ...]  # how the programs use it, {path} the folder
    used_by: str
    url: Optional[str] = None  # a file from this address instead of a hub repository (weights: its one file name)


# Sizes: the hub's file listings (huggingface.co/REPO/tree/main), read 2026-12 through stored copies of those pages.
MODELS = (
    # diffusers loads model_index.json's parts; feature_extractor/ too (AutoPipelineForText2Image and
    # StableDiffusionPipeline.from_pretrained read it even with safety_checker=None, which every program passes).
    # unet 3.44 GB + text_encoder 0.492 + vae 0.335; the repository's .bin copies and the 1.22 GB safety checker
    # are left out.
    Model("sd14", "CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-4",
          ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "unet/config.json",
           "vae/config.json", "text_encoder/config.json", "feature_extractor/preprocessor_config.json"),
          (("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"),),
          4.27, ("--pretrained_model_name_or_path {path}",),
          "the base model: generate_training_data.py, unlearn.py, a control run, P4D's --original_model"),
    # The default --clip_model (common/clip_score.py DEFAULT_CLIP). Its main branch holds pytorch_model.bin
    # (605 MB); a safetensors copy, were it merged, is preferred.
    Model("clip-b32", "openai/clip-vit-base-patch32", "clip-vit-base-patch32",
          ("*.json", "*.txt"), (("model.safetensors",), ("pytorch_model.bin",)),
          0.61, ("--clip_model {path}",),
          "the CLIP score (default --clip_model): the fine-tuning scripts, eval_model.py, the probes, the attacks"),
    # The CLIP-score model of many unlearning papers; --clip_model takes it instead of B/32 (1.71 GB; safetensors
    # preferred, the .bin where main lacks it).
    Model("clip-l14", "openai/clip-vit-large-patch14", "clip-vit-large-patch14",
          ("*.json", "*.txt"), (("model.safetensors",), ("pytorch_model.bin",)),
          1.71, ("--clip_model {path}",),
          "an alternative CLIP scorer (ViT-L/14)"),
    # The classifier backbone (tools/train_classifier.py DEFAULT_BACKBONE) and the published processor
    # (common/classifier.py DEFAULT_PROCESSOR): model.safetensors 1.22 GB, on main since its safetensors PR (#1).
    Model("vit-l16-in21k", "google/vit-large-patch16-224-in21k", "vit-large-patch16-224-in21k",
          ("config.json", "preprocessor_config.json"), (("model.safetensors",),),
          1.22, ("--model_name_or_path {path}", "--classifier_processor {path}"),
          "train_classifier.py's backbone; --classifier_processor for a classifier without its own processor "
          "or under --compat reference"),
    # The style classifier's starting weights (--timm_arch vit_large_patch16_224.augreg_in21k, common/classifier.py
    # DEFAULT_TIMM_ARCH): timm's own state dict with its 21k-class head, which train_classifier.py replaces (1.3 GB).
    Model("timm-vit-l16-in21k", "timm/vit_large_patch16_224.augreg_in21k", "vit_large_patch16_224.augreg_in21k",
          ("config.json",), (("model.safetensors",),),
          1.3, ("--timm_arch vit_large_patch16_224.augreg_in21k --init_weights {path}/model.safetensors",),
          "train_classifier.py's style classifiers (--timm_arch)"),
    # FID's Inception-v3 (--fid_features inception, the default): torch-fidelity's weights file, from its GitHub
    # release (torch_fidelity/feature_extractor_inceptionv3.py URL_INCEPTION_V3), not on the hub. About 0.1 GB:
    # the network's 23.9M parameters in fp32.
    Model("inception", "github.com/toshas/torch-fidelity", "inception",
          (), ((INCEPTION_FILE,),), 0.1, (f"--inception_weights {{path}}/{INCEPTION_FILE}",),
          "FID and KID on Inception features: eval_model.py --utility, the fine-tuning scripts' --utility_fid",
          url=f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"),
)
BY_KEY = {m.key: m for m in MODELS}
# Listed, never downloaded: NudeNet 3's detector (--theme Nudity) ships in the nudenet wheel.
IN_WHEELS = (("nudenet", "320n.onnx, inside the nudenet wheel (requirements.txt): nothing to download"),)


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("--out", required=True, help="the folder the models go to, each in a folder of its own")
    p.add_argument("--what", default="all",
                   help=f"comma-separated models: {', '.join(BY_KEY)}, or all (default)")
    p.add_argument("--dry_run", action="store_true",
                   help="list the models, their approximate sizes, the total and the flags; download nothing")
    return p


def select(what: str) -> List[Model]:
    """The models --what names, in MODELS' order; InputError naming an unknown one."""
    keys = [k.strip() for k in what.split(",") if k.strip()]
    if keys == ["all"]:
        return list(MODELS)
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise InputError(f"--what {what}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                         f"choose from {', '.join(BY_KEY)} or all")
    return [m for m in MODELS if m.key in keys]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it: set, every download would fail."""
    from common.models import hub_offline as offline

    return offline()


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_input_error(PROG):
        args.models = select(args.what)
        if not args.dry_run:
            if hub_offline():
                raise InputError("HF_HUB_OFFLINE is set: run this on a machine with network, without it")
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise InputError(f"--out {args.out}: not a directory")
    return args


def snapshot_download(**kwargs) -> str:
    """huggingface_hub's snapshot_download (imported here, so that --dry_run and --help need no hub)."""
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def download_url(url: str, path: str) -> None:
    """One file from ``url`` to ``path``, through a .part file renamed when complete (an interrupted download is
    never taken for the file)."""
    import shutil
    import urllib.request

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response, open(path + ".part", "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(path + ".part", path)


def has_files(folder: str, patterns) -> bool:
    """Whether every pattern matches a file under ``folder`` (paths relative to it, as allow_patterns match)."""
    found = [os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
             for d, _, names in os.walk(folder) for f in names]
    return all(any(fnmatch.fnmatch(f, p) for f in found) for p in patterns)


def finished(model: Model, out: str) -> bool:
    """Whether an earlier run finished this model's download into ``out``."""
    return os.path.isfile(os.path.join(out, model.folder, MARKER))


def _reason(err: BaseException) -> str:
    """The error's type and the first line of its message: what one line can carry."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def fetch(model: Model, out: str) -> Optional[str]:
    """Download one model into OUT/FOLDER; None when it is there, else the one-line reason it is not."""
    dest = os.path.join(out, model.folder)
    if model.url:
        (name,), = model.weights
        try:
            download_url(model.url, os.path.join(dest, name))
        except Exception as err:  # noqa: BLE001 - the network and the disk raise many types; each is one line
            return _reason(err)
        atomic_write_json(os.path.join(dest, MARKER), {"url": model.url,
                                                       "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return None
    for weights in model.weights:
        try:
            # Several repositories keep other frameworks' copies (.bin, .h5, .msgpack, .ckpt): only what we load.
            snapshot_download(repo_id=model.repo_id, local_dir=dest, allow_patterns=[*model.files, *weights])
        except Exception as err:  # noqa: BLE001 - the hub, the network and the disk raise many types; each is one line
            return _reason(err)
        if has_files(dest, weights):
            atomic_write_json(os.path.join(dest, MARKER), {
                "repo_id": model.repo_id, "allow_patterns": [*model.files, *weights],
                "downloaded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            return None
    return f"the repository has none of the weight files {' or '.join(', '.join(w) for w in model.weights)}"


def hf_command(model: Model, out: str) -> str:
    """The same download with huggingface_hub's own command line (every weights alternative included); a file
    from an address, with curl."""
    if model.url:
        return f"curl -L --create-dirs -o {os.path.join(out, model.folder, model.weights[0][0])} {model.url}"
    patterns = [*model.files, *(p for w in model.weights for p in w)]
    include = " ".join(f'--include "{p}"' for p in patterns)
    return f"hf download {model.repo_id} --local-dir {os.path.join(out, model.folder)} {include}"


def size_table(models) -> List[str]:
    """One line per model (key, repository, folder, approximate size), the wheel-shipped ones, and the total."""
    row = "{:<20} {:<40} {:<36} {:>8}"
    lines = [row.format(m.key, m.repo_id, m.folder, f"{m.size_gb:.2f} GB") for m in models]
    lines += [f"{name:<20} {what}" for name, what in IN_WHEELS]
    lines.append(row.format("total", "", "", f"{sum(m.size_gb for m in models):.2f} GB") + " (approximate)")
    return lines


def flag_lines(models, out: str) -> List[str]:
    """The flags that point the programs at the downloaded folders, then HF_HUB_OFFLINE for the compute node."""
    lines = []
    for m in models:
        lines.append(f"  {m.key}: {m.used_by}")
        lines += [f"    {flag.format(path=os.path.join(out, m.folder))}" for flag in m.flags]
    return lines + ["and on the compute node, before the programs run:", "  export HF_HUB_OFFLINE=1"]


def main(args) -> int:
    out = os.path.abspath(args.out)  # the printed flags work from any directory
    if args.dry_run:
        print("\n".join(size_table(args.models)))
        print(f"flags, once downloaded into {out}:")
        print("\n".join(flag_lines(args.models, out)))
        return 0
    os.makedirs(out, exist_ok=True)
    present, failed = [], []
    for m in args.models:
        if finished(m, out):
            print(f"{m.key}: already in {os.path.join(out, m.folder)}", flush=True)
            present.append(m)
            continue
        print(f"{m.key}: downloading {m.repo_id} (about {m.size_gb:.2f} GB) into {os.path.join(out, m.folder)}",
              flush=True)
        reason = fetch(m, out)
        if reason is None:
            present.append(m)
        else:
            failed.append(m)
            print(f"{PROG}: {m.key} ({m.repo_id}) not downloaded: {reason}", file=sys.stderr, flush=True)
    if present:
        print("flags:")
        print("\n".join(flag_lines(present, out)))
    if failed:
        print(f"{PROG}: {len(failed)} of {len(args.models)} model(s) not downloaded: "
              f"{', '.join(m.key for m in failed)} (run the same command again to retry)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
