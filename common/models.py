"""Loading the Stable Diffusion parts and the dtype policy (docs/protocols.md: inputs; models and precision).

Every part is loaded in fp32, whatever dtype its files hold (transformers 5
would otherwise keep a saved fp16 text encoder in fp16). The precision policy
itself (weight dtype, autocast, the fp16 fall-back and its CPU emulation) lives
in common/precision.py; ``cast_frozen`` applies it to the frozen VAE and text
encoder, keeping their fp32 weights so that a saved pipeline is the unlearned
model plus the trained UNet, not a rounded copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .precision import MASTER_DTYPE, effective_mixed_precision, weight_dtype_for  # noqa: F401 - re-exported

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# With --use_ema a saved pipeline holds a second UNet: the EMA copy beside the trained one (curriculum-{i}), or the
# trained one beside the EMA copy that is the pipeline's unet/ (the sequential script's final model).
EMA_UNET, TRAINED_UNET = "unet_ema", "unet_trained"


def resolve_model_path(name_or_path: str) -> str:
    """A hub-style id such as 'openai/clip-vit-base-patch32' resolves to a local directory of that name when one exists."""
    expanded = os.path.expanduser(name_or_path)
    return expanded if os.path.isdir(expanded) else name_or_path


def looks_local(name_or_path: str) -> bool:
    """True for strings that can only be a file-system path (not a hub id 'org/name')."""
    p = os.path.expanduser(name_or_path)
    return os.path.isabs(p) or p.startswith(".") or os.sep * 2 in p or p.count("/") > 1 or os.path.exists(p)


def local_dir(path: str, flag: str, probe: str = "config.json", cache_dir: Optional[str] = None) -> Optional[str]:
    """The local directory ``path`` names, or None for a usable hub id; InputError when it names neither.

    A hub id must be in the Hugging Face cache (its ``probe`` file) or, when
    HF_HUB_OFFLINE is not set, known to a reachable hub: an offline node learns
    it now, in one line, not from a retrying download after the data loaded.
    """
    local = resolve_model_path(path)
    if os.path.isdir(local):
        return local
    if looks_local(path):
        raise InputError(f"{flag} {path}: no such directory")
    check_hub_id(path, flag, probe, cache_dir)
    return None


OFFLINE_HINT = ("pass a local directory instead (a directory named like the id in the working directory also "
                "works); see docs/protocols.md, Offline use")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself read it (at its import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_hub_id(repo_id: str, flag: str, probe: str = "config.json", cache_dir: Optional[str] = None) -> None:
    """InputError unless the hub id is cached, or (online) the hub answers for it."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, probe, cache_dir=cache_dir), str):
            return
    except ValueError:  # not a valid repo id: the hub would refuse it too
        raise InputError(f"{flag} {repo_id}: no such directory, and not a valid hub id") from None
    if hub_offline():
        raise InputError(f"{flag} {repo_id}: no local directory of that name and not in the Hugging Face cache "
                         f"(HF_HUB_OFFLINE is set); {OFFLINE_HINT}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # exists; the download uses the user's token
    except RepositoryNotFoundError:
        raise InputError(f"{flag} {repo_id}: no local directory of that name and no such model on the hub") from None
    except HfHubHTTPError:
        return  # the hub answered: the download reports its own error
    except Exception as err:  # noqa: BLE001 - any failure to reach the hub
        raise InputError(f"{flag} {repo_id}: no local directory of that name, not in the Hugging Face cache, and "
                         f"the hub cannot be reached ({type(err).__name__}); {OFFLINE_HINT}") from None


def check_diffusers_dir(path: str, flag: str = "--pretrained_model_name_or_path",
                        cache_dir: Optional[str] = None) -> Optional[str]:
    """The local directory of a diffusers pipeline (None for a hub id); InputError without model_index.json."""
    local = local_dir(path, flag, "model_index.json", cache_dir)
    if local is not None and not os.path.isfile(os.path.join(local, "model_index.json")):
        raise InputError(f"{flag} {path}: no model_index.json (not a diffusers pipeline directory)")
    return local


def check_pipeline_dir(path: str, flag: str = "--pretrained_model_name_or_path",
                       cache_dir: Optional[str] = None) -> None:
    """Raise InputError unless ``path`` is a diffusers SD directory with every part we load."""
    local = check_diffusers_dir(path, flag, cache_dir)
    if local is None:
        return
    missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(local, p))]
    if missing:
        raise InputError(f"{flag} {path}: missing subfolder(s) {', '.join(missing)}")
    for part, config in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                         ("scheduler", "scheduler_config.json")):
        if not os.path.isfile(os.path.join(local, part, config)):
            raise InputError(f"{flag} {path}: {part}/{config} is missing")


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell: 2 per VAE down block after the first (SD-1.x: 8)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from its parts, without safety checker: the toolkit's one way to build one."""
    from diffusers import StableDiffusionPipeline

    from .numerics import portable_scheduler

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=portable_scheduler(scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def unet_safetensors(model_dir: str, variant: Optional[str] = None) -> str:
    """The safetensors file (or shard index) of a local pipeline's UNet; InputError when it has none."""
    import glob

    folder = os.path.join(resolve_model_path(model_dir), "unet")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    raise InputError(f"--restore_from_disk: {folder} has no {stem}.safetensors (found: {', '.join(found) or 'nothing'}); "
                     "the restore reads the model's own safetensors")


@dataclass
class SDParts:
    """The pieces of an SD pipeline that training and validation share."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPM, for training
    inference_scheduler: object  # the pipeline's own, for validation
    # The frozen parts' fp32 weights (CPU) when cast_frozen lowered them to the weight dtype: what a save writes.
    frozen_masters: Optional[dict] = None


def load_sd_parts(path: str, revision: Optional[str] = None, variant: Optional[str] = None) -> SDParts:
    """Load tokenizer, text encoder, VAE, UNet and both schedulers from a diffusers directory, every model in fp32
    (a pipeline saved in fp16 included)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    import diffusers

    path = resolve_model_path(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant,
                                                 dtype=MASTER_DTYPE)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant,
                                        torch_dtype=MASTER_DTYPE)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant,
                                                torch_dtype=MASTER_DTYPE)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    sched_config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision)
    sched_cls = getattr(diffusers, sched_config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    inference_scheduler = sched_cls.from_config(sched_config)
    for module in (text_encoder, vae):
        module.requires_grad_(False)
        module.eval()
    return SDParts(tokenizer, text_encoder, vae, unet, noise_scheduler, inference_scheduler)


FROZEN_PARTS = ("text_encoder", "vae")


def cast_frozen(parts: SDParts, device, dtype: torch.dtype) -> None:
    """Move the frozen VAE and text encoder to ``device`` in ``dtype`` (the weight dtype under autocast); when that
    lowers their precision, keep their loaded weights on the CPU for ``save_pipeline``."""
    if dtype != MASTER_DTYPE and parts.frozen_masters is None:
        # .to(dtype) makes new tensors: these stay as loaded (host memory: ~0.8 GB for SD-1.x).
        parts.frozen_masters = {name: {k: v.detach().to("cpu") for k, v in getattr(parts, name).state_dict().items()}
                                for name in FROZEN_PARTS}
    parts.text_encoder.to(device, dtype=dtype)
    parts.vae.to(device, dtype=dtype)


def _save_frozen_masters(parts: SDParts, folder: str) -> None:
    """Rewrite the frozen parts of a saved pipeline from their loaded (fp32) weights."""
    import copy

    for name in FROZEN_PARTS:
        module = copy.deepcopy(getattr(parts, name)).to("cpu", dtype=MASTER_DTYPE)
        module.load_state_dict(parts.frozen_masters[name])
        module.save_pretrained(os.path.join(folder, name))


def save_pipeline(parts: SDParts, unet: torch.nn.Module, path: str, ema=None, trainable=None,
                  ema_as_unet: bool = False) -> None:
    """Save a loadable StableDiffusionPipeline to ``path`` atomically.

    The trained UNet goes to ``unet/`` and its EMA copy to ``unet_ema/``; with
    ``ema_as_unet`` the EMA weights are the pipeline's UNet (and the trained
    weights go to ``unet_trained/``).

    Written into a temporary sibling directory and renamed. Into an existing
    directory (a run's output directory) each part is renamed into place and
    model_index.json last, so a pipeline directory with model_index.json is
    complete.
    """
    import shutil
    import tempfile

    from .validation import build_pipeline

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        build_pipeline(parts, unet).save_pretrained(tmp)
        if parts.frozen_masters is not None:  # not the fp16 copies training used: the model as it was loaded
            _save_frozen_masters(parts, tmp)
        if ema is not None:
            if ema_as_unet:
                os.replace(os.path.join(tmp, "unet"), os.path.join(tmp, TRAINED_UNET))
            ema.store(trainable)
            ema.copy_to(trainable)
            try:
                unet.save_pretrained(os.path.join(tmp, "unet" if ema_as_unet else EMA_UNET))
            finally:
                ema.restore(trainable)
        if not os.path.exists(path):
            os.replace(tmp, path)
        else:
            _install_entries(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA format (load_lora_weights)
LORA_EMA_FILE = "pytorch_lora_weights_ema.safetensors"  # the adapter's EMA copy, same format
LORA_BASE_FILE = "lora_base.json"  # which pipeline the adapter belongs to, and its configuration


def is_lora_dir(path: str) -> bool:
    """A folder saved by a --params lora run: the adapter and the name of its base pipeline."""
    return os.path.isfile(os.path.join(path, LORA_BASE_FILE)) and os.path.isfile(os.path.join(path, LORA_FILE))


def save_lora(unet: torch.nn.Module, path: str, base_model: str, ema=None, trainable=None) -> None:
    """Save the UNet's LoRA adapter in diffusers' format (and its EMA copy), with the base pipeline's name.

    Atomic like save_pipeline: written into a temporary sibling and renamed, or moved into an existing folder
    (a run's output directory) file by file, lora_base.json last.
    """
    import json
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def write(weight_name):
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=weight_name,
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        write(LORA_FILE)
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
            try:
                write(LORA_EMA_FILE)
            finally:
                ema.restore(trainable)
        config = unet.peft_config["default"]
        base = os.path.abspath(resolve_model_path(base_model)) if looks_local(base_model) else base_model
        with open(os.path.join(tmp, LORA_BASE_FILE), "w") as f:
            json.dump({"base_model": base, "rank": config.r, "alpha": config.lora_alpha,
                       "targets": sorted(config.target_modules), "ema": ema is not None}, f, indent=2)
        if not os.path.exists(path):
            os.replace(tmp, path)
        else:
            for name in sorted(os.listdir(tmp), key=lambda n: n == LORA_BASE_FILE):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install_entries(src: str, dst: str) -> None:
    """Move every entry of ``src`` into ``dst`` (replacing same-named ones), model_index.json last."""
    import shutil

    names = sorted(os.listdir(src), key=lambda n: n == "model_index.json")
    if os.path.exists(os.path.join(dst, "model_index.json")):
        os.unlink(os.path.join(dst, "model_index.json"))  # incomplete until the new one lands
    for name in names:
        target = os.path.join(dst, name)
        if os.path.isdir(target):
            trash = target + ".old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            os.replace(os.path.join(src, name), target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(os.path.join(src, name), target)
    shutil.rmtree(src, ignore_errors=True)
