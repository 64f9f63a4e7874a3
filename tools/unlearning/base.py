"""What every unlearning method shares (docs/unlearning.md: adding a method).

- ``Method`` and ``Flag``: a method's description, its own flags, their checks and its ``run``;
  ``RunContext``: what ``run`` gets beside its settings (where to checkpoint, whether to resume).
- Settings checks that name the flag (``require``, ``check_text``, ``finite``, ``model_config_value``).
- Model pieces: ``load_parts``, ``frozen_copy``, ``encode``, ``latent_shape``.
- Seeded draws, made on the CPU so a seed gives the same numbers on any device: ``noise``,
  ``step_generator``, ``draw_timesteps``, ``noised``.
- ``train_loop``: the steps of a training method with a checkpoint every N steps and a resume that ends in
  the same weights as an uninterrupted run.
- Data: ``load_image_set`` (an imagefolder with a ``prompt`` column), ``generate_image_set`` (images
  of the base model, as tools/generate_training_data.py makes them), ``image_latents``.
- The card's method-independent parts: ``snapshot`` and ``changed_parameters`` (which tensors changed
  and by how much), ``ConceptProbe`` (how much of the base model's concept direction is left).

Functions take plain values (modules, tensors, numbers), never the argument namespace, so tests drive them
directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.errors import InputError

# ---- the method type ----------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One flag of a method: argparse's spec of it, and the value the method uses when it is not given.

    The parser adds it with ``default=None`` (a switch too), so a flag left at None was not given and one given
    to another method is refused, not ignored. Methods may declare the same flag (same name, type, nargs,
    choices, switch): it is added once, each method keeping its own default and help.
    """

    name: str  # "--learning_rate"; its dest (the settings key) is the name without the dashes
    default: object  # the method's value when the flag is not given
    help: str  # what it does; --help adds the default
    type: Optional[Callable] = None  # float, int, str (None: str)
    nargs: Optional[str] = None  # "+" or "*" for a list
    choices: Optional[Tuple] = None
    switch: bool = False  # store_true: given means True (its default is False)
    default_text: Optional[str] = None  # how --help says a default the value does not say ("the model's own")

    @property
    def dest(self) -> str:
        return self.name.lstrip("-")

    def spec(self) -> tuple:
        """What two methods declaring this flag must agree on."""
        return (self.type, self.nargs, self.choices, self.switch)

    def argparse_kwargs(self) -> dict:
        """add_argument's keyword arguments (default None: see above)."""
        if self.switch:
            return {"action": "store_true", "default": None}
        kwargs = {"default": None, "type": self.type, "nargs": self.nargs, "choices": self.choices}
        return {k: v for k, v in kwargs.items() if v is not None or k == "default"}

    def shown_default(self) -> str:
        """The default as --help and docs/flags.md say it."""
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if self.switch or isinstance(value, bool):
            return "on" if value else "off"
        if value is None or value == []:
            return "none"
        if isinstance(value, (list, tuple)):
            return " ".join(repr(v) for v in value)
        return repr(value) if value == "" else str(value)


@dataclass(frozen=True)
class Method:
    """One unlearning method: what it is, its flags and their checks, the edit itself."""

    name: str  # the --method value
    family: str  # its flags' --help group title ("ESD": esd-x and esd-u share it and their flags)
    summary: str  # one line for --method's help: what it changes
    paper: str  # authors, venue, year, URL
    code: str  # the authors' code (URL)
    flags: Tuple[Flag, ...]
    # (settings, --concept or None, the local model directory or None) -> settings, "concept" included;
    # raises InputError naming the flag. Runs before any model loads.
    check: Callable[[dict, Optional[str], Optional[str]], dict]
    # (settings, parts, device, seed, quiet, ctx) -> results for the card; edits the parts in place.
    run: Callable[..., dict]
    erased: Callable[[dict], List[str]]  # the prompts erased: the card's "erase", the concept probe's prompts
    fixed: Dict[str, object] = field(default_factory=dict)  # settings the name implies (ESD's variant), not flags
    trains: bool = False  # trains with train_loop: --resume and --checkpoint_every apply
    checkpoint_every: int = 0  # the default --checkpoint_every of a training method (0: no checkpoints)
    multi_gpu: bool = False  # runs under `accelerate launch --num_processes N` (else refused there)
    target_flags: Tuple[str, ...] = ()  # settings the card lists at its top level (erase, guide, preserve)
    edits: Tuple[str, ...] = ("unet",)  # the pipeline parts it may change (the card's changed_parameters)

    @property
    def defaults(self) -> Dict[str, object]:
        """Each of its flags' dest -> its default."""
        return {f.dest: f.default for f in self.flags}


