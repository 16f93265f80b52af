"""Block kinds known to the builder: kind -> how to make its module from its spec.

Built-in kinds (mamba3, attention, swiglu) are registered here; :func:`register_block` adds a
user kind to both the spec parser and the builder in one call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from hybridlm.blocks import Attention, Mamba3, SwiGLU
from hybridlm.layouts.blocks import AttentionSpec, BlockSpec, Mamba3Spec, SwiGLUSpec
from hybridlm.layouts.registry import register_block_spec

# (spec, d_model, layer_idx, **factory) -> module with forward(x, cu_seqlens=None, cache=None)
BuildFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class BlockKind:
    spec_cls: type[BlockSpec]
    build: BuildFn
    # Linear layers that write into the residual stream; the init recipe scales them down.
    out_projections: tuple[str, ...] = ()


_KINDS: dict[str, BlockKind] = {}


def register_block(kind: str, spec_cls: type[BlockSpec], build: BuildFn | type[nn.Module], *,
                   out_projections: tuple[str, ...] = (), replace: bool = False) -> None:
    """Register a block kind: its pydantic spec model and a builder.

    ``build`` is called as ``build(spec, d_model=..., layer_idx=..., device=..., dtype=..., norm_eps=...)``
    and returns an ``nn.Module`` whose ``forward(x, cu_seqlens=None, cache=None)`` maps
    (batch, seq, d_model) to the same shape. Optional methods:

    * ``allocate_cache(batch, max_len, device=None, dtype=None)`` for a block that keeps state
      across tokens (without it, the block is treated as position-wise during generation);
    * ``reset_parameters()`` to initialize parameters that are not Linear weights (needed when the
      model is built on the meta device; Linear weights get the recipe of hybridlm.builder.model.init);
    * ``state_bytes(context, dtype)`` for the inference-memory accounting.
    """
    spec_kind = spec_cls.model_fields["kind"].default
    if spec_kind != kind:
        raise ValueError(f"{spec_cls.__name__}.kind defaults to {spec_kind!r}; it must be {kind!r} "
                         f"(declare `kind: Literal[{kind!r}] = {kind!r}`)")
    if kind in _KINDS and not replace:
        raise ValueError(f"block kind {kind!r} is already registered; pass replace=True to override it")
    register_block_spec(kind, spec_cls, replace=True)
    _KINDS[kind] = BlockKind(spec_cls, build, tuple(out_projections))


def block_kind(kind: str) -> BlockKind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise KeyError(f"no builder registered for block kind {kind!r}") from None


def _mamba3(spec: Mamba3Spec, d_model: int, layer_idx: int, **ctx: Any) -> Mamba3:
    return Mamba3(
        d_model=d_model, d_state=spec.d_state, expand=spec.expand, headdim=spec.headdim, ngroups=spec.ngroups,
        rope_fraction=spec.rope_fraction, dt_min=spec.dt_min, dt_max=spec.dt_max,
        dt_init_floor=spec.dt_init_floor, A_floor=spec.A_floor, is_mimo=spec.mimo_rank > 1,
        mimo_rank=spec.mimo_rank, chunk_size=spec.chunk_size, layer_idx=layer_idx,
        a_activation=spec.a_activation, discretization=spec.discretization, rotation=spec.rotation,
        bc_bias=spec.bc_bias, conv_kernel=spec.conv_kernel, out_norm=spec.out_norm,
        backend=None if spec.backend == "auto" else spec.backend, norm_eps=ctx.get("norm_eps", 1e-5), device=ctx.get("device"), dtype=ctx.get("dtype"))


def _attention(spec: AttentionSpec, d_model: int, layer_idx: int, **ctx: Any) -> Attention:
    return Attention(
        d_model, spec.n_heads, spec.kv_heads, spec.resolved_head_dim(d_model), position=spec.position,
        rope_theta=spec.rope_theta, qk_norm=spec.qk_norm, window=spec.window,
        norm_eps=ctx.get("norm_eps", 1e-5), layer_idx=layer_idx, backend=None if spec.backend == "auto" else spec.backend,
        device=ctx.get("device"), dtype=ctx.get("dtype"))


def _swiglu(spec: SwiGLUSpec, d_model: int, layer_idx: int, **ctx: Any) -> SwiGLU:
    return SwiGLU(d_model, spec.resolved_hidden(d_model), device=ctx.get("device"), dtype=ctx.get("dtype"))


register_block("mamba3", Mamba3Spec, _mamba3, out_projections=("out_proj",))
register_block("attention", AttentionSpec, _attention, out_projections=("wo",))
register_block("swiglu", SwiGLUSpec, _swiglu, out_projections=("w2",))
