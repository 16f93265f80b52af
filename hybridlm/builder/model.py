"""HybridLM: embedding, residual blocks in pattern order, final norm, LM head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hybridlm.blocks import RMSNorm, ResidualBlock
from hybridlm.builder.registry import block_kind
from hybridlm.errors import ShapeError
from hybridlm.layouts.spec import ModelSpec


@dataclass
class HybridCache:
    """Per-layer decode state (None for position-wise layers) and the number of tokens seen."""

    layers: list[Any]
    batch_size: int
    max_len: int
    seqlen_offset: int = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers if c is not None)

    def reset(self) -> "HybridCache":
        for c in self.layers:
            if c is not None:
                c.zero_()
        self.seqlen_offset = 0
        return self


class HybridLM(nn.Module):
    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        self.spec = spec
        factory = {"device": device, "dtype": dtype}
        d = spec.d_model
        self.tok_embeddings = nn.Embedding(spec.vocab_size, d, **factory)
        layers = []
        for resolved in spec.resolve():
            mixer = block_kind(resolved.spec.kind).build(
                resolved.spec, d_model=d, layer_idx=resolved.index, norm_eps=spec.norm_eps, **factory)
            layers.append(ResidualBlock(mixer, d, spec.norm_eps, spec.residual_in_fp32, **factory))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(d, eps=spec.norm_eps, **factory)
        self.output = nn.Linear(d, spec.vocab_size, bias=False, **factory)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the spec says so (``to_empty`` unties them)."""
        if self.spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True) -> "HybridLM":
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Apply the init recipe (hybridlm.builder.init); safe after ``to_empty`` from the meta device."""
        from hybridlm.builder.init import init_weights

        self.tie_weights()
        init_weights(self)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, ids: Tensor, cu_seqlens: Tensor | None = None, cache: HybridCache | None = None) -> Tensor:
        """ids (B, L) -> logits (B, L, vocab). Packed: ids (1, T) with ``cu_seqlens`` (NS+1,).

        With ``cache`` the tokens continue from the cached state (prefill, chunked prefill or a
        decode step) and the cache advances by L tokens.
        """
        return self.output(self.features(ids, cu_seqlens, cache))

    def features(self, ids: Tensor, cu_seqlens: Tensor | None = None, cache: HybridCache | None = None) -> Tensor:
        """The final-normed hidden states (B, L, d_model) that ``output`` maps to logits.

        Scorers apply ``output`` only where they need logits, which saves the (B, L, vocab) tensor.
        """
        if ids.dim() != 2:
            raise ShapeError(f"ids must be (batch, seq); got shape {tuple(ids.shape)}")
        if cache is not None:
            if cache.batch_size != ids.shape[0]:
                raise ShapeError(f"cache was allocated for batch {cache.batch_size}; got batch {ids.shape[0]}")
            if cache.seqlen_offset + ids.shape[1] > cache.max_len:
                raise ShapeError(f"cache holds {cache.max_len} tokens; {cache.seqlen_offset + ids.shape[1]} needed")
        h = self.tok_embeddings(ids)
        if self.spec.residual_in_fp32:
            h = h.float()
        for i, layer in enumerate(self.layers):
            h = layer(h, cu_seqlens=cu_seqlens, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seqlen_offset += ids.shape[1]
        return self.norm(h).to(self.output.weight.dtype)

    # -- decode -------------------------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> HybridCache:
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        layers = [layer.allocate_cache(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]
        return HybridCache(layers, batch_size, max_len)

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, generator: torch.Generator | None = None, eos_token_id: int | None = None) -> Tensor:
        """Prefill ``ids`` (B, L), then sample ``max_new_tokens`` one step at a time.

        temperature 0 is greedy; ``top_k`` keeps the k most likely tokens. Returns (B, L + new).
        """
        from hybridlm.builder.generate import sample_next

        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[1] == 0:
            raise ShapeError("generate needs a prompt of at least one token")
        cache = self.allocate_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = self(ids, cache=cache)[:, -1]
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(token[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)
