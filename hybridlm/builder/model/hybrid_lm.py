"""HybridLM: embedding, residual blocks in pattern order, final norm, LM head."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from hybridlm.blocks import RMSNorm, ResidualBlock
from hybridlm.builder.model.registry import block_kind
from hybridlm.errors import ShapeError
from hybridlm.layouts.spec import ModelSpec

if TYPE_CHECKING:
    from hybridlm.builder.inference.cache import HybridCache


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
        """Apply the init recipe (hybridlm.builder.model.init); safe after ``to_empty`` from the meta device."""
        from hybridlm.builder.model.init import init_weights

        self.tie_weights()
        init_weights(self)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, ids: Tensor, cu_seqlens: Tensor | None = None, cache: HybridCache | None = None) -> Tensor:
        """ids (B, L) -> logits (B, L, vocab). Packed: ids (1, T) with ``cu_seqlens`` (NS+1,), or rows
        of packed documents (training): ids (B, L) with ``cu_seqlens`` over the flattened B·L tokens,
        no document crossing a row.

        With ``cache`` the tokens continue from the cached state (prefill, chunked prefill or a
        decode step) and the cache advances by L tokens; packed input with a cache continues row i
        of the cache with sequence i (a prefill of prompts of different lengths).
        """
        return self.output(self.features(ids, cu_seqlens, cache))

    def features(self, ids: Tensor, cu_seqlens: Tensor | None = None, cache: HybridCache | None = None, *,
                 fused_norms: bool = False) -> Tensor:
        """The final-normed hidden states (B, L, d_model) that ``output`` maps to logits.

        Scorers apply ``output`` only where they need logits, which saves the (B, L, vocab) tensor.
        ``fused_norms``: the inference path (the Decoder's): every block boundary, the residual add
        and the next RMSNorm, is one op (hybridlm/kernels/rmsnorm/: a Triton kernel on CUDA, the
        reference elsewhere and whenever autograd records), instead of an add and seven torch ops.
        """
        if ids.dim() != 2:
            raise ShapeError(f"ids must be (batch, seq); got shape {tuple(ids.shape)}")
        new_tokens = 0
        if cache is not None:
            new_tokens = self._check_cache_room(ids, cu_seqlens, cache)
        h = self.tok_embeddings(ids)
        if self.spec.residual_in_fp32:
            h = h.float()
        layer_caches = [None] * len(self.layers) if cache is None else cache.layers
        if fused_norms:
            out = None  # the previous block's output, added to the stream by the next norm
            for layer, layer_cache in zip(self.layers, layer_caches):
                out, h = layer.fused_forward(h, out, cu_seqlens=cu_seqlens, cache=layer_cache)
            hidden = self.norm.add_forward(h, out, self.output.weight.dtype)[0]
        else:
            for layer, layer_cache in zip(self.layers, layer_caches):
                h = layer(h, cu_seqlens=cu_seqlens, cache=layer_cache)
            hidden = self.norm(h).to(self.output.weight.dtype)
        if cache is not None:
            cache.seqlen_offset += new_tokens
        return hidden

    @staticmethod
    def _check_cache_room(ids: Tensor, cu_seqlens: Tensor | None, cache: HybridCache) -> int:
        """The tokens the longest row gains; raises when the batch or the capacity does not fit."""
        if cu_seqlens is None:
            rows, new_tokens = ids.shape[0], ids.shape[1]
        else:
            if ids.shape[0] != 1:
                raise ShapeError(f"packed ids (cu_seqlens given) must be (1, total); got {tuple(ids.shape)}")
            rows = cu_seqlens.numel() - 1
            new_tokens = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if rows else 0  # a prefill: host sync is fine
        if cache.batch_size != rows:
            raise ShapeError(f"cache was allocated for batch {cache.batch_size}; got batch {rows}")
        needed = cache.seqlen_offset + new_tokens
        if needed > cache.max_len:
            raise ShapeError(f"cache holds {cache.max_len} tokens; {needed} needed. Allocate a larger cache.")
        return new_tokens

    # -- decode -------------------------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> HybridCache:
        from hybridlm.builder.inference.cache import HybridCache  # the model's convenience entry to inference

        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        layers = [layer.allocate_cache(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]
        return HybridCache(layers, batch_size, max_len)

    @torch.no_grad()
    def generate(self, ids: Tensor | Sequence[Tensor], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, cuda_graph: bool = True, prefill_chunk: int | None = None,
                 prefill_rows: int | None = None,
                 compile_step: bool | str = False) -> Tensor | list[Tensor]:
        """Prefill the prompts, then sample ``max_new_tokens`` one step at a time.

        ``ids``: (B, L) or 1-D -> returns (B, L + new); or a list of 1-D prompts of any lengths ->
        returns a list of 1-D tensors (prompt + its new tokens, cut after its first EOS).
        temperature 0 is greedy; ``top_k`` keeps the k most likely tokens; generation stops early
        once every row has produced ``eos_token_id``. On CUDA the decode step replays a CUDA graph
        unless ``cuda_graph=False``; ``prefill_chunk`` and ``prefill_rows`` bound the prefill's memory
        (that many tokens of each prompt, that many prompts per forward), ``compile_step`` runs the step
        through ``torch.compile``.
        Lower level: :class:`hybridlm.builder.inference.decoder.Decoder`.
        """
        from hybridlm.builder.inference.generate import generate  # the model's convenience entry to inference

        return generate(self, ids, max_new_tokens, temperature, top_k, generator=generator,
                        eos_token_id=eos_token_id, cuda_graph=cuda_graph, prefill_chunk=prefill_chunk,
                        prefill_rows=prefill_rows, compile_step=compile_step)
