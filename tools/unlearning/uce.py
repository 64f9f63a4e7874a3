"""UCE: Gandikota et al., WACV 2024, "Unified Concept Editing in Diffusion Models" (docs/unlearning.md: UCE).

https://arxiv.org/abs/2308.14761 (code: https://github.com/rohitgandikota/unified-concept-editing). A closed-form
edit of the cross-attention key and value projections: no training, seconds.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from common.data import encode_prompts

from . import register
from .base import GUIDE, Flag, Method, check_text, finite, require

UCE_PROJECTIONS = ("attn2.to_k", "attn2.to_v")
# "all": every word token and the EOS of a concept prompt; "last": only its last
# word token (as the UCE authors' current script, trainscripts/uce_sd_erase.py).
TOKEN_MODES = ("all", "last")


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` including BOS and EOS, after truncation to the tokenizer's length."""
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def token_positions(n_tokens: int, mode: str) -> List[int]:
    """Sequence positions that stand for a prompt of ``n_tokens`` (BOS and EOS included).

    "all": the word tokens and the EOS, 1 .. n-1. BOS is left out: its
    embedding is the same for every prompt (causal attention), so an erase
    constraint on it would only restate a preservation one. The EOS is kept:
    it summarises the whole prompt. "last": the last word token alone, n-2, as
    the UCE authors' script (for the empty prompt that is BOS).
    """
    if mode == "all":
        return list(range(1, n_tokens))
    if mode == "last":
        return [n_tokens - 2]
    raise ValueError(f"unknown token mode {mode!r}")


