"""Prompts longer than the text encoder's positions, encoded in slices as joycenerd/P4D's P4D-K pipeline does
(docs/attacks.md: P4D-N and P4D-K).

``truncate`` (the pipeline's own rule, the toolkit's default): a prompt is padded and cut to the encoder's 77
positions. ``chunks`` (joycenerd/P4D model/p4dk/modified_stable_diffusion_pipeline.py, _new_encode_prompt): a
prompt's text is padded and cut to max(77, words + 20) positions, words = len(text.split(' ')); the ids are cut into
raw 77-position slices (positions i:i+77, no start-of-text added to a later slice), each slice goes through the text
encoder on its own (position embeddings from 0 and the causal mask within the slice) and the hidden states are
concatenated along the sequence (the UNet's cross-attention takes any length). The unconditional text "" is padded
to the same length and encoded the same way.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

MODES = ("truncate", "chunks")
# joycenerd/P4D's margin of positions over the word count (_new_encode_prompt: len(prompt.split(' ')) + 20).
WORD_MARGIN = 20


def published_length(prompt: str, width: int) -> int:
    """The positions joycenerd/P4D pads (and cuts) a prompt's text to: max(width, words + 20)."""
    return max(width, len(prompt.split(" ")) + WORD_MARGIN)


def encode_in_slices(encode: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], ids: torch.Tensor,
                     width: int, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hidden states [B, L, d] of ids [B, L] (with input embeddings ``embeds`` [B, L, d] when given): ``encode``
    (ids slice, embeds slice or None) on positions 0:width, width:2 width, ... each on its own, concatenated along
    the sequence; a sequence of at most ``width`` positions is one slice, encoded as it is."""
    outs = [encode(ids[:, i:i + width], None if embeds is None else embeds[:, i:i + width])
            for i in range(0, ids.shape[1], width)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def encode_ids_in_slices(text_encoder, ids: torch.Tensor, width: int) -> torch.Tensor:
    """The text encoder's last hidden states [B, L, d] of token ids [B, L], ``width`` positions at a time."""
    return encode_in_slices(lambda part, _: text_encoder(part.to(text_encoder.device), return_dict=False)[0], ids,
                            width)


def padded_ids(tokenizer, prompts: Sequence[str], length: int) -> torch.Tensor:
    """Token ids [B, length] of ``prompts``: start-of-text, tokens, end-of-text, padded and cut to ``length`` as the
    tokenizer pads and cuts (the end-of-text kept)."""
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def chunked_prompt_embeds(text_encoder, tokenizer, prompts: Sequence[str], length: int
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, unconditional embeddings) [B, length, d] of ``prompts`` padded to ``length`` positions
    and encoded in the tokenizer's slices, the unconditional text "" padded to the same length."""
    width = tokenizer.model_max_length
    cond = encode_ids_in_slices(text_encoder, padded_ids(tokenizer, prompts, length), width)
    uncond = encode_ids_in_slices(text_encoder, padded_ids(tokenizer, [""] * len(prompts), length), width)
    return cond, uncond