@dataclass
class RunContext:
    """What ``Method.run`` gets beside its settings: where to checkpoint, how often, whether to resume."""

    output_dir: Optional[str] = None  # None: no checkpoints (a run driven from a test)
    checkpoint_every: int = 0  # steps; 0: never
    resume: bool = False  # continue from output_dir/unlearn_checkpoint/ when it is there
    fingerprint: Optional[dict] = None  # the settings a checkpoint must have been written with
    log: Callable[[str], None] = print
    resumed_from: Optional[int] = None  # set by train_loop: the step a resumed run started at
    parallel: "Parallel" = field(default_factory=lambda: Parallel())  # this process's rank (a multi_gpu launch)

    def data_dir(self, role: str) -> str:
        """Where a data set the method generates goes: OUTPUT_DIR/unlearn_data/ROLE (kept: the card points at it)."""
        if self.output_dir is None:
            raise ValueError("no output directory to generate data into")
        return os.path.join(self.output_dir, DATA_DIR, role)


DATA_DIR = "unlearn_data"  # inside --output_dir: data sets a method generated with the base model

# Results keys Method.run may return that the CLI lifts out of "results" into the card.
RESOLVED = "resolved"  # {setting: value} a setting resolved at run time (ESD's resolution from the model)
GUIDE = "guide"  # the guide concept per erased one (UCE)
DATA = "data"  # {role: ImageSet.card()} the data sets used (forget, retain, anchor, replay images)

# ---- settings checks ----------------------------------------------------------


def require(condition: bool, message: str) -> None:
    """InputError(message) unless ``condition``."""
    if not condition:
        raise InputError(message)


def check_text(value: str, flag: str) -> str:
    """A concept given as a prompt: not empty."""
    require(value.strip() != "", f"{flag}: empty concept")
    return value


