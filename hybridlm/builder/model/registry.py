"""Block kinds known to the builder: kind -> how to make its module from its spec, and what the
rest of the library needs to know about it (one :class:`BlockKind` each).

Built-in kinds (mamba3, attention, swiglu) are registered here; :func:`register_block` adds a
user kind to both the spec parser and the builder in one call. The accounting, the init recipe,
the optimizer and the tensor-parallel plan read a kind's :class:`BlockKind`; none of them names a
kind.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hybridlm.blocks import Attention, Mamba3, SwiGLU
from hybridlm.layouts.blocks import AttentionSpec, BlockSpec, Mamba3Spec, SwiGLUSpec, block_fields
from hybridlm.layouts.registry import register_block_spec

# (spec, d_model, layer_idx, **factory) -> module with forward(x, cu_seqlens=None, cache=None)
BuildFn = Callable[..., nn.Module]
# (module, seq_len) -> forward FLOPs per token that no weight accounts for (attention scores, a scan)
FlopsFn = Callable[[nn.Module, int], int]
# (module, context, dtype) -> bytes of decode state per sequence
StateBytesFn = Callable[[nn.Module, int, torch.dtype], int]


def _module_state_bytes(module: nn.Module, context: int, dtype: torch.dtype) -> int:
    """The default: the module's own ``state_bytes(context, dtype)`` if it has one, else 0."""
    fn = getattr(module, "state_bytes", None)
    return 0 if fn is None else fn(context, dtype)


def _no_flops(module: nn.Module, seq_len: int) -> int:
    return 0


@dataclass(frozen=True)
class BlockKind:
    """What the library knows of one block kind.

    * ``spec_cls``, ``build``: its spec model and how to make its module (:func:`register_block`).
    * ``out_projections``: Linear layers that write into the residual stream; the init recipe
      scales them down (hybridlm/builder/model/init.py).
    * ``flops(module, seq_len)``: forward FLOPs per token beyond the matmul weights (attention's
      QKᵀ/AV, a scan), for the accounting (hybridlm/builder/model/accounting.py); default 0.
    * ``state_bytes(module, context, dtype)``: decode state per sequence; ``kv_cache``: whether
      that state is a KV cache (grows with the context) rather than a recurrent state.
    * ``no_decay``: parameter names (the last part of the name) kept out of weight decay besides
      norms and biases (hybridlm/titan/optim.py).
    * ``tp_plan``: how tensor parallelism shards the block (hybridlm/titan/tensor_parallel.py,
      which registers the built-in kinds' plans); None: the kind cannot be sharded.
    """

    spec_cls: type[BlockSpec]
    build: BuildFn
    out_projections: tuple[str, ...] = ()
    flops: FlopsFn = _no_flops
    state_bytes: StateBytesFn = _module_state_bytes
    kv_cache: bool = False
    no_decay: tuple[str, ...] = ()
    tp_plan: Any = None


_KINDS: dict[str, BlockKind] = {}


