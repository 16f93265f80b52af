"""Sampling the next token from logits, and the generation loop over a :class:`Decoder`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from hybridlm.builder.inference.decoder import Decoder
from hybridlm.errors import ShapeError
from hybridlm.kernels.greedy import argmax as greedy_argmax

if TYPE_CHECKING:
    from hybridlm.builder.model.hybrid_lm import HybridLM


def greedy(logits: Tensor) -> Tensor:
    """logits (B, V) -> the first index of each row's maximum, as ``argmax(-1)`` (hybridlm/kernels/greedy/)."""
    return greedy_argmax(logits)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,). temperature <= 0 means greedy."""
    if temperature <= 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: "HybridLM", prompts: Tensor | Sequence[Tensor], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, *, generator: torch.Generator | None = None, eos_token_id: int | None = None,
             cuda_graph: bool = True, prefill_chunk: int | None = None, prefill_rows: int | None = None,
             compile_step: bool | str = False) -> Tensor | list[Tensor]:
    """Prefill ``prompts`` and sample up to ``max_new_tokens`` per sequence (see HybridLM.generate).

    A finished row (it produced ``eos_token_id``) is fed EOS until every row is finished.
    ``prefill_chunk``, ``prefill_rows`` and ``compile_step``: as :class:`Decoder`'s.
    """
    as_list = not isinstance(prompts, Tensor)
    if as_list:
        prompts = list(prompts)
        if not prompts:
            raise ShapeError("generate needs at least one prompt")
        batch, longest = len(prompts), max(p.numel() if isinstance(p, Tensor) else 0 for p in prompts)
    else:
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ShapeError(f"generate needs (batch, seq) ids with seq >= 1, a 1-D prompt or a list of 1-D "
                             f"prompts; got shape {tuple(prompts.shape)}")
        batch, longest = prompts.shape
    if max_new_tokens <= 0:
        return [p.clone() for p in prompts] if as_list else prompts
    # One graph capture costs a few eager steps: worth it only when there are steps to replay.
    decoder = Decoder(model, batch, longest + max_new_tokens, cuda_graph=cuda_graph and max_new_tokens > 1,
                      prefill_chunk=prefill_chunk, prefill_rows=prefill_rows,
                      compile_step=compile_step)
    logits = decoder.prefill(prompts)
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    new_tokens = []
    token = sample_next(logits, temperature, top_k, generator)
    for i in range(max_new_tokens):
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new_tokens.append(token)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        if temperature <= 0:  # the choice inside the step's graph; it feeds its own choice back unless EOS replaced some
            token = decoder.step_greedy(token if i == 0 or eos_token_id is not None else None)
        else:
            token = sample_next(decoder.step(token), temperature, top_k, generator)
    generated = torch.stack(new_tokens, dim=1)  # (B, steps)
    if not as_list:
        return torch.cat([prompts, generated.to(prompts.device)], dim=1)
    return [torch.cat([p, _through_first(row.to(p.device), eos_token_id)]) for p, row in zip(prompts, generated)]


def _through_first(tokens: Tensor, eos_token_id: int | None) -> Tensor:
    """The tokens up to and including the first EOS (all of them without one)."""
    if eos_token_id is None:
        return tokens
    hits = (tokens == eos_token_id).nonzero()
    return tokens if hits.numel() == 0 else tokens[: int(hits[0]) + 1]
