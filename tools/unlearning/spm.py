"""SPM: Lyu et al., CVPR 2024, "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing
Applications" (docs/unlearning.md: SPM).

https://arxiv.org/abs/2312.16145 (code: https://github.com/Con6924/SPM). A rank-1 adapter (the "membrane") on
every linear and 1x1-convolution layer inside the UNet's transformer blocks is trained so that the concept's
prediction follows negative guidance away from it (ESD's target), while "latent anchoring" keeps the adapted
model's predictions for surrogate concepts equal to the base model's. At inference the published code scales
the adapter by the prompt's similarity to the erased concept ("facilitated transport"). Our reading of their
code is cited as "train_spm.py line N", "spm.py line N" (src/models/spm.py), "prompt.py line N"
(src/configs/prompt.py), "sampling.py line N" (src/engine/sampling.py), "infer_spm.py line N" of
Con6924/SPM at 7dcfd21.

The written pipeline is the base model with the adapter fused at strength 1 (what the revival scripts load);
the adapter itself and its transport rule are written beside it (``ADAPTER_FILE``, ``TRANSPORT_FILE``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


from . import base, register
from .base import (RESOLVED, Flag, Method, RunContext, check_text, encode, finite, require, step_generator, train_loop)

PAPER = "Lyu et al., CVPR 2024, https://arxiv.org/abs/2312.16145"
CODE = "https://github.com/Con6924/SPM"

ADAPTER_FILE = "spm_adapter.safetensors"  # beside the pipeline in --output_dir: the membrane, their key names
TRANSPORT_FILE = "spm_transport.json"  # what applying it with facilitated transport needs
TARGET_BLOCKS = ("Transformer2DModel",)  # spm.py lines 81-83 and 93: every Linear/Conv2d inside these
KEY_PREFIX = "lora_unet"  # spm.py line 91: their (SD-WebUI's) adapter key names, lora_unet_<module path with _>
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # bitsandbytes AdamW8bit's defaults
DYNAMIC_STEP_PX = 64  # train_util.py get_random_resolution_in_bucket: sides in 64-px steps in [res/2, res)
ON_OFF = ("on", "off")
SURROGATE_SCALE = (0.8, 0.4)  # sampling.py line 20: a surrogate's norm is U[0.8, 1.2) x the concept's

# Seed streams of step_generator: every draw of step i is a pure function of (seed, i), so a resume needs no state.
DRAW_STREAM, SURROGATE_STREAM, PROBE_STREAM = 0, 1, 2


# ---- the membrane -------------------------------------------------------------


def membrane_targets(unet: torch.nn.Module) -> List[str]:
    """The UNet's module names that get a membrane: every Linear and Conv2d inside a transformer block (their
    ``UNET_TARGET_REPLACE_MODULE_TRANSFORMER``, spm.py lines 81-83, 148-152): in SD-1.x the attention projections,
    the feed-forward layers and proj_in/proj_out of each of the 16 transformers, 192 layers."""
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ in TARGET_BLOCKS:
            for child, sub in module.named_modules():
                if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and child:
                    names.append(f"{name}.{child}")
    return names


def membrane_values(unet: torch.nn.Module, rank: int = 1) -> int:
    """How many values the membrane trains on this UNet (no tensors made: works on the meta device)."""
    modules = dict(unet.named_modules())
    total = 0
    for name in membrane_targets(unet):
        layer = modules[name]
        if isinstance(layer, torch.nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        else:
            total += rank * (layer.in_channels * math.prod(layer.kernel_size) + layer.out_channels)
    return total


def adapter_key(module_name: str) -> str:
    """Their key of a module's adapter (spm.py lines 153-154): 'lora_unet_' + the module path, dots as '_'."""
    return f"{KEY_PREFIX}.{module_name}".replace(".", "_")