def register_block(kind: str, spec_cls: type[BlockSpec], build: BuildFn | type[nn.Module], *,
                   out_projections: tuple[str, ...] = (), flops: FlopsFn | None = None,
                   state_bytes: StateBytesFn | None = None, kv_cache: bool = False, no_decay: tuple[str, ...] = (),
                   tp_plan: Any = None, replace: bool = False) -> None:
    """Register a block kind: its pydantic spec model, a builder, and what :class:`BlockKind` lists.

    ``build`` is called as ``build(spec, d_model=..., layer_idx=..., device=..., dtype=..., norm_eps=...)``
    and returns an ``nn.Module`` whose ``forward(x, cu_seqlens=None, cache=None)`` maps
    (batch, seq, d_model) to the same shape. Optional methods:

    * ``allocate_cache(batch, max_len, device=None, dtype=None)`` for a block that keeps state
      across tokens (without it, the block is treated as position-wise during generation);
    * ``reset_parameters()`` to initialize parameters that are not Linear weights (needed when the
      model is built on the meta device; Linear weights get the recipe of hybridlm.builder.model.init);
    * ``state_bytes(context, dtype)`` for the inference-memory accounting, unless ``state_bytes=``
      is given here.

    ``tp_plan``: for instance ``hybridlm.titan.tensor_parallel.HeadParallelPlan(colwise=("up",),
    rowwise=("down",))``.
    """
    spec_kind = spec_cls.model_fields["kind"].default
    if spec_kind != kind:
        raise ValueError(f"{spec_cls.__name__}.kind defaults to {spec_kind!r}; it must be {kind!r} "
                         f"(declare `kind: Literal[{kind!r}] = {kind!r}`)")
    if kind in _KINDS and not replace:
        raise ValueError(f"block kind {kind!r} is already registered; pass replace=True to override it")
    register_block_spec(kind, spec_cls, replace=True)
    _KINDS[kind] = BlockKind(spec_cls, build, tuple(out_projections), flops=flops or _no_flops,
                             state_bytes=state_bytes or _module_state_bytes, kv_cache=kv_cache,
                             no_decay=tuple(no_decay), tp_plan=tp_plan)


def register_tp_plan(kind: str, plan: Any) -> None:
    """Give a registered kind its tensor-parallel plan (hybridlm/titan/ does so for the built-in kinds)."""
    _KINDS[kind] = dataclasses.replace(block_kind(kind), tp_plan=plan)


def block_kind(kind: str) -> BlockKind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise KeyError(f"no builder registered for block kind {kind!r}") from None


def registered_kinds() -> dict[str, BlockKind]:
    return dict(_KINDS)


# -- the built-in kinds ----------------------------------------------------------------------------
def spec_kwargs(spec: BlockSpec, **derived: Any) -> dict[str, Any]:
    """Every field of ``spec`` by name (``kind`` aside), ``derived`` values replacing or adding some.

    Passed whole to a constructor that takes explicit keywords, a new spec field reaches the module
    without an edit here, and a constructor that lacks it fails loudly (TypeError) instead of
    dropping it."""
    return {**{name: getattr(spec, name) for name in block_fields(type(spec))}, **derived}


def _backend(spec: BlockSpec) -> str | None:
    return None if spec.backend == "auto" else spec.backend


def _mamba3(spec: Mamba3Spec, d_model: int, layer_idx: int, **ctx: Any) -> Mamba3:
    return Mamba3(d_model=d_model, **spec_kwargs(spec, is_mimo=spec.mimo_rank > 1, backend=_backend(spec)),
                  layer_idx=layer_idx, norm_eps=ctx.get("norm_eps", 1e-5), device=ctx.get("device"),
                  dtype=ctx.get("dtype"))


def _attention(spec: AttentionSpec, d_model: int, layer_idx: int, **ctx: Any) -> Attention:
    return Attention(d_model=d_model, **spec_kwargs(spec, backend=_backend(spec)), layer_idx=layer_idx,
                     norm_eps=ctx.get("norm_eps", 1e-5), device=ctx.get("device"), dtype=ctx.get("dtype"))


def _swiglu(spec: SwiGLUSpec, d_model: int, layer_idx: int, **ctx: Any) -> SwiGLU:
    return SwiGLU(d_model=d_model, **spec_kwargs(spec, hidden=spec.resolved_hidden(d_model)),
                  device=ctx.get("device"), dtype=ctx.get("dtype"))


register_block("mamba3", Mamba3Spec, _mamba3, out_projections=("out_proj",), flops=Mamba3.scan_flops_per_token,
               state_bytes=Mamba3.state_bytes,
               # the per-head scalars and vectors, as in the Mamba recipe
               no_decay=("dt_bias", "D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o"))
register_block("attention", AttentionSpec, _attention, out_projections=("wo",),
               flops=Attention.attention_flops_per_token, state_bytes=Attention.state_bytes, kv_cache=True)
register_block("swiglu", SwiGLUSpec, _swiglu, out_projections=("w2",))