@torch.no_grad()
def uce_embeddings(tokenizer, text_encoder, erase: Sequence[str], guides: Sequence[str], preserve: Sequence[str],
                   mode: str, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows c_i (erase), their guide rows c_guide, and rows c_j (preserve), float64 on the CPU, [n, d] each.

    With "all" the guide row of erase position p is the guide prompt's
    embedding at position p (padding included when the guide is shorter):
    what the UNet would see there for the guide prompt. With "last" it is the
    guide's own last-token embedding.
    """
    if len(guides) != len(erase):
        raise ValueError("one guide per erased concept")
    erase_rows, guide_rows, preserve_rows = [], [], []
    for concept, guide in zip(erase, guides):
        emb = encode_prompts(tokenizer, text_encoder, [concept, guide], device).double().cpu()
        pos = token_positions(token_count(tokenizer, concept), mode)
        guide_pos = pos if mode == "all" else token_positions(token_count(tokenizer, guide), mode)
        erase_rows.append(emb[0, pos])
        guide_rows.append(emb[1, guide_pos])
    for concept in preserve:
        emb = encode_prompts(tokenizer, text_encoder, [concept], device).double().cpu()
        preserve_rows.append(emb[0, token_positions(token_count(tokenizer, concept), mode)])
    d = text_encoder.config.hidden_size

    def stack(rows):
        return torch.cat(rows) if rows else torch.zeros(0, d, dtype=torch.float64)

    return stack(erase_rows), stack(guide_rows), stack(preserve_rows)


def uce_transform(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lamb: float,
                  erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The d x d matrix M with W_new = W_old M for every edited projection (UCE's closed form, paper eq. 7).

    W_new = (e sum W c_guide c_i^T + s sum W c_j c_j^T + lamb W)(e sum c_i c_i^T + s sum c_j c_j^T + lamb I)^-1
          = W (e G^T E + s P^T P + lamb I)(e E^T E + s P^T P + lamb I)^-1   (rows E, G, P)
    Both factors are the same for every layer, so M is solved for once; the
    targets W_old c_guide and W_old c_j are each layer's old outputs. float64:
    the system's conditioning follows the embeddings' spread, not the weights'.
    """
    E, G, P = (x.to(torch.float64) for x in (erase, guide, preserve))
    d = E.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    left = erase_scale * G.T @ E + preserve_scale * P.T @ P + lamb * eye
    right = erase_scale * E.T @ E + preserve_scale * P.T @ P + lamb * eye
    # M = left @ right^-1; right is symmetric, so solve right M^T = left^T.
    return torch.linalg.solve(right, left.T).T


def uce_modules(unet: torch.nn.Module) -> List[Tuple[str, torch.nn.Linear]]:
    """The cross-attention key and value projections UCE edits (text embedding -> keys/values)."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith(UCE_PROJECTIONS):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name}: expected a Linear layer, found {type(module).__name__}")
            if module.bias is not None:
                raise ValueError(f"{name}: has a bias; UCE's closed form here edits bias-free projections")
            found.append((name, module))
    if not found:
        raise ValueError("no cross-attention key/value projections (attn2.to_k / attn2.to_v) in this UNet")
    return found


@torch.no_grad()
def apply_uce(unet: torch.nn.Module, transform: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Replace each projection weight W by W M (in float64, stored back in W's dtype); return the old weights."""
    old = {}
    for name, module in uce_modules(unet):
        w = module.weight
        old[name + ".weight"] = w.detach().clone()
        new = w.detach().to(torch.float64).cpu() @ transform
        w.copy_(new.to(device=w.device, dtype=w.dtype))
    return old


@torch.no_grad()
def uce_residuals(w_old: torch.Tensor, w_new: torch.Tensor, erase, guide, preserve) -> Dict[str, float]:
    """How well one edited projection meets UCE's goals.

    erase: ||W_new c_i - W_old c_guide|| / ||W_old c_i - W_old c_guide|| (share of the gap left; 0 = reached).
    preserve: ||W_new c_j - W_old c_j|| / ||W_old c_j|| (relative drift of the preserved outputs).
    """
    W0, W1 = w_old.double().cpu(), w_new.double().cpu()
    E, G, P = (x.double() for x in (erase, guide, preserve))
    target = G @ W0.T
    gap = torch.linalg.norm(E @ W0.T - target)
    out = {"erase": float(torch.linalg.norm(E @ W1.T - target) / gap) if gap > 0 else 0.0}
    if P.shape[0]:
        out["preserve"] = float(torch.linalg.norm(P @ W1.T - P @ W0.T) / torch.linalg.norm(P @ W0.T))
    return out


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: the authors' script's
    Flag("--erase", [], "concepts to erase (with --concept, that one too)", nargs="+"),
    Flag("--guide", [""], "concept the erased ones are mapped to: one for all, or one per erased concept", nargs="+"),
    Flag("--preserve", [], "concepts whose cross-attention outputs are kept", nargs="*"),
    Flag("--lamb", 0.5, "regularisation toward the old weights", float),
    Flag("--erase_scale", 1.0, "weight of the erase terms", float),
    Flag("--preserve_scale", 1.0, "weight of the preserve terms", float),
    Flag("--token_positions", "all", "which token embeddings stand for a concept: all (its words and EOS) or last "
         "(its last word, as the authors' script)", choices=TOKEN_MODES),
)


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """UCE's flags: what to erase (--erase and --concept), guides, what to preserve, the scales."""
    for c in settings["erase"]:
        check_text(c, "--erase")
    erase = list(settings["erase"]) + ([concept] if concept is not None else [])
    require(erase, "--erase (or --concept): give at least one concept to erase")
    require(len(settings["guide"]) in (1, len(erase)),
            f"--guide: give one guide, or one per erased concept ({len(erase)}), not {len(settings['guide'])}")
    for c in settings["preserve"]:
        check_text(c, "--preserve")
        require(c not in erase, f"--preserve {c!r}: also erased; a concept cannot be both")
    finite(settings["lamb"], "--lamb", 0, strict=True)
    finite(settings["erase_scale"], "--erase_scale", 0, strict=True)
    finite(settings["preserve_scale"], "--preserve_scale", 0, strict=True)
    return {**settings, "erase": erase, "concept": concept}


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx) -> dict:
    """Edit the UNet's cross-attention key/value projections in place; return what the card records."""
    guides = settings["guide"] * len(settings["erase"]) if len(settings["guide"]) == 1 else list(settings["guide"])
    parts.text_encoder.to(device)
    E, G, P = uce_embeddings(parts.tokenizer, parts.text_encoder, settings["erase"], guides, settings["preserve"],
                             settings["token_positions"], device)
    parts.text_encoder.to("cpu")
    M = uce_transform(E, G, P, settings["lamb"], settings["erase_scale"], settings["preserve_scale"])
    old = apply_uce(parts.unet, M)
    weights = dict(parts.unet.named_parameters())
    per_layer = {name: uce_residuals(w, weights[name], E, G, P) for name, w in old.items()}
    summary = {}
    for key in ("erase", "preserve"):
        values = [r[key] for r in per_layer.values() if key in r]
        if values:
            summary[key] = {"max": max(values), "mean": sum(values) / len(values)}
    return {
        GUIDE: guides,
        "edited_parameters": sorted(old),
        "token_vectors": {"erase": E.shape[0], "preserve": P.shape[0]},
        "residuals": summary,
        "residuals_note": "erase: ||W_new c_i - W_old c_guide|| / ||W_old c_i - W_old c_guide|| (0 = reached); "
                          "preserve: ||W_new c_j - W_old c_j|| / ||W_old c_j||; over the edited projections",
    }


def _erased(settings: dict) -> List[str]:
    return list(settings["erase"])


register(Method(name="uce", family="UCE", summary="closed-form edit",
                paper="Gandikota et al., WACV 2024, https://arxiv.org/abs/2308.14761",
                code="https://github.com/rohitgandikota/unified-concept-editing", flags=FLAGS, check=check, run=run,
                erased=_erased, target_flags=("erase", "guide", "preserve")))