class Membrane:
    """A rank-``rank`` adapter W + strength * (alpha / rank) * up @ down on each target layer, applied by forward
    hooks (their SPMLayer replaces the layer's forward the same way, spm.py lines 66-76).

    ``params`` maps their key names ("<key>.lora_down.weight", "<key>.lora_up.weight") to the trained tensors:
    down starts Kaiming-uniform (drawn from ``seed``), up at zero (spm.py lines 59-60), so the adapted model starts
    as the base model. ``strength`` multiplies the whole update: 1 in training, 0 for the base model's
    predictions, the transport strength at inference.
    """

    def __init__(self, unet: torch.nn.Module, rank: int = 1, alpha: float = 1.0, seed: int = 0,
                 targets: Optional[Sequence[str]] = None):
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # spm.py lines 55-57 (alpha 0 or None: the rank itself, scale 1)
        self.strength = 1.0
        self.modules = dict(unet.named_modules())
        self.targets = list(membrane_targets(unet) if targets is None else targets)
        device = next(unet.parameters()).device
        generator = torch.Generator("cpu").manual_seed(seed)
        self.params: Dict[str, torch.nn.Parameter] = {}
        for name in self.targets:
            layer = self.modules[name]
            if isinstance(layer, torch.nn.Linear):
                down = torch.empty(rank, layer.in_features)
                up = torch.zeros(layer.out_features, rank)
            else:  # Conv2d: down has the layer's kernel, stride and padding, up is 1x1 (spm.py lines 38-53)
                down = torch.empty(rank, layer.in_channels, *layer.kernel_size)
                up = torch.zeros(layer.out_channels, rank, 1, 1)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            key = adapter_key(name)
            self.params[f"{key}.lora_down.weight"] = torch.nn.Parameter(down.to(device))
            self.params[f"{key}.lora_up.weight"] = torch.nn.Parameter(up.to(device))
        self._hooks = []

    def factors(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        key = adapter_key(name)
        return self.params[f"{key}.lora_down.weight"], self.params[f"{key}.lora_up.weight"]

    def _update(self, layer, x, down, up):
        if isinstance(layer, torch.nn.Linear):
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, stride=layer.stride, padding=layer.padding), up)

    def attach(self) -> "Membrane":
        """Add the adapter to its layers' outputs (until ``detach``)."""
        self.detach()
        for name in self.targets:
            down, up = self.factors(name)

            def hook(layer, inputs, output, down=down, up=up):
                if self.strength == 0:
                    return output
                return output + self._update(layer, inputs[0], down, up) * (self.strength * self.scale)

            self._hooks.append(self.modules[name].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def at(self, strength: float):
        """The adapter at ``strength`` inside the block (their ``with network:`` sets 1 and then 0)."""
        before, self.strength = self.strength, strength
        try:
            yield self
        finally:
            self.strength = before

    def delta(self, name: str) -> torch.Tensor:
        """The weight update of one layer at strength 1: (alpha / rank) * up @ down, in the layer's weight shape."""
        down, up = self.factors(name)
        weight = self.modules[name].weight
        return (self.scale * (up.detach().double().flatten(1) @ down.detach().double().flatten(1))).reshape(
            weight.shape)

    @torch.no_grad()
    def fuse(self, strength: float = 1.0) -> None:
        """Add ``strength`` x the update into the layers' weights and remove the hooks: a plain UNet."""
        self.detach()
        for name in self.targets:
            weight = self.modules[name].weight
            weight.copy_((weight.double() + strength * self.delta(name).to(weight.device)).to(weight.dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Their file's tensors: each layer's down, up and alpha (spm.py lines 58 and 180-193)."""
        out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.params.items()}
        for name in self.targets:
            out[f"{adapter_key(name)}.alpha"] = torch.tensor(float(self.alpha))
        return out

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k].to(p.device, p.dtype))


# ---- facilitated transport ----------------------------------------------------


def special_token_ids(tokenizer) -> set:
    """BOS, EOS, padding, unknown: left out of the token overlap (infer_spm.py line 71)."""
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return {int(i) for i in ids if i is not None}


def transport_similarity(prompt_embeds: torch.Tensor, prompt_tokens: Sequence[int], erased_embeds: torch.Tensor,
                         erased_tokens: Sequence[Sequence[int]], special: set) -> float:
    """How close a prompt is to the erased prompts (infer_spm.py lines 28-49, their default "clipcos_tokenuni"):
    the largest, over the erased prompts, of the larger of

    - clipcos: the cosine of the two prompts' text-encoder outputs, each flattened ([77 x d], padding included);
    - tokenuni: the share of the erased prompt's word tokens (special tokens left out) the prompt contains.

    ``prompt_embeds`` [77, d] (or [1, 77, d]); ``erased_embeds`` [n, 77, d]; tokens are id lists.
    """
    flat = prompt_embeds.reshape(1, -1).double()
    cos = F.cosine_similarity(flat, erased_embeds.reshape(erased_embeds.shape[0], -1).double(), dim=-1)
    words = set(int(t) for t in prompt_tokens) - special
    scores = []
    for k, tokens in enumerate(erased_tokens):
        erased = set(int(t) for t in tokens) - special
        overlap = len(words & erased) / len(erased) if erased else 0.0
        scores.append(max(float(cos[k]), overlap))
    return max(scores)


def transport_strength(similarity: float, exponent: float = 2.0) -> float:
    """The adapter's strength for a prompt of ``similarity``: their inference multiplies both factors, down and up,
    by the similarity (infer_spm.py lines 145-153 scale every tensor of the file), so the update scales with its
    square (``exponent`` 2)."""
    return float(similarity) ** exponent


def prompt_tokens(tokenizer, prompts: Sequence[str]) -> List[List[int]]:
    """Each prompt's token ids, padded to the tokenizer's length as the pipeline encodes it."""
    from common.data import tokenize_captions

    return [row.tolist() for row in tokenize_captions(tokenizer, list(prompts))]


def load_adapter(output_dir: str):
    """(adapter tensors, transport rule) written by a run into ``output_dir``."""
    from safetensors.torch import load_file

    with open(os.path.join(output_dir, TRANSPORT_FILE), encoding="utf-8") as f:
        rule = json.load(f)
    return load_file(os.path.join(output_dir, rule["adapter_file"])), rule


def apply_with_transport(pipeline, adapter: Dict[str, torch.Tensor], rule: dict, prompt: str) -> Tuple[Membrane, float]:
    """Put the adapter on ``pipeline.unet`` (the base model's UNet, not the fused one) at the strength facilitated
    transport gives ``prompt``; returns (the membrane, its strength). ``membrane.detach()`` takes it off again."""
    from common.data import encode_prompts

    device = next(pipeline.text_encoder.parameters()).device
    with torch.no_grad():
        embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt] + list(rule["erased_prompts"]),
                                device).cpu()
    tokens = prompt_tokens(pipeline.tokenizer, [prompt] + list(rule["erased_prompts"]))
    similarity = transport_similarity(embeds[0], tokens[0], embeds[1:], tokens[1:],
                                      special_token_ids(pipeline.tokenizer))
    membrane = Membrane(pipeline.unet, rule["rank"], rule["alpha"], targets=rule["modules"])
    membrane.load_state_dict(adapter)
    membrane.strength = transport_strength(similarity, rule["strength_exponent"])
    return membrane.attach(), membrane.strength


# ---- the loss -----------------------------------------------------------------


def _predict(unet, x, t, context):
    n = x.shape[0]
    if context.shape[0] != n:
        context = context.expand(n, -1, -1)
    return unet(x, t, encoder_hidden_states=context).sample


def sample_surrogates(target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` surrogate concepts as text embeddings [count, 77, d], sampling.py lines 7-25: a random direction
    of the embedding space, kept with probability 1 - cos(it, the concept), scaled to U[0.8, 1.2) x the concept's
    norm. The draws come from ``generator`` (theirs: the global generators)."""
    flat = target.reshape(-1).double().cpu()
    norm = flat.norm()
    out = []
    while len(out) < count:
        while True:
            direction = torch.randn(flat.shape, generator=generator, dtype=torch.float64)
            direction = direction / direction.norm()
            cos = float(torch.dot(direction, flat) / norm)
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < 1 - cos:
                break
        scale = float(torch.rand((), generator=generator, dtype=torch.float64)) * SURROGATE_SCALE[1] + \
            SURROGATE_SCALE[0]
        out.append((scale * direction * norm).reshape(target.shape[-2:]))
    return torch.stack(out).to(target.device, target.dtype)


def spm_losses(unet, membrane: Membrane, x_t: torch.Tensor, t, target: torch.Tensor, positive: torch.Tensor,
               neutral: torch.Tensor, anchors: Optional[torch.Tensor], eta: float
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(erasing loss, anchoring loss or None) at one x_t (prompt.py lines 144-188, train_spm.py lines 196-263).

    Erasing: the adapted model's prediction for the concept regressed to the base model's negative guidance,
    ``eps(x, neutral) - eta * (eps(x, positive) - eps(x, neutral))``. Anchoring: the adapted model's predictions
    for the surrogate ``anchors`` regressed to the base model's (the adapter at strength 0) at the same x_t.
    """
    with torch.no_grad(), membrane.at(0.0):
        base_in = [positive, neutral] + ([anchors] if anchors is not None else [])
        context = torch.cat([c.expand(x_t.shape[0], -1, -1) if c.shape[0] == 1 else c for c in base_in])
        n_anchor = 0 if anchors is None else anchors.shape[0]
        x = torch.cat([x_t, x_t] + ([x_t.expand(n_anchor, -1, -1, -1)] if n_anchor else []))
        base = _predict(unet, x, t, context).float()
        e_pos, e_neu, anchor_base = base[:1], base[1:2], base[2:]
    with membrane.at(1.0):
        context = torch.cat([target] + ([anchors] if n_anchor else []))
        x = torch.cat([x_t] + ([x_t.expand(n_anchor, -1, -1, -1)] if n_anchor else []))
        pred = _predict(unet, x, t, context).float()
    erase = F.mse_loss(pred[:1], e_neu - eta * (e_pos - e_neu))
    anchoring = F.mse_loss(pred[1:], anchor_base) if n_anchor else None
    return erase, anchoring


def loss_timestep(step_index: int, ddim_steps: int, num_train_timesteps: int) -> int:
    """The timestep the loss is taken at after ``step_index`` of ``ddim_steps`` sampling steps: their 1000-step
    schedule's ``timesteps[int(k * 1000 / ddim_steps)]`` (train_spm.py lines 182-186), i.e. T-1 - int(k T / steps)."""
    return num_train_timesteps - 1 - int(step_index * num_train_timesteps / ddim_steps)


def resolution_choices(resolution: int, factor: int) -> List[int]:
    """Latent sides of their dynamic resolution: 64-px steps in [resolution/2, resolution) (train_util.py
    get_random_resolution_in_bucket: randint excludes the top); empty when the resolution is below 128 px."""
    low, high = (resolution // 2) // DYNAMIC_STEP_PX, resolution // DYNAMIC_STEP_PX
    return [k * DYNAMIC_STEP_PX // factor for k in range(low, high)]


def draw_step(seed: int, step: int, ddim_steps: int, sides: Sequence[int], latent_side: int, channels: int) -> dict:
    """Everything random in step ``step`` but the surrogates, a pure function of (seed, step), on the CPU: the
    number of sampling steps k in 1 .. ddim_steps-1 (train_spm.py lines 146-148), the latent's height and width
    (dynamic resolution, lines 153-158), the starting noise (lines 168-170)."""
    g = step_generator(seed, step, DRAW_STREAM)
    k = int(torch.randint(1, ddim_steps, (1,), generator=g)) if ddim_steps > 1 else 0
    if sides:
        h, w = (sides[int(i)] for i in torch.randint(0, len(sides), (2,), generator=g))
    else:
        h = w = latent_side
    return {"k": k, "noise": torch.randn((1, channels, h, w), generator=g)}


class Concept:
    """The encoded prompts of one run: the concept (target and positive), the neutral prompt, and the surrogate
    prompts when given (else surrogates are sampled around the concept's embedding)."""

    def __init__(self, parts, concept: str, surrogate_prompts: Sequence[str], device):
        texts = [concept, ""] + list(surrogate_prompts)
        enc = encode(parts, texts, device)
        self.target, self.neutral = enc[0:1], enc[1:2]
        self.surrogates = enc[2:] if surrogate_prompts else None

    def anchors(self, seed: int, step: int, count: int, stream: int = SURROGATE_STREAM) -> Optional[torch.Tensor]:
        """``count`` anchors for step ``step``: sampled around the concept, or drawn from the surrogate prompts."""
        if count <= 0:
            return None
        g = step_generator(seed, step, stream)
        if self.surrogates is None:
            return sample_surrogates(self.target[0], count, g)
        idx = torch.randint(0, self.surrogates.shape[0], (count,), generator=g)
        return self.surrogates[idx.to(self.surrogates.device)]


@torch.no_grad()
def sample_x_t(unet, membrane: Membrane, scheduler, concept: Concept, draws: dict, guidance: float, device,
               strength: float = 1.0) -> torch.Tensor:
    """x_t: the first k DDIM steps from the noise for the concept with guidance, with the adapter at ``strength``
    (train_spm.py lines 171-180 sample with the model being trained)."""
    from .esd import ddim_partial_sample

    with membrane.at(strength):
        return ddim_partial_sample(unet, scheduler, draws["noise"].to(device), concept.target, concept.neutral,
                                   draws["k"], guidance)


def step_loss(unet, membrane: Membrane, scheduler, concept: Concept, draws: dict, anchors, settings: dict,
              num_train_timesteps: int, device, sample_strength: float = 1.0):
    """(total, erase, anchoring) of one step's draws."""
    x_t = sample_x_t(unet, membrane, scheduler, concept, draws, settings["sample_guidance"], device, sample_strength)
    t = torch.tensor([loss_timestep(draws["k"], settings["ddim_steps"], num_train_timesteps)], device=device)
    erase, anchoring = spm_losses(unet, membrane, x_t, t, concept.target, concept.target, concept.neutral, anchors,
                                  settings["eta"])
    total = erase if anchoring is None else erase + settings["la_strength"] * anchoring
    return total, erase, anchoring


def make_optimizer(params, settings: dict):
    """AdamW (theirs: bitsandbytes' 8-bit AdamW, whose defaults these are; ours with --use_8bit_adam) and their cosine-with-restarts schedule
    with warm-up (train_util.py get_scheduler_fix; the configs' lr_warmup_steps 500, 3 cycles)."""
    from diffusers.optimization import get_constant_schedule, get_cosine_with_hard_restarts_schedule_with_warmup

    optimizer = base.optimizer(list(params), "adamw", settings.get("use_8bit_adam", False),
                               lr=settings["learning_rate"], **ADAMW)
    if settings["lr_scheduler"] == "constant":
        schedule = get_constant_schedule(optimizer)
    else:
        schedule = get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_warmup_steps=settings["lr_warmup_steps"], num_training_steps=settings["iterations"],
            num_cycles=settings["lr_num_cycles"])
    return optimizer, schedule


def train_spm(unet, membrane: Membrane, scheduler, concept: Concept, settings: dict, seed: int, sides, latent_side,
              device, progress: bool = True, ctx: Optional[RunContext] = None) -> Tuple[List[float], List[float]]:
    """The membrane's training: one x_t per step, the erasing loss plus ``la_strength`` x the anchoring loss, AdamW
    on the adapter only. Returns the total losses and the anchoring losses of the steps run in this process."""
    optimizer, schedule = make_optimizer(membrane.params.values(), settings)
    num_train = scheduler.config.num_train_timesteps
    channels = unet.config.in_channels
    anchor_losses: List[float] = []
    count = settings["surrogate_samples"] if settings["la_strength"] > 0 else 0

    def step(i: int):
        draws = draw_step(seed, i, settings["ddim_steps"], sides, latent_side, channels)
        anchors = concept.anchors(seed, i, count)
        total, erase, anchoring = step_loss(unet, membrane, scheduler, concept, draws, anchors, settings, num_train,
                                            device)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(list(membrane.params.values()), settings["max_grad_norm"])
        optimizer.step()
        schedule.step()
        if anchoring is None:
            return total.item(), {"erase": f"{erase.item():.4g}"}
        anchor_losses.append(anchoring.item())
        return total.item(), {"erase": f"{erase.item():.4g}", "anchor": f"{anchor_losses[-1]:.3g}"}

    losses = train_loop(ctx or RunContext(), settings["iterations"], step, membrane.params,
                        {"optimizer": optimizer, "lr_schedule": schedule}, {}, desc="SPM", progress=progress)
    return losses, anchor_losses


@torch.no_grad()
def probe_objective(unet, membrane: Membrane, scheduler, concept: Concept, settings: dict, seed: int, latent_side,
                    count: int, device) -> Optional[Dict[str, float]]:
    """The erasing and anchoring losses on ``count`` fixed examples (x_t sampled by the base model, k spread over
    the schedule, fixed surrogates), with the adapter as it is now; None when ``count`` is 0."""
    if count <= 0:
        return None
    steps, num_train = settings["ddim_steps"], scheduler.config.num_train_timesteps
    erase, anchor = [], []
    for j in range(count):
        draws = draw_step(seed, j, steps, (), latent_side, unet.config.in_channels)
        draws["k"] = 1 + (j * (steps - 1)) // count if steps > 1 else 0
        g = step_generator(seed, j, PROBE_STREAM)
        draws["noise"] = torch.randn(draws["noise"].shape, generator=g)
        anchors = concept.anchors(seed, j, max(settings["surrogate_samples"], 1), PROBE_STREAM + 1)
        _, e, a = step_loss(unet, membrane, scheduler, concept, draws, anchors, settings, num_train, device,
                            sample_strength=0.0)
        erase.append(e.item())
        anchor.append(a.item())
    return {"erase": sum(erase) / count, "anchoring": sum(anchor) / count}


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: their configs (configs/snoopy, configs/pikachu: config.yaml, prompt.yaml) and config.py
    Flag("--rank", 1, "the membrane's rank (one-dimensional: 1)", int),
    Flag("--alpha", 1.0, "the membrane's alpha; its update is scaled by alpha / rank", float),
    Flag("--iterations", 3000, "training iterations, one x_t each", int),
    Flag("--learning_rate", 1e-4, "AdamW learning rate", float),
    Flag("--lr_scheduler", "cosine_with_restarts", "learning-rate schedule", choices=("cosine_with_restarts",
                                                                                      "constant")),
    Flag("--lr_warmup_steps", 500, "linear warm-up steps of the cosine schedule", int),
    Flag("--lr_num_cycles", 3, "hard restarts of the cosine schedule", int),
    Flag("--max_grad_norm", 0.0, "gradient clipping; 0: off", float),
    Flag("--eta", 1.0, "negative guidance strength of the erasing target (their guidance_scale)", float),
    Flag("--ddim_steps", 30, "DDIM steps of the schedule x_t is sampled on; each iteration stops at a random one "
         "(their max_denoising_steps)", int),
    Flag("--sample_guidance", 3.0, "classifier-free guidance when sampling x_t", float),
    Flag("--la_strength", 1000.0, "weight of the latent-anchoring loss; 0: no anchoring (their action 'erase')",
         float),
    Flag("--surrogate_samples", 4, "surrogate concepts anchored per iteration (their sampling_batch_size)", int),
    Flag("--surrogate_prompts", [], "anchor these prompts instead of sampling surrogate embeddings around the "
         "concept", nargs="+", default_text="none: sampled as published"),
    Flag("--dynamic_resolution", "on", "x_t of random height and width in 64-px steps in [resolution/2, resolution) "
         "(off below 128 px)", choices=ON_OFF),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed examples on which the erasing and anchoring losses are reported before and "
         "after; 0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam (their optimizer: bitsandbytes' AdamW8bit)
)


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """SPM's flags, and against the model's own configuration when it is local."""
    require(concept is not None, "--concept: required for --method spm")
    require(settings["rank"] >= 1, f"--rank {settings['rank']}: must be at least 1")
    finite(settings["alpha"], "--alpha", 0, strict=True)
    require(settings["iterations"] >= 1, f"--iterations {settings['iterations']}: must be at least 1")
    finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    require(settings["lr_warmup_steps"] >= 0, f"--lr_warmup_steps {settings['lr_warmup_steps']}: must be >= 0")
    require(settings["lr_num_cycles"] >= 1, f"--lr_num_cycles {settings['lr_num_cycles']}: must be at least 1")
    finite(settings["max_grad_norm"], "--max_grad_norm", 0, strict=False)
    finite(settings["eta"], "--eta", 0, strict=False)
    require(settings["ddim_steps"] >= 2, f"--ddim_steps {settings['ddim_steps']}: must be at least 2 (x_t is "
                                         "taken after 1 .. ddim_steps-1 steps)")
    finite(settings["sample_guidance"], "--sample_guidance", 0, strict=False)
    finite(settings["la_strength"], "--la_strength", 0, strict=False)
    require(settings["surrogate_samples"] >= 1, f"--surrogate_samples {settings['surrogate_samples']}: must be at "
                                                "least 1")
    for p in settings["surrogate_prompts"]:
        check_text(p, "--surrogate_prompts")
        require(p.strip().lower() != concept.strip().lower(),
                f"--surrogate_prompts {p!r}: the concept itself; anchoring it would keep what is erased")
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    base.check_sampled_training(settings["resolution"], settings["ddim_steps"], model_dir)
    return {**settings, "concept": concept}


def write_adapter(output_dir: str, membrane: Membrane, rule: dict) -> None:
    """The adapter (their file format and metadata, train_spm.py lines 44-48) and its transport rule, each written
    under a temporary name and renamed."""
    from safetensors.torch import save_file

    from common.results import atomic_write_json

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ADAPTER_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(membrane.state_dict(), tmp, metadata={"prompts": ",".join(rule["erased_prompts"]),
                                                    "rank": str(membrane.rank), "alpha": str(membrane.alpha)})
    os.replace(tmp, path)
    atomic_write_json(os.path.join(output_dir, TRANSPORT_FILE), rule)


def transport_rule(membrane: Membrane, concept: str, base_model_note: str = "") -> dict:
    """What applying the adapter with facilitated transport needs (``apply_with_transport`` reads it)."""
    return {
        "adapter_file": ADAPTER_FILE, "format": "their key names: <key>.lora_down.weight, <key>.lora_up.weight, "
        "<key>.alpha with <key> = 'lora_unet_' + the UNet module path, dots as '_'",
        "erased_prompts": [concept], "rank": membrane.rank, "alpha": membrane.alpha, "modules": membrane.targets,
        "update": "W + strength * (alpha / rank) * up @ down on each module (a 1x1 up after a down with the "
                  "layer's kernel for Conv2d)",
        "similarity": "max over erased prompts c of max(cos(flat E(p), flat E(c)), |T(p) & T(c)| / |T(c)|): E the "
                      "text encoder's last hidden states [77 x d], T the word-token ids (BOS, EOS, padding left out)",
        "strength": "similarity ** strength_exponent", "strength_exponent": 2.0,
        "fused_pipeline_strength": 1.0,
    }


MEASURED = ("the fused pipeline (the adapter at strength 1 in the UNet's weights): a plain pipeline is what the "
            "revival scripts load and fine-tune, and strength 1 is what facilitated transport gives the erased "
            "prompt itself (similarity 1); transport lowers it only for prompts unlike the concept, which the "
            "revival measurement does not prompt")


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Train the membrane, fuse it into the UNet at strength 1 in place, write the adapter; return the card's."""
    from common.models import vae_scale_factor

    from .esd import make_ddim

    unet = parts.unet.to(device).requires_grad_(False).eval()
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_side = resolution // factor
    sides = resolution_choices(resolution, factor) if settings["dynamic_resolution"] == "on" else []
    concept = Concept(parts, settings["concept"], settings["surrogate_prompts"], device)
    scheduler = make_ddim(parts.inference_scheduler.config, settings["ddim_steps"])
    membrane = Membrane(unet, settings["rank"], settings["alpha"], seed).attach()

    before = probe_objective(unet, membrane, scheduler, concept, settings, seed, latent_side,
                             settings["probe_samples"], device)
    if settings["gradient_checkpointing"]:  # the recomputed forward runs the hooks at the training strength, 1
        unet.enable_gradient_checkpointing()
    losses, anchor_losses = train_spm(unet, membrane, scheduler, concept, settings, seed, sides, latent_side,
                                      device, progress=not quiet, ctx=ctx)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    after = probe_objective(unet, membrane, scheduler, concept, settings, seed, latent_side,
                            settings["probe_samples"], device)
    rule = transport_rule(membrane, settings["concept"])
    if ctx.output_dir is not None:
        write_adapter(ctx.output_dir, membrane, rule)
    membrane.fuse(1.0)
    unet.to("cpu")
    tail = losses[-max(1, len(losses) // 10):]
    numel = sum(p.numel() for p in membrane.params.values())
    return {
        "adapter": {"file": ADAPTER_FILE, "transport_rule": TRANSPORT_FILE, "modules": len(membrane.targets),
                    "tensors": len(membrane.params), "numel": numel, "rank": membrane.rank, "alpha": membrane.alpha,
                    "fused_at_strength": 1.0, "measured_by_revival_scripts": MEASURED},
        "trained_parameters": {"tensors": len(membrane.params), "numel": numel},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "mean_last_10pct": sum(tail) / len(tail) if tail else None,
                 "anchoring_last": anchor_losses[-1] if anchor_losses else None},
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before, "after": after},
        "surrogates": ("the --surrogate_prompts" if settings["surrogate_prompts"] else
                       "sampled around the concept's embedding (their sampling.py)"),
        RESOLVED: {"resolution": resolution,
                   "dynamic_resolution": [s * factor for s in sides] if sides else "off"},
    }


def _erased(settings: dict) -> List[str]:
    return [settings["concept"]]


register(Method(name="spm", family="SPM", summary="SPM: a one-dimensional adapter on the transformer blocks, fused",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=500))