def finite(value: float, flag: str, low: float, strict: bool) -> None:
    """A finite number above ``low`` (``strict``) or at least ``low``."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    require(ok, f"{flag} {value}: must be {'>' if strict else '>='} {low:g}")


def model_config_value(model_dir: str, rel_path: str, key: str):
    """One entry of a part's JSON config, or None when unreadable here (the model load then reports it)."""
    try:
        with open(os.path.join(model_dir, rel_path), encoding="utf-8") as f:
            return json.load(f)[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- model pieces -------------------------------------------------------------


def check_vae_multiple(resolution: Optional[int], model_dir: Optional[str]) -> None:
    """--resolution must be a multiple of the model's VAE scale factor (checked when the VAE's config is on disk)."""
    if resolution is None or model_dir is None:
        return
    from common.models import vae_scale_factor

    blocks = model_config_value(model_dir, "vae/config.json", "block_out_channels")
    if isinstance(blocks, list) and blocks:
        factor = vae_scale_factor(SimpleNamespace(block_out_channels=blocks))
        require(resolution % factor == 0,
                f"--resolution {resolution}: must be a multiple of the VAE's scale factor {factor}")


def check_sampled_training(resolution: Optional[int], ddim_steps: int, model_dir: Optional[str]) -> None:
    """The checks of a method that samples x_t with DDIM (ESD, SPM, Receler): --resolution, and against a local
    model's own configuration its VAE scale factor and --ddim_steps at most its training timesteps."""
    from common.cli import check_resolution

    check_resolution(resolution)
    if model_dir is not None:
        check_vae_multiple(resolution, model_dir)
        train_steps = model_config_value(model_dir, "scheduler/scheduler_config.json", "num_train_timesteps") or 1000
        require(ddim_steps <= train_steps, f"--ddim_steps {ddim_steps}: at most the model's {train_steps} training "
                                           "timesteps")


def loss_summary(values: Sequence[float]) -> dict:
    """The card's summary of a run's losses: first, last and the mean of the last tenth."""
    tail = list(values[-max(1, len(values) // 10):])
    return {"first": values[0] if len(values) else None, "last": values[-1] if len(values) else None,
            "mean_last_10pct": sum(tail) / len(tail) if tail else None}


def load_parts(model: str):
    """Tokenizer, text encoder, VAE, UNet and both schedulers of a diffusers SD directory (or hub id), fp32, CPU."""
    from common.models import load_sd_parts, resolve_model_path

    return load_sd_parts(resolve_model_path(model))


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy that never trains (the teacher a method regresses to), on the module's device, eval mode."""
    import copy

    return copy.deepcopy(module).requires_grad_(False).eval()


def encode(parts, prompts: Sequence[str], device) -> torch.Tensor:
    """The text encoder's last hidden states of ``prompts`` on ``device`` [n, 77, d]; the encoder back on the CPU."""
    from common.data import encode_prompts

    parts.text_encoder.to(device)
    try:
        return encode_prompts(parts.tokenizer, parts.text_encoder, list(prompts), device)
    finally:
        parts.text_encoder.to("cpu")


def latent_shape(parts, resolution: Optional[int], batch: int = 1) -> Tuple[int, ...]:
    """(batch, channels, h, w) of the UNet's latents at ``resolution`` px (None: the UNet's own sample size)."""
    from common.models import vae_scale_factor

    factor = vae_scale_factor(parts.vae.config)
    side = (resolution or parts.unet.config.sample_size * factor) // factor
    return (batch, parts.unet.config.in_channels, side, side)


# ---- seeded draws -------------------------------------------------------------


def noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (so a seed gives the same numbers on any device), moved to ``device``."""
    return torch.randn(shape, generator=generator).to(device)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream): a resumed run needs no generator state."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed((int(state[0]) << 32) | int(state[1]))


def draw_timesteps(generator: torch.Generator, n: int, num_train_timesteps: int) -> torch.Tensor:
    """``n`` training timesteps, uniform over 0 .. num_train_timesteps-1 (CPU, int64)."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator)


def noised(noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
           timesteps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timesteps, target) of the DDPM loss for clean ``latents``: noise and timesteps drawn from ``generator``.

    The roots of the noise schedule are correctly rounded (common.training.noisy_inputs), so x_t has the same
    bits on every CPU; the target is the noise (epsilon models) or v.
    """
    from common.training import noisy_inputs

    n = latents.shape[0]
    if timesteps is None:
        timesteps = draw_timesteps(generator, n, noise_scheduler.config.num_train_timesteps)
    eps = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    x_t, target = noisy_inputs(latents, noise_scheduler, eps, eps, timesteps)
    return x_t, timesteps, target


# ---- memory levers and data parallelism ----------------------------------------

# The memory levers of the training methods (docs/memory.md): declared here once; a training method lists
# ``MEMORY_FLAGS`` in its flags and honours them through ``gradient_checkpointing`` and ``optimizer``.
GRADIENT_CHECKPOINTING = Flag(
    "--gradient_checkpointing", False, "recompute the trained UNet's activations in the backward pass (diffusers' "
    "gradient checkpointing): less GPU memory, more time, the same weights", switch=True)
USE_8BIT_ADAM = Flag(
    "--use_8bit_adam", False, "bitsandbytes' 8-bit Adam/AdamW in place of the method's Adam/AdamW (CUDA only; pip "
    "install -r requirements-gpu.txt): 2 bytes of optimizer state per trained value instead of 8, other weights",
    switch=True)
MEMORY_FLAGS = (GRADIENT_CHECKPOINTING, USE_8BIT_ADAM)
# The training images' side, every method's (one definition: the methods' flag tables share it).
RESOLUTION_FLAG = Flag("--resolution", None, "image side in pixels", int,
                       default_text="the UNet's sample_size x the VAE's scale factor")


def check_8bit_adam(use_8bit_adam: bool, device: str) -> None:
    """--use_8bit_adam needs bitsandbytes and a CUDA device: one InputError naming the flag, before models load."""
    if not use_8bit_adam:
        return
    from common.cli import check_8bit_adam as check_installed

    check_installed()  # bitsandbytes installed, a CUDA GPU on the machine
    require(str(device).startswith("cuda"), f"--use_8bit_adam: needs a CUDA device, not --device {device}")


def optimizer(params, kind: str, use_8bit_adam: bool = False, **kwargs):
    """The method's optimizer: the pinned fused torch Adam/AdamW (common.numerics), or bitsandbytes' 8-bit one.

    ``kind``: "adam" or "adamw", what the method's published code uses; ``kwargs``: lr, betas, eps, weight_decay.
    """
    if kind not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer kind {kind!r}")
    if use_8bit_adam:
        import bitsandbytes as bnb

        return (bnb.optim.Adam8bit if kind == "adam" else bnb.optim.AdamW8bit)(params, **kwargs)
    from common import numerics

    return (numerics.adam if kind == "adam" else numerics.adamw)(params, **kwargs)


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run (``accelerate launch --num_processes N``; one process: rank 0
    of 1, every method a no-op).

    Each step's examples are drawn whole on every process from the same seeded generators; a process trains on
    its ``rows`` of them, its loss weighted by its ``share``, and the gradients are summed over the processes:
    the gradient of the whole batch's mean loss, so every process takes the same optimizer step and the weights
    stay identical on every rank (to the float rounding of the sum's order).
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's contiguous rows of a batch of ``n`` (sizes differ by at most one, the first ranks larger)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (1 if self.rank < extra else 0))

    def share(self, n: int) -> float:
        """The fraction of a batch of ``n`` that this process's rows are (a mean's weight)."""
        r = self.rows(n)
        return (r.stop - r.start) / n

    def sum_gradients(self, params, bucket: int = 1 << 24) -> None:
        """Sum each parameter's .grad over the processes (in flat buckets of up to ``bucket`` values)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:  # no gradient here: zeros, so the sum lines up on every process
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        i = 0
        while i < len(grads):
            group, size = [], 0
            while i < len(grads) and (not group or size + grads[i].numel() <= bucket):
                group.append(grads[i])
                size += grads[i].numel()
                i += 1
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def sum(self, value: float) -> float:
        """``value`` summed over the processes (a loss's parts, each weighted by its share)."""
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.world > 1 else bool(flag)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_sum_(self, tensors) -> None:
        """Sum each tensor over the processes, in place (on its device; CPU tensors through gloo)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            moved = t.to(self._device())
            dist.all_reduce(moved)
            t.copy_(moved)

    @staticmethod
    def _device():
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def start_parallel(device) -> Parallel:
    """The process group of a launch with several processes (gloo on the CPU, NCCL on GPUs), or one process."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return Parallel()
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Parallel(dist.get_rank(), dist.get_world_size())


def stop_parallel(parallel: Parallel) -> None:
    """End the process group ``start_parallel`` made."""
    if parallel.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---- training loop: checkpoints and resume ------------------------------------

CHECKPOINT_DIR = "unlearn_checkpoint"  # inside --output_dir; removed once the model is written
CHECKPOINT_STATE = "state.pt"  # the trained tensors, optimizer (and other) states, RNG states, step, losses
CHECKPOINT_INFO = "checkpoint.json"  # the settings it was written with and its step, read before any model loads


def checkpoint_info(output_dir: str) -> Optional[dict]:
    """The checkpoint of an unfinished run in ``output_dir`` ({fingerprint, step, iterations}), or None."""
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isfile(os.path.join(folder, CHECKPOINT_STATE)):
        return None
    try:
        with open(os.path.join(folder, CHECKPOINT_INFO), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # killed before its first info was written: nothing usable


def normalise(obj):
    """``obj`` as JSON gives it back (tuples become lists): how fingerprints are compared."""
    return json.loads(json.dumps(obj, default=str))


def fingerprint_differences(old: dict, new: dict) -> List[str]:
    """The keys whose values differ between two fingerprints (a method setting by its own name: "learning_rate")."""
    old, new = normalise(old), normalise(new)
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if k == "settings" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            a, b = old[k], new[k]
            out += [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif old.get(k) != new.get(k):
            out.append(k)
    return out


def remove_checkpoint(output_dir: str) -> None:
    """Remove the checkpoint of a run whose model is written."""
    import shutil

    shutil.rmtree(os.path.join(output_dir, CHECKPOINT_DIR), ignore_errors=True)


def _rng_state(rng):
    if isinstance(rng, random.Random):
        return rng.getstate()
    if isinstance(rng, torch.Generator):
        return rng.get_state()
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.state
    raise TypeError(f"cannot checkpoint a random generator of type {type(rng).__name__}")


def _set_rng_state(rng, state) -> None:
    if isinstance(rng, random.Random):
        rng.setstate(state)
    elif isinstance(rng, torch.Generator):
        rng.set_state(state)
    else:
        rng.bit_generator.state = state


def _atomic_torch_save(obj, path: str) -> None:
    """torch.save under a temporary name, fsync, rename: a crash leaves the old file or the new one, never half."""
    from common.faults import maybe_fail

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        maybe_fail("checkpoint")  # tests: a crash in the middle of a save
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(ctx: RunContext, step: int, iterations: int, params: Dict[str, torch.Tensor],
                    stateful: Dict[str, object], rngs: Dict[str, object], losses: List[float]) -> str:
    """Write OUTPUT_DIR/unlearn_checkpoint/ after ``step`` steps; returns its path."""
    from common.results import atomic_write_json

    folder = os.path.join(ctx.output_dir, CHECKPOINT_DIR)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # a save killed before its rename left its temporary file
        if name.startswith(f"{CHECKPOINT_STATE}.tmp-"):
            os.unlink(os.path.join(folder, name))
    state = {
        "step": step, "iterations": iterations, "fingerprint": normalise(ctx.fingerprint),
        "params": {n: p.detach().to("cpu", copy=True) for n, p in params.items()},
        "stateful": {k: v.state_dict() for k, v in stateful.items()},
        "rngs": {k: _rng_state(v) for k, v in rngs.items()},
        # The global generators too, for a method that draws from them (dropout).
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "losses": list(losses),
    }
    _atomic_torch_save(state, os.path.join(folder, CHECKPOINT_STATE))
    atomic_write_json(os.path.join(folder, CHECKPOINT_INFO),
                      {"fingerprint": state["fingerprint"], "step": step, "iterations": iterations})
    return folder


@torch.no_grad()
def load_checkpoint(ctx: RunContext, params: Dict[str, torch.Tensor], stateful: Dict[str, object],
                    rngs: Dict[str, object]) -> Optional[Tuple[int, List[float]]]:
    """Restore a checkpoint into the trained tensors, states and generators: (step, losses so far), or None."""
    path = os.path.join(ctx.output_dir, CHECKPOINT_DIR, CHECKPOINT_STATE)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    differ = [] if ctx.fingerprint is None else fingerprint_differences(state["fingerprint"], ctx.fingerprint)
    if differ:  # parse-time checks read checkpoint.json; this is the state itself
        raise InputError(f"--resume: {path} was written with other settings ({', '.join(differ)})")
    if set(state["params"]) != set(params):
        raise InputError(f"--resume: {path} holds other trained tensors than this run trains")
    for name, p in params.items():
        p.copy_(state["params"][name].to(p.device))
    for k, v in stateful.items():
        v.load_state_dict(state["stateful"][k])
    for k, v in rngs.items():
        _set_rng_state(v, state["rngs"][k])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], list(state["losses"])


class Preemption:
    """SIGTERM and SIGUSR1 (a cluster's preemption notice) ask train_loop for a checkpoint at the end of the current
    step and an exit with status 75 (common.checkpointing.PREEMPTED_EXIT_CODE), as the fine-tuning scripts do."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: Optional[str] = None
        self.previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            self.__exit__()
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name


def train_loop(ctx: RunContext, iterations: int, step: Callable[[int], object], params: Dict[str, torch.Tensor],
               stateful: Optional[Dict[str, object]] = None, rngs: Optional[Dict[str, object]] = None,
               desc: str = "training", progress: bool = True) -> List[float]:
    """Call ``step(i)`` for i = 0 .. iterations-1 with a progress bar; return every step's loss.

    ``step(i)`` does one optimizer step and returns its loss (a float), or (loss, {name: value}) to show more in
    the bar. Every ``ctx.checkpoint_every`` steps the trained tensors ``params`` (name -> parameter), the
    ``stateful`` objects' state_dict (the optimizer, an LR schedule), the ``rngs`` (random.Random,
    torch.Generator or numpy Generator) and the global torch generators are saved; with ``ctx.resume`` a saved
    checkpoint is restored first and the loop continues after its step, so the final weights are those of an
    uninterrupted run. Draws made with ``step_generator(seed, i)`` need no saved state at all. On SIGTERM or
    SIGUSR1 (with an output directory) the step under way ends, a checkpoint and OUTPUT_DIR/PREEMPTED are written
    and the process exits with status 75; ``--resume`` continues it (and removes the marker). Several processes (``ctx.parallel``): every one holds the same
    state, the main one writes.
    """
    from tqdm.auto import tqdm

    from common.checkpointing import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
    from common.faults import maybe_fail

    stateful, rngs = stateful or {}, rngs or {}
    start, losses = 0, []
    parallel = ctx.parallel
    if ctx.resume and ctx.output_dir is not None:
        restored = load_checkpoint(ctx, params, stateful, rngs)
        if restored is not None:
            start, losses = restored
            ctx.resumed_from = start
            ctx.log(f"resuming from {os.path.join(ctx.output_dir, CHECKPOINT_DIR)} after step {start} of {iterations}")
    writes = ctx.output_dir is not None
    marker = os.path.join(ctx.output_dir, PREEMPTED_MARKER) if writes else None
    if writes and parallel.main and os.path.isfile(marker):  # this run continues the preempted one
        os.unlink(marker)

    def save(done: int) -> None:
        if parallel.main:
            save_checkpoint(ctx, done, iterations, params, stateful, rngs, losses)
        parallel.barrier()  # no process runs on (or exits) before the checkpoint is complete

    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc=desc,
               disable=not progress or not parallel.main)
    with (Preemption() if writes else contextlib.nullcontext()) as preemption:
        for i in bar:
            out = step(i)
            loss, info = out if isinstance(out, tuple) else (out, {})
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4g}", **info)
            done = i + 1
            saved = False
            if ctx.checkpoint_every and writes and done % ctx.checkpoint_every == 0 and done < iterations:
                save(done)
                saved = True
            maybe_fail("update")  # tests: a crash after this step
            if writes and parallel.any(preemption.signal is not None):
                if not saved:
                    save(done)
                if parallel.main:  # for job scripts, whose launcher may report the 75 as 1 (slurm/requeue.sh)
                    from common.results import atomic_write_json

                    atomic_write_json(marker, {"checkpoint": os.path.join(ctx.output_dir, CHECKPOINT_DIR)})
                bar.close()
                ctx.log(f"preempted ({preemption.signal or 'signal on another process'}) after step {done} of "
                        f"{iterations}: checkpoint in {os.path.join(ctx.output_dir, CHECKPOINT_DIR)}; continue with "
                        "the same command and --resume")
                raise SystemExit(PREEMPTED_EXIT_CODE)
    bar.close()
    return losses


# ---- data ---------------------------------------------------------------------

PROMPT_COLUMN = "prompt"  # the caption column of the fine-tuning scripts' imagefolders


@dataclass(frozen=True)
class ImageSet:
    """Images and their prompts, in the folder's row order: read from an imagefolder or generated."""

    paths: Tuple[str, ...]
    prompts: Tuple[str, ...]
    folder: str
    generated: Optional[dict] = None  # how it was generated (model, prompts, count, seed, steps, guidance)

    def card(self) -> dict:
        """What the unlearning card records about it."""
        return {"folder": os.path.abspath(self.folder), "images": len(self.paths),
                "prompts": sorted(set(self.prompts)), "generated": self.generated}


def load_image_set(folder: str, flag: str) -> ImageSet:
    """An imagefolder (metadata.jsonl with ``file_name`` and ``prompt``) as the fine-tuning scripts read it.

    Errors are one InputError naming ``flag``.
    """
    from common.data import read_metadata

    require(os.path.isdir(folder), f"{flag} {folder}: no such directory")
    try:
        paths, prompts = read_metadata(folder, PROMPT_COLUMN)
    except InputError as err:  # read_metadata speaks of the fine-tuning scripts' flags
        text = str(err).replace(f"--train_data_dir {folder}: ", "").replace(
            f"--caption_column '{PROMPT_COLUMN}': not in", f"column '{PROMPT_COLUMN}' not in")
        raise InputError(f"{flag} {folder}: {text}") from None
    return ImageSet(tuple(paths), tuple(prompts), folder)


def generate_image_set(parts, prompts: Sequence[str], count: int, seed: int, out: str, device,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, resolution: Optional[int] = None,
                       batch_size: int = 4, progress: bool = False, name: str = "images",
                       parallel: Optional[Parallel] = None) -> ImageSet:
    """``count`` images of the base model (call before editing it), image j of prompt ``prompts[j % len]``.

    tools/generate_training_data.py's code and layout (tools/datagen.py: one concept ``name`` with these
    prompts, image j seeded image_seed(seed, 0, j)): an imagefolder in ``out`` with metadata.jsonl and
    generation.json. A rerun with the same settings generates only the missing images (a resumed run reuses
    them); other settings are refused. With several processes (``parallel``) each generates its share of the
    batches, the same batches as one process generates, and the main one writes the folder's files.
    """
    from tools import datagen

    from common.validation import build_pipeline, generate_images

    concept = datagen.Concept(name, tuple(prompts))
    settings = {"prompts": list(prompts), "images": count, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "resolution": resolution, "caption_column": PROMPT_COLUMN}
    try:
        datagen.check_settings(out, settings)
    except InputError as err:  # its message names generate_training_data.py's flags
        raise InputError(str(err).replace("--output_dir ", "").replace(
            "use a new directory or --overwrite", "delete it to generate them anew")) from None
    jobs = datagen.plan_images([concept], count, seed)
    missing = datagen.missing_jobs(out, jobs)
    parallel = parallel or Parallel()
    parallel.barrier()  # every process has its list of missing images before any is written
    batches = list(range(0, len(missing), batch_size))
    mine = batches[parallel.rank::parallel.world]  # whole batches: each image made in the batch one process makes it
    if mine:
        was_training, where = parts.unet.training, next(parts.unet.parameters()).device
        parts.unet.eval().to(device)
        parts.text_encoder.to(device)
        parts.vae.to(device)
        try:
            pipe = build_pipeline(parts, parts.unet)
            for b in mine:
                batch = missing[b:b + batch_size]
                images = generate_images(pipe, [j.prompt for j in batch], [j.seed for j in batch], batch_size,
                                         num_inference_steps, guidance_scale, resolution, progress=progress)
                for job, image in zip(batch, images):
                    datagen.save_image(image, os.path.join(out, job.file_name))
        finally:
            parts.text_encoder.to("cpu")
            parts.vae.to("cpu")
            parts.unet.to(where).train(was_training)
    parallel.barrier()  # every image written
    if parallel.main:
        os.makedirs(out, exist_ok=True)
        datagen.write_settings(out, settings)
        datagen.write_metadata(out, jobs, PROMPT_COLUMN)
    parallel.barrier()
    return ImageSet(tuple(os.path.join(out, j.file_name) for j in jobs), tuple(j.prompt for j in jobs), out,
                    generated={**settings, "model_seeded_images": "image_seed(seed, 0, j)"})


@torch.no_grad()
def image_latents(parts, images: ImageSet, resolution: int, device, batch_size: int = 8,
                  flip: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of every image (resized, centre crop; mirrored with ``flip``), in the UNet's
    latent scale, fp32 on the CPU.

    A latent sample is ``mean + std * noise(...)``: the noise is the method's own seeded draw.
    """
    from PIL import Image

    from common.data import ImageTransform

    transform = ImageTransform(resolution, center_crop=True, random_flip=flip)
    scale = parts.vae.config.scaling_factor
    parts.vae.to(device)
    means, stds = [], []
    try:
        for b in range(0, len(images.paths), batch_size):
            pixels = []
            for path in images.paths[b:b + batch_size]:
                with Image.open(path) as im:
                    pixels.append(transform(im, flip=True) if flip else transform(im))
            post = parts.vae.encode(torch.stack(pixels).to(device)).latent_dist
            means.append((post.mean * scale).float().cpu())
            stds.append((post.std * scale).float().cpu())
    finally:
        parts.vae.to("cpu")
    return torch.cat(means), torch.cat(stds)


# ---- the card: what changed, the concept probe --------------------------------


def snapshot(parts, edits: Sequence[str]) -> Dict[str, Dict[str, torch.Tensor]]:
    """A CPU copy of the parts a method may change, taken before it runs (changed_parameters compares with it)."""
    return {part: {n: t.detach().to("cpu", copy=True) for n, t in getattr(parts, part).state_dict().items()}
            for part in edits}


def _summary(values: Sequence[float]) -> Optional[dict]:
    if not values:
        return None
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2,
            "mean": sum(v) / len(v), "max": v[-1]}


@torch.no_grad()
def changed_parameters(before: Dict[str, Dict[str, torch.Tensor]], parts) -> dict:
    """Per edited part: which tensors differ from ``before`` and by how much (relative L2 change per tensor).

    ``per_tensor`` maps each changed tensor to ||W_new - W_old|| / ||W_old|| (None where W_old is all zeros);
    ``relative_l2`` summarises them (min, median, mean, max).
    """
    out = {}
    for part, old in before.items():
        new = getattr(parts, part).state_dict()
        per_tensor = {}
        for name, w0 in old.items():
            w1 = new[name].detach().to("cpu")
            if not torch.equal(w0, w1):
                base = torch.linalg.vector_norm(w0.double())
                delta = torch.linalg.vector_norm(w1.double() - w0.double())
                per_tensor[name] = float(delta / base) if base > 0 else None
        out[part] = {
            "tensors": len(per_tensor), "of_tensors": len(old),
            "numel": sum(old[n].numel() for n in per_tensor), "of_numel": sum(t.numel() for t in old.values()),
            "relative_l2": _summary([v for v in per_tensor.values() if v is not None]),
            "per_tensor": dict(sorted(per_tensor.items())),
        }
    return out


PROBE_STREAM = 0x70726F6265  # "probe": the concept probe's seed stream, apart from any method's draws
PROBE_PROMPTS = 8  # the probe measures at most this many erased prompts (its cost: 4 UNet passes per prompt)


class ConceptProbe:
    """How much of the base model's concept direction the edited model keeps, without CLIP or images.

    On fixed seeded latents x ~ N(0, I) at timesteps spread over the schedule, the concept direction of a
    model is g = eps(x, t, c) - eps(x, t, "") for an erased prompt c: what classifier-free guidance adds
    for the concept. Measured on the base model (g0) before the method runs and on the edited one (g1)
    after: ``along_base_direction`` = mean <g1, g0> / <g0, g0> is 1 for an unchanged model, 0 when the
    concept's prediction is the unconditional one (UCE mapped to ""), negative when guidance now points away
    from it (ESD's negative guidance: about -eta); ``gap_before``/``gap_after`` are mean ||g|| / ||eps(x, t, "")||.
    """

    def __init__(self, parts, prompts: Sequence[str], samples: int, seed: int, device, text_encoder_edited=False):
        self.prompts = list(prompts)[:PROBE_PROMPTS]
        self.samples, self.device, self.base = samples, device, None
        self.text_encoder_edited = text_encoder_edited  # then the edited model's prompts are encoded anew
        if samples <= 0 or not self.prompts:
            return
        generator = step_generator(seed, 0, PROBE_STREAM)
        unet = parts.unet
        side = unet.config.sample_size
        self.latents = torch.randn((samples, unet.config.in_channels, side, side), generator=generator)
        total = parts.noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.tensor([int((k + 0.5) * total / samples) for k in range(samples)])
        self.context = encode(parts, [""] + self.prompts, device).cpu()
        self.base = self._directions(unet)

    @torch.no_grad()
    def _directions(self, unet) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(g, eps_uncond) per prompt, float64 on the CPU."""
        was_training, where = unet.training, next(unet.parameters()).device
        unet.eval().to(self.device)
        try:
            x = self.latents.to(self.device)
            t = self.timesteps.to(self.device)
            n = self.samples
            out = []
            for k in range(len(self.prompts)):
                ctx = torch.cat([self.context[0:1].expand(n, -1, -1), self.context[k + 1:k + 2].expand(n, -1, -1)])
                eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=ctx.to(self.device)).sample
                e_u, e_c = eps.double().cpu().chunk(2)
                out.append((e_c - e_u, e_u))
            return out
        finally:
            unet.to(where).train(was_training)

    def after(self, parts) -> Optional[dict]:
        """The probe of the edited model against the base model's, for the card (None when off)."""
        if self.base is None:
            return None
        if self.text_encoder_edited:
            self.context = encode(parts, [""] + self.prompts, self.device).cpu()
        now = self._directions(parts.unet)
        along, gap0, gap1 = [], [], []
        for (g0, u0), (g1, u1) in zip(self.base, now):
            dims = tuple(range(1, g0.ndim))
            along += ((g1 * g0).sum(dims) / (g0 * g0).sum(dims).clamp_min(1e-30)).tolist()
            gap0 += (torch.linalg.vector_norm(g0, dim=dims) / torch.linalg.vector_norm(u0, dim=dims)).tolist()
            gap1 += (torch.linalg.vector_norm(g1, dim=dims) / torch.linalg.vector_norm(u1, dim=dims)).tolist()
        return {"prompts": self.prompts, "latents": self.samples, "timesteps": self.timesteps.tolist(),
                "along_base_direction": sum(along) / len(along), "gap_before": sum(gap0) / len(gap0),
                "gap_after": sum(gap1) / len(gap1)}
