"""SA: Heng & Soh, NeurIPS 2023, "Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative
Models" (docs/unlearning.md: SA).

https://arxiv.org/abs/2305.10120 (code: https://github.com/clear-nus/selective-amnesia, its sd/ part). The UNet is
fine-tuned so that the concept's prompts produce images of a surrogate concept (the forget term), while generated
images of other prompts are replayed (generative replay) and an EWC penalty, weighted by the diagonal Fisher
information of the base model on those replay images, holds the weights that matter for them.

References to the authors' code are to files under sd/ of that repository at commit b736571.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from types import SimpleNamespace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.cli import check_resolution
from common.errors import InputError

from . import base, register
from .base import (DATA, RESOLVED, Flag, Method, RunContext, check_text, finite, model_config_value, require,
                   train_loop)

PAPER = "Heng & Soh, NeurIPS 2023, https://arxiv.org/abs/2305.10120"
CODE = "https://github.com/clear-nus/selective-amnesia"

# README.md step 3 of sd/: the surrogate q(x|c_f) for "brad pitt" is 1000 images of this prompt.
DEFAULT_SURROGATE = "a middle aged man"
TRAIN_METHODS = ("full", "xattn", "noxattn")  # ddpm_forget.py lines 1416-1435 (configure_optimizers)

# Seed streams (base.step_generator's third argument): each kind of draw has its own, so adding draws of one kind
# never moves another's.
TRAIN_STREAM = 1  # per step: captions, latent samples, timesteps, noise
SURROGATE_ORDER_STREAM = 2  # per epoch: the order of the surrogate images
REPLAY_ORDER_STREAM = 3  # per epoch: the order of the replay images
FISHER_STREAM = 4  # per Fisher image: its latent sample and the noise at each timestep
PROBE_STREAM = 5  # the fixed held-out examples of the card's objective

FISHER_FORMAT = "selective-amnesia-fisher-diagonal/1"  # the metadata "format" of a Fisher file
# The UNet config entries a Fisher file's model must share (with a digest of the weights): the architecture.
UNET_KEYS = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
             "cross_attention_dim", "attention_head_dim", "down_block_types", "up_block_types")
DIGEST_SAMPLES = 1024  # evenly strided elements of each tensor that the weights digest reads
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",)  # or sharded: diffusion_pytorch_model-0000N-of-0000M


# ---- which parameters train ---------------------------------------------------


def sa_trainable_names(unet: torch.nn.Module, train_method: str) -> List[str]:
    """UNet parameter names SA trains: all ("full"), cross-attention ("xattn"), or the rest ("noxattn").

    ddpm_forget.py lines 1416-1435: noxattn leaves out cross-attention ('attn2'), the final output layers
    (CompVis 'out.': diffusers conv_norm_out, conv_out) and the time embedding ('time_embed': time_embedding);
    xattn trains every 'attn2' parameter. The celebrity configs train "full", the nudity one "noxattn".
    """
    names = [n for n, _ in unet.named_parameters()]
    if train_method == "full":
        return names
    if train_method == "xattn":
        return [n for n in names if "attn2" in n]
    if train_method == "noxattn":
        excluded = ("conv_norm_out.", "conv_out.", "time_embedding.")
        return [n for n in names if "attn2" not in n and not n.startswith(excluded)]
    raise ValueError(f"unknown SA train method {train_method!r}")


# ---- the model's fingerprint (what a Fisher file must match) --------------------


def weights_digest(names: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, shape and DIGEST_SAMPLES evenly strided fp32 elements, in name order.

    ``get(name)`` gives one tensor at a time (a file's are read one by one). Every tensor is read but a sample of
    each is hashed, so an edited model (ESD, UCE: every element of a changed tensor moves) differs while hashing
    SD's 860M parameters stays cheap.
    """
    h = hashlib.sha256()
    for name in sorted(names):
        t = get(name)
        flat = t.detach().to("cpu", torch.float32).reshape(-1)
        sample = flat[::max(1, flat.numel() // DIGEST_SAMPLES)][:DIGEST_SAMPLES].contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(config, names: Iterable[str], get: Callable[[str], torch.Tensor]) -> dict:
    """The UNet's architecture (UNET_KEYS of its config) and its weights digest."""
    arch = {k: config.get(k) for k in UNET_KEYS}
    return base.normalise({"unet_config": arch, "weights_sha256": weights_digest(names, get)})


def unet_fingerprint(unet: torch.nn.Module) -> dict:
    """The fingerprint of a loaded UNet."""
    state = unet.state_dict()
    return model_fingerprint(dict(unet.config), state, state.__getitem__)


def _weight_files(unet_dir: str) -> List[str]:
    """The safetensors files diffusers loads a UNet from (not a variant's), or [] when there are none."""
    if not os.path.isdir(unet_dir):
        return []
    names = sorted(os.listdir(unet_dir))
    single = [n for n in names if n in WEIGHT_FILES]
    shards = [n for n in names if n.startswith("diffusion_pytorch_model-") and n.endswith(".safetensors")
              and "-of-" in n]
    return [os.path.join(unet_dir, n) for n in (single or shards)]


def model_dir_fingerprint(model_dir: str) -> Optional[dict]:
    """The fingerprint of a diffusers directory's UNet read from its files (None when they are not safetensors)."""
    from safetensors import safe_open

    files = _weight_files(os.path.join(model_dir, "unet"))
    try:
        with open(os.path.join(model_dir, "unet", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not files:
        return None
    where = {}
    for path in files:
        with safe_open(path, framework="pt") as st:
            where.update({name: path for name in st.keys()})

    def get(name: str) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as st:
            return st.get_tensor(name)

    return model_fingerprint(config, where, get)


# ---- the Fisher diagonal ------------------------------------------------------


def fisher_timesteps(count: int, num_train_timesteps: int) -> List[int]:
    """``count`` timesteps spread evenly over the schedule; every timestep when ``count`` is the schedule's length.

    ddpm_fim.py line 362 sums the loss over all 1000 timesteps; fewer (a cheaper estimate) take the midpoints of
    ``count`` equal bins.
    """
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def fisher_diagonal(unet: torch.nn.Module, means: torch.Tensor, stds: torch.Tensor, contexts: torch.Tensor,
                    noise_scheduler, timesteps: Sequence[int], chunk: int, seed: int, device,
                    progress: bool = False, parallel: Optional[base.Parallel] = None) -> Dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of every UNet parameter on images (VAE posteriors ``means``, ``stds``, prompts'
    embeddings ``contexts``), float32 on the CPU.

    As ddpm_fim.py lines 355-393: per image, the gradient of the denoising loss *summed* over the timesteps
    (fresh noise at each) is squared, and the squares are averaged over the images. With fewer timesteps than the
    schedule's T the sum is scaled by T / len(timesteps), an estimate of the full sum, so --ewc_lambda keeps its
    meaning. The timesteps go through the UNet ``chunk`` at a time (their --n_chunks: memory only). With several
    processes (``parallel``) each takes its rows of the images and the sums are added up over the processes.
    """
    from tqdm.auto import tqdm

    total = noise_scheduler.config.num_train_timesteps
    scale = total / len(timesteps)
    params = dict(unet.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, device="cpu") for n, p in params.items()}
    count = means.shape[0]
    parallel = parallel or base.Parallel()
    unet.train()  # as theirs: training_step runs in train mode (SD's UNet has no dropout)
    try:
        for n in tqdm(range(count)[parallel.rows(count)], desc="SA Fisher", disable=not progress):
            generator = base.step_generator(seed, n, FISHER_STREAM)
            z = means[n:n + 1] + stds[n:n + 1] * torch.randn(means[n:n + 1].shape, generator=generator)
            unet.zero_grad(set_to_none=True)
            for b in range(0, len(timesteps), chunk):
                t = torch.tensor(timesteps[b:b + chunk])
                x_t, t, target = base.noised(noise_scheduler, z.expand(len(t), -1, -1, -1).to(device), generator, t)
                pred = unet(x_t, t, encoder_hidden_states=contexts[n:n + 1].expand(len(t), -1, -1).to(device)).sample
                # Each timestep's loss is its mean squared error (their p_losses); the chunk's is their sum.
                F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).sum().backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += (p.grad.detach().to("cpu") * scale) ** 2 / count
    finally:
        unet.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(was[n])
    parallel.all_sum_(fisher.values())
    return fisher


def fisher_settings(samples: int, timesteps: int, resolution: int) -> dict:
    """What a Fisher file was computed with that a run reusing it must share."""
    return {"fisher_samples": samples, "fisher_timesteps": timesteps, "resolution": resolution}


def default_fisher_path(output_dir: str, fingerprint: dict, settings: dict) -> str:
    """OUTPUT_DIR/../sa_fisher-<digest>.safetensors: named after the model and the Fisher settings, so runs into
    sibling directories share it and a run on another model or with other settings never picks it up."""
    key = json.dumps({"model": fingerprint, "fisher": settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), f"sa_fisher-{digest}.safetensors")


def read_fisher_metadata(path: str) -> dict:
    """The metadata of a Fisher file: {model, settings, computed}; InputError naming --fisher_file otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as st:
            meta = st.metadata() or {}
        if meta.get("format") != FISHER_FORMAT:
            raise ValueError(meta.get("format"))
        return {k: json.loads(meta[k]) for k in ("model", "settings", "computed")}
    except Exception:  # safetensors raises its own types for a file that is not one
        raise InputError(f"--fisher_file {path}: not a Fisher file written by --method sa") from None


def check_fisher_file(path: str, meta: dict, fingerprint: Optional[dict], settings: dict) -> None:
    """A Fisher file is reused only for the model it was computed on, with the same Fisher settings."""
    if fingerprint is not None and meta["model"] != fingerprint:
        what = [k for k in ("unet_config", "weights_sha256") if meta["model"].get(k) != fingerprint.get(k)]
        raise InputError(f"--fisher_file {path}: computed on another model (its UNet "
                         f"{' and '.join('config' if k == 'unet_config' else 'weights' for k in what)} differ from "
                         "this base model's); delete it or give another path")
    differ = [k for k in settings if meta["settings"].get(k) != settings[k]]
    if differ:
        was = ", ".join(f"{k} {meta['settings'].get(k)}" for k in differ)
        raise InputError(f"--fisher_file {path}: computed with other settings ({was}); delete it or give another "
                         "path")


def save_fisher(path: str, fisher: Dict[str, torch.Tensor], fingerprint: dict, settings: dict,
                computed: dict) -> None:
    """Write the Fisher diagonal as safetensors with its fingerprint in the header, under a temporary name first."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    meta = {"format": FISHER_FORMAT, "model": json.dumps(base.normalise(fingerprint)),
            "settings": json.dumps(base.normalise(settings)), "computed": json.dumps(base.normalise(computed))}
    save_file({k: v.contiguous() for k, v in fisher.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_fisher(path: str) -> Dict[str, torch.Tensor]:
    """The Fisher diagonal of a file (float32, CPU)."""
    from safetensors.torch import load_file

    return load_file(path)


# ---- the training objective ---------------------------------------------------


def epoch_indices(seed: int, stream: int, n: int, step: int, batch: int) -> torch.Tensor:
    """The ``batch`` indices (of ``n`` items) that step ``step`` draws: epochs of seeded permutations, back to back.

    A pure function of (seed, step): a resumed run draws what the uninterrupted one drew, with no saved state.
    """
    out, cache = [], {}
    for p in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(p, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=base.step_generator(seed, epoch, stream))
        out.append(int(cache[epoch][offset]))
    return torch.tensor(out)


@dataclasses.dataclass
class Batch:
    """One SA example batch: ``forget`` surrogate examples (captioned with the concept) first, then replay ones."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    context: torch.Tensor
    forget: int  # how many of the rows are forget (surrogate) examples


@dataclasses.dataclass
class Data:
    """What training draws from: VAE posteriors and prompt embeddings of the surrogate and replay images."""

    surrogate_mean: torch.Tensor
    surrogate_std: torch.Tensor
    forget_context: torch.Tensor  # [k, 77, d]: the concept's prompts, one drawn per surrogate example
    replay_mean: torch.Tensor
    replay_std: torch.Tensor
    replay_context: torch.Tensor  # [m, 77, d]: the replay prompts
    replay_prompt: torch.Tensor  # [n] each replay image's row of replay_context


def make_batch(data: Data, surrogate_idx: torch.Tensor, replay_idx: torch.Tensor, noise_scheduler,
               generator: torch.Generator, device) -> Batch:
    """The noised examples of surrogate images ``surrogate_idx`` and replay images ``replay_idx``.

    Latents are samples of the VAE posterior (their get_first_stage_encoding); each surrogate example gets one of
    the concept's prompts at random (ldm/data/__init__.py line 69: np.random.choice of the forget prompts).
    """
    captions = torch.randint(data.forget_context.shape[0], (len(surrogate_idx),), generator=generator)
    means = torch.cat([data.surrogate_mean[surrogate_idx], data.replay_mean[replay_idx]])
    stds = torch.cat([data.surrogate_std[surrogate_idx], data.replay_std[replay_idx]])
    latents = means + stds * torch.randn(means.shape, generator=generator)
    context = torch.cat([data.forget_context[captions], data.replay_context[data.replay_prompt[replay_idx]]])
    x_t, t, target = base.noised(noise_scheduler, latents.to(device), generator)
    return Batch(x_t, t, target, context.to(device), len(surrogate_idx))


def ewc_penalty(params: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor],
                fisher: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the trained parameters (ddpm_forget.py lines 354-358; no 1/2)."""
    total = None
    for name, p in params.items():
        term = (fisher[name] * (p - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    return total


def sa_loss(unet, batch: Batch, params: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor],
            fisher: Dict[str, torch.Tensor], ewc_lambda: float, replay_weight: float,
            parallel: Optional[base.Parallel] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """SA's objective on one batch: forget MSE + replay_weight * replay MSE + ewc_lambda * EWC, and its terms.

    ddpm_forget.py line 351: loss = loss_corrupt + gamma * loss_remember, then line 357 adds lmbda * EWC. Both
    halves go through one UNet call (theirs: two; the same objective). With several processes (``parallel``) each
    predicts its rows of each half, weighted by its share, and the main one adds the EWC term: summed over the
    processes, the whole batch's loss and gradient (the terms returned are the sums).
    """
    parallel = parallel or base.Parallel()
    if parallel.world == 1:
        pred = unet(batch.x_t, batch.timesteps, encoder_hidden_states=batch.context).sample
        per = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
        forget, replay = per[:batch.forget].mean(), per[batch.forget:].mean()
    else:
        n, k = batch.x_t.shape[0], batch.forget
        rows = torch.cat([torch.arange(k)[parallel.rows(k)], k + torch.arange(n - k)[parallel.rows(n - k)]])
        kept = len(range(k)[parallel.rows(k)])
        rows = rows.to(batch.x_t.device)
        pred = unet(batch.x_t[rows], batch.timesteps[rows], encoder_hidden_states=batch.context[rows]).sample
        per = F.mse_loss(pred.float(), batch.target[rows].float(), reduction="none").mean(dim=(1, 2, 3))
        forget = per[:kept].mean() * parallel.share(k)
        replay = per[kept:].mean() * parallel.share(n - k)
    ewc = ewc_penalty(params, anchor, fisher)
    loss = forget + replay_weight * replay + (ewc_lambda * ewc if parallel.main else 0.0)
    return loss, {"forget": parallel.sum(forget.item()), "replay": parallel.sum(replay.item()), "ewc": ewc.item()}


@torch.no_grad()
def probe_terms(unet, probes: Optional[Batch]) -> Optional[dict]:
    """Forget and replay MSE on the fixed held-out batch (None when there is none)."""
    if probes is None:
        return None
    was = unet.training
    unet.eval()
    pred = unet(probes.x_t, probes.timesteps, encoder_hidden_states=probes.context).sample
    unet.train(was)
    per = F.mse_loss(pred.float(), probes.target.float(), reduction="none").mean(dim=(1, 2, 3))
    return {"forget": per[:probes.forget].mean().item(), "replay": per[probes.forget:].mean().item()}


class EMA:
    """An exponential moving average of the trained tensors, started at their base values and updated after each
    optimizer step (their LitEma, ldm/modules/ema.py, decay 0.9999); checkpointed with the optimizer."""

    def __init__(self, params: Dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: Dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            self.shadow[n].sub_((1.0 - self.decay) * (self.shadow[n] - p))

    @torch.no_grad()
    def copy_to(self, params: Dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict:
        return {n: t.detach().to("cpu", copy=True) for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, t in self.shadow.items():
            t.copy_(state[n].to(t.device))


class TermLog:
    """Each step's loss terms, checkpointed with the optimizer (train_loop's ``stateful``), so a resumed run's card
    reports the same terms as an uninterrupted one."""

    def __init__(self):
        self.terms: List[Dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"terms": list(self.terms)}

    def load_state_dict(self, state: dict) -> None:
        self.terms = list(state["terms"])


def train_sa(unet, data: Data, fisher: Dict[str, torch.Tensor], names: Sequence[str], noise_scheduler,
             iterations: int, batch_size: int, learning_rate: float, weight_decay: float, ewc_lambda: float,
             replay_weight: float, seed: int, device, progress: bool = True, ema_decay: float = 0.0,
             ctx: Optional[RunContext] = None,
             use_8bit_adam: bool = False) -> Tuple[List[float], List[Dict[str, float]]]:
    """SA fine-tuning of the parameters ``names``; returns each step's loss and terms.

    AdamW (ddpm_forget.py line 1442, torch's defaults besides the learning rate and weight decay), constant
    learning rate. Each step draws ``batch_size`` surrogate and ``batch_size`` replay images from their own
    seeded epoch orders, and everything else from step_generator(seed, step): a resume needs only the weights,
    the optimizer's state and the EMA. With ``ema_decay`` > 0 the UNet ends with the EMA weights (what their
    sampling scripts use); 0: with the trained ones.
    """
    from common.training import select_trainable

    select_trainable(unet, names)
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    anchor = {n: p.detach().clone() for n, p in trained.items()}  # theta*: the base model's weights
    fisher_on = {n: fisher[n].to(device) for n in trained}
    optimizer = base.optimizer(list(trained.values()), "adamw", use_8bit_adam, lr=learning_rate,
                               weight_decay=weight_decay)
    n_s, n_r = data.surrogate_mean.shape[0], data.replay_mean.shape[0]
    log = TermLog()
    ema = EMA(trained, ema_decay) if ema_decay > 0 else None
    parallel = (ctx or RunContext()).parallel
    unet.train()

    def step(i: int):
        generator = base.step_generator(seed, i, TRAIN_STREAM)
        batch = make_batch(data, epoch_indices(seed, SURROGATE_ORDER_STREAM, n_s, i, batch_size),
                           epoch_indices(seed, REPLAY_ORDER_STREAM, n_r, i, batch_size), noise_scheduler, generator,
                           device)
        loss, parts = sa_loss(unet, batch, trained, anchor, fisher_on, ewc_lambda, replay_weight, parallel)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parallel.sum_gradients(trained.values())  # the whole batch's gradient on every process
        optimizer.step()
        if ema is not None:
            ema.update(trained)
        log.terms.append(parts)
        return parallel.sum(loss.item()), {k: f"{v:.3g}" for k, v in parts.items()}

    stateful = {"optimizer": optimizer, "terms": log, **({"ema": ema} if ema is not None else {})}
    losses = train_loop(ctx or RunContext(), iterations, step, trained, stateful, {}, desc="SA", progress=progress)
    if ema is not None:
        ema.copy_to(trained)
    unet.eval()
    return losses, log.terms


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: the authors' SD-1.4 configs and README (docs/unlearning.md: SA gives each one's source)
    Flag("--surrogate", None, "the surrogate concept whose generated images the concept's prompts are trained to "
         "produce (not with --surrogate_data)", default_text=f"{DEFAULT_SURROGATE!r}"),
    Flag("--surrogate_data", None, "an imagefolder (metadata.jsonl, 'prompt' column) of surrogate images instead "
         "of generating them; their prompts are not used"),
    Flag("--surrogate_images", 1000, "surrogate images the base model generates", int),
    Flag("--forget_prompts", [], "more prompts of the concept; each surrogate example is captioned with one of "
         "--concept and these, at random", nargs="+"),
    Flag("--replay_prompts", [], "prompts of what should stay (generative replay and the Fisher), image j from "
         "prompt j mod their number", nargs="+"),
    Flag("--replay_prompts_file", None, "a text file of replay prompts, one per line (with --replay_prompts: both)"),
    Flag("--replay_data", None, "an imagefolder (metadata.jsonl, 'prompt' column) of replay images instead of "
         "generating them"),
    Flag("--replay_images", 5000, "replay images the base model generates", int),
    Flag("--fisher_samples", 5000, "replay images (the first ones) the Fisher diagonal is averaged over", int),
    Flag("--fisher_timesteps", None, "timesteps per image whose summed loss gives the Fisher's gradient", int,
         default_text="all of the model's training timesteps"),
    Flag("--fisher_file", None, "where the Fisher diagonal is read from when it is there (it must come from this "
         "base model and these Fisher settings) or written to", default_text="OUTPUT_DIR/../sa_fisher-DIGEST"
         ".safetensors"),
    Flag("--ewc_lambda", 50.0, "weight of the EWC penalty sum F (theta - theta_base)^2", float),
    Flag("--replay_weight", 1.0, "weight of the replay loss (their gamma)", float),
    # No argparse choices: other methods share the flag with other values (each method's check refuses the rest).
    Flag("--train_method", "full", "UNet parameters trained: full, xattn (cross-attention) or noxattn (all but "
         "cross-attention, time embedding and output layers)"),
    Flag("--iterations", 12600, "training steps", int),
    Flag("--learning_rate", 1.6e-4, "AdamW learning rate", float),
    Flag("--weight_decay", 0.01, "AdamW weight decay", float),
    Flag("--ema_decay", 0.9999, "the written UNet is this exponential moving average of the trained weights, "
         "started at the base model's (as their sampling scripts use); 0: the trained weights", float),
    Flag("--batch_size", 16, "surrogate images per step (and as many replay images); Fisher timesteps per UNet call",
         int),
    Flag("--generation_steps", 50, "DDIM steps of the generated surrogate and replay images", int),
    Flag("--generation_guidance", 7.5, "classifier-free guidance of the generated surrogate and replay images",
         float),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed held-out surrogate and replay examples whose MSE the card reports before and "
         "after; 0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam
)


def _same_prompt(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _positive_int(settings: dict, key: str) -> None:
    require(settings[key] >= 1, f"--{key} {settings[key]}: must be > 0")


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """SA's flags, its data folders, and a given --fisher_file against the base model (before any model loads)."""
    from common.data import read_prompts

    require(concept is not None, "--concept: required for SA")
    forget = [concept] + [check_text(p, "--forget_prompts") for p in settings["forget_prompts"]]
    out = dict(settings)

    # The surrogate: a prompt to generate from, or a folder.
    if settings["surrogate_data"] is not None:
        require(settings["surrogate"] is None, "--surrogate: give a surrogate prompt or --surrogate_data, not both")
        base.load_image_set(settings["surrogate_data"], "--surrogate_data")
    else:
        surrogate = settings["surrogate"] if settings["surrogate"] is not None else DEFAULT_SURROGATE
        check_text(surrogate, "--surrogate")
        same = [p for p in forget if _same_prompt(p, surrogate)]
        if same:
            raise InputError(f"--surrogate {surrogate!r}: is the concept's own prompt {same[0]!r}; the surrogate is "
                             "what the concept should look like instead")
        out["surrogate"] = surrogate
        _positive_int(settings, "surrogate_images")

    # The replay images: prompts to generate from, or a folder; the Fisher takes the first --fisher_samples.
    prompts = [check_text(p, "--replay_prompts") for p in settings["replay_prompts"]]
    if settings["replay_prompts_file"] is not None:
        prompts += read_prompts(settings["replay_prompts_file"], "--replay_prompts_file")
    _positive_int(settings, "fisher_samples")
    if settings["replay_data"] is not None:
        require(not prompts, "--replay_prompts: give replay prompts or --replay_data, not both")
        available = len(base.load_image_set(settings["replay_data"], "--replay_data").paths)
        where = f"--replay_data {settings['replay_data']} holds {available}"
    else:
        require(bool(prompts), "--replay_prompts (or --replay_prompts_file, --replay_data): required: prompts of "
                               "what the model should keep, for generative replay and the Fisher")
        _positive_int(settings, "replay_images")
        available, where = settings["replay_images"], f"--replay_images is {settings['replay_images']}"
    require(settings["fisher_samples"] <= available,
            f"--fisher_samples {settings['fisher_samples']}: at most the replay images ({where})")
    out["replay_prompt_list"] = prompts  # not a flag: the prompts of --replay_prompts and its file together

    finite(settings["ewc_lambda"], "--ewc_lambda", 0, strict=True)
    finite(settings["replay_weight"], "--replay_weight", 0, strict=False)
    finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    finite(settings["weight_decay"], "--weight_decay", 0, strict=False)
    require(math.isfinite(settings["ema_decay"]) and 0 <= settings["ema_decay"] < 1,
            f"--ema_decay {settings['ema_decay']}: must be >= 0 and < 1 (0: no average)")
    finite(settings["generation_guidance"], "--generation_guidance", 0, strict=False)
    require(settings["train_method"] in TRAIN_METHODS,
            f"--train_method {settings['train_method']}: SA trains {', '.join(TRAIN_METHODS)}")
    for key in ("iterations", "batch_size", "generation_steps"):
        _positive_int(settings, key)
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    require(settings["fisher_timesteps"] is None or settings["fisher_timesteps"] >= 1,
            f"--fisher_timesteps {settings['fisher_timesteps']}: must be > 0")
    check_resolution(settings["resolution"])
    if model_dir is not None:
        train_steps = model_config_value(model_dir, "scheduler/scheduler_config.json", "num_train_timesteps") or 1000
        for key in ("generation_steps", "fisher_timesteps"):
            require(settings[key] is None or settings[key] <= train_steps,
                    f"--{key} {settings[key]}: at most the model's {train_steps} training timesteps")
        base.check_vae_multiple(settings["resolution"], model_dir)
    path = settings["fisher_file"]
    if path is not None:
        require(not os.path.isdir(path), f"--fisher_file {path}: is a directory")
        if os.path.isfile(path):
            meta = read_fisher_metadata(path)
            fingerprint, keys = None, {}
            if model_dir is not None:  # else run() checks it, with the model loaded
                fingerprint = model_dir_fingerprint(model_dir)
                keys = fisher_settings(settings["fisher_samples"], settings["fisher_timesteps"] or train_steps,
                                       settings["resolution"] or _model_resolution(model_dir))
            check_fisher_file(path, meta, fingerprint, keys)
    return {**out, "concept": concept}


def _model_resolution(model_dir: str) -> Optional[int]:
    """The UNet's sample size times the VAE's scale factor, from the config files (None when unreadable)."""
    size = model_config_value(model_dir, "unet/config.json", "sample_size")
    blocks = model_config_value(model_dir, "vae/config.json", "block_out_channels")
    if not isinstance(size, int) or not isinstance(blocks, list) or not blocks:
        return None
    from common.models import vae_scale_factor

    return size * vae_scale_factor(SimpleNamespace(block_out_channels=blocks))


def _image_set(parts, settings: dict, role: str, prompts: Sequence[str], count: int, seed: int, resolution: int,
               device, ctx: RunContext, quiet: bool):
    """The ``role`` images: its --*_data folder, else ``count`` generated by the base model with DDIM."""
    from .esd import make_ddim

    folder = settings[f"{role}_data"]
    if folder is not None:
        return base.load_image_set(folder, f"--{role}_data")
    # Their txt2img scripts sample with DDIM (eta 0), 50 steps, guidance 7.5 (txt2img_fim_prompts.py lines 122-193).
    ddim = make_ddim(parts.inference_scheduler.config, settings["generation_steps"])
    images = base.generate_image_set(dataclasses.replace(parts, inference_scheduler=ddim), prompts, count, seed,
                                     ctx.data_dir(role), device, num_inference_steps=settings["generation_steps"],
                                     guidance_scale=settings["generation_guidance"], resolution=resolution,
                                     progress=not quiet, name=role, parallel=ctx.parallel)
    return dataclasses.replace(images, generated={**images.generated, "scheduler": "DDIM, eta 0"})


def _encode_all(parts, prompts: Sequence[str], device) -> torch.Tensor:
    """Text embeddings of ``prompts`` (CPU), 64 at a time."""
    from common.data import encode_prompts

    parts.text_encoder.to(device)
    try:
        with torch.no_grad():
            return encode_prompts(parts.tokenizer, parts.text_encoder, list(prompts), device, batch_size=64).cpu()
    finally:
        parts.text_encoder.to("cpu")


def build_data(parts, forget: Sequence[str], surrogate, replay, resolution: int, device) -> Data:
    """The VAE posteriors of both image sets and the embeddings training pairs them with.

    Surrogate images are captioned with the concept's prompts, never with their own (the surrogate objective:
    ldm/data/__init__.py lines 44-72 caption them with forget_prompt); replay images keep their prompts.
    """
    s_mean, s_std = base.image_latents(parts, surrogate, resolution, device)
    r_mean, r_std = base.image_latents(parts, replay, resolution, device)
    unique = sorted(set(replay.prompts))
    contexts = _encode_all(parts, list(forget) + unique, device)
    row = {p: i for i, p in enumerate(unique)}
    return Data(s_mean, s_std, contexts[:len(forget)], r_mean, r_std, contexts[len(forget):],
                torch.tensor([row[p] for p in replay.prompts]))


_summary = base.loss_summary


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Selective Amnesia on the UNet in place: data, the Fisher (computed or reused), training; the card's results."""
    from common.models import vae_scale_factor

    unet = parts.unet
    total = parts.noise_scheduler.config.num_train_timesteps
    resolution = settings["resolution"] or unet.config.sample_size * vae_scale_factor(parts.vae.config)
    timesteps = settings["fisher_timesteps"] or total
    require(timesteps <= total, f"--fisher_timesteps {timesteps}: at most the model's {total} training timesteps")
    fisher_keys = fisher_settings(settings["fisher_samples"], timesteps, resolution)

    # The Fisher file first: a mismatch is refused before anything is written.
    fingerprint = unet_fingerprint(unet)
    require(settings["fisher_file"] is not None or ctx.output_dir is not None,
            "--fisher_file: required when there is no output directory to put it beside")
    path = settings["fisher_file"] or default_fisher_path(ctx.output_dir, fingerprint, fisher_keys)
    reused = os.path.isfile(path)
    if reused:
        meta = read_fisher_metadata(path)
        check_fisher_file(path, meta, fingerprint, fisher_keys)

    # Data: the base model's images, generated before the UNet changes (surrogate seed + 1: other draws).
    forget = [settings["concept"], *settings["forget_prompts"]]
    surrogate = _image_set(parts, settings, "surrogate", [settings["surrogate"]], settings["surrogate_images"],
                           seed + 1, resolution, device, ctx, quiet)
    replay = _image_set(parts, settings, "replay", settings["replay_prompt_list"], settings["replay_images"], seed,
                        resolution, device, ctx, quiet)
    require(settings["fisher_samples"] <= len(replay.paths),
            f"--fisher_samples {settings['fisher_samples']}: at most the {len(replay.paths)} replay images")
    data = build_data(parts, forget, surrogate, replay, resolution, device)
    r_mean, r_std = data.replay_mean, data.replay_std

    unet.to(device)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if reused:
        fisher = load_fisher(path)
        computed = meta["computed"]
    else:
        n = settings["fisher_samples"]
        fisher = fisher_diagonal(unet, r_mean[:n], r_std[:n], data.replay_context[data.replay_prompt[:n]],
                                 parts.noise_scheduler, fisher_timesteps(timesteps, total), settings["batch_size"],
                                 seed, device, progress=not quiet, parallel=ctx.parallel)
        computed = {"images": os.path.abspath(replay.folder), "first_images": n, "seed": seed,
                    "prompts": sorted(set(replay.prompts[:n]))[:20]}
        if ctx.parallel.main:
            save_fisher(path, fisher, fingerprint, fisher_keys, computed)
            ctx.log(f"wrote the Fisher diagonal to {path}")

    names = sa_trainable_names(unet, settings["train_method"])
    probes = None
    if settings["probe_samples"]:  # held out: their own seed stream, drawn before training
        k = settings["probe_samples"]
        g = base.step_generator(seed, 0, PROBE_STREAM)
        probes = make_batch(data, torch.randint(data.surrogate_mean.shape[0], (k,), generator=g),
                            torch.randint(r_mean.shape[0], (k,), generator=g), parts.noise_scheduler, g, device)
    before = probe_terms(unet, probes)
    losses, terms = train_sa(unet, data, fisher, names, parts.noise_scheduler, settings["iterations"],
                             settings["batch_size"], settings["learning_rate"], settings["weight_decay"],
                             settings["ewc_lambda"], settings["replay_weight"], seed, device, progress=not quiet,
                             ema_decay=settings["ema_decay"], ctx=ctx, use_8bit_adam=settings["use_8bit_adam"])
    after = probe_terms(unet, probes)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    chosen = set(names)
    trained = [p for n, p in unet.named_parameters() if n in chosen]
    unet.requires_grad_(False).to("cpu")
    values = [v for f in fisher.values() for v in (float(f.sum()), float(f.max()))]
    return {
        "trained_parameters": {"tensors": len(trained), "numel": sum(p.numel() for p in trained),
                               "train_method": settings["train_method"]},
        "forget_prompts": forget,
        "loss": _summary(losses),
        "loss_terms": {k: _summary([t[k] for t in terms]) for k in ("forget", "replay", "ewc")},
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before, "after": after},
        "fisher": {"file": os.path.abspath(path), "reused": reused, "computed_with": computed, **fisher_keys,
                   "sum": sum(values[0::2]), "max": max(values[1::2])},
        RESOLVED: {"resolution": resolution, "fisher_timesteps": timesteps, "fisher_file": os.path.abspath(path)},
        DATA: {"surrogate": surrogate.card(), "replay": replay.card()},
    }


def _erased(settings: dict) -> List[str]:
    return [settings["concept"], *settings["forget_prompts"]]


register(Method(name="sa", family="SA", summary="Selective Amnesia: surrogate, generative replay and EWC",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=500, multi_gpu=True))  # their README: Lightning on 4 GPUs (--gpus "0,1,2,3")
