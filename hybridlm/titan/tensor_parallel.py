"""Tensor parallelism for HybridLM: every block kind with a plan, sharded by heads.

Plain ``torch.distributed.tensor`` (no torchtitan), so it runs and is tested without the trainer.
The plan follows torchtitan's llama3 (Megatron-style TP with sequence parallelism) and extends it
to Mamba-3 and to any block kind registered with a ``tp_plan`` (hybridlm/builder/model/registry.py):

* ``tok_embeddings``: vocabulary-sharded (``RowwiseParallel``); its output is sequence-sharded
  (``Shard(1)``) with sequence parallelism, else replicated. ``norm``: ``SequenceParallel``.
  ``output``: vocabulary-sharded (``ColwiseParallel``); logits are gathered, or stay
  vocabulary-sharded DTensors with ``loss_parallel`` (compute the loss under
  ``torch.distributed.tensor.parallel.loss_parallel()``). A tied head shares the embedding's
  ``Shard(0)`` weight.
* every residual block: its RMSNorm runs on sequence shards; its block becomes a
  :class:`ShardedBlock`: the same parameter names, as DTensors, whose forward gathers the sequence
  (``Shard(1) -> Replicate``), runs the *unsharded block's own code* on this rank's tensors
  (``torch.func.functional_call``; the blocks read their head counts from the parameters' shapes,
  so they know nothing of parallelism), and reduces the partial sums of its row-parallel output
  projection back to sequence shards (with ``sequence_parallel=False`` the stream stays replicated
  and the output is all-reduced).
* a block kind's plan (:class:`HeadParallelPlan`) names its column-parallel Linears (split by
  output rows: heads), its row-parallel ones (split by input columns) and its other head-sharded
  parameters; every other parameter is replicated.
* attention: ``wq``/``wk``/``wv`` column-parallel by heads (``n_kv_heads % tp == 0``), ``wo``
  row-parallel; ``q_norm``/``k_norm`` replicated.
* SwiGLU: ``w1``/``w3`` column-parallel, ``w2`` row-parallel (``hidden % tp == 0``).
* Mamba-3: the fused ``in_proj`` becomes :class:`HeadShardedInProj`, one parameter per segment of
  the official layout (``InProjLayout.segments()``, docs/mamba3.md §1.3): ``z``, ``x``, ``dt``,
  ``A``, ``trap`` rows sharded by heads (``Shard(0)``); ``B``/``C`` (rank, group, state) sharded by
  groups when ``ngroups % tp == 0``, else replicated (each rank reads the group of its heads:
  ``tp % ngroups == 0``); the angle rates, shared by all heads, replicated. Its local weight is this
  rank's ``[z, x, B, C, dt, A, trap, angle]`` rows in the order the mixer splits. ``dt_bias``,
  ``D``, ``B_bias``, ``C_bias``, ``mimo_x/z/o`` and the grouped out-norm weight are ``Shard(0)`` by
  heads; ``B_norm``/``C_norm`` replicated; ``out_proj`` row-parallel.

Gradients: a replicated parameter or input used only by this rank's heads gets a *partial*
gradient (``Partial()`` placement; the ranks' parts add up, as FSDP2 and DTensor ops reduce them).

Checkpoints keep the official names and shapes: ``state_dict()`` holds
``layers.N.mixer.in_proj.weight`` as a DTensor of the full official shape whose local part is this
rank's segment shards (DCP's ``LocalShardsWrapper``), *aliasing* the parameters — so a state dict
taken once (torchtitan's ``ModelWrapper`` caches it) still saves current values, DCP writes each
shard at its offset in the official layout (replicated segments once), and DCP loads in place at
any TP degree, or into an unsharded model. ``load_state_dict`` also takes the official weight as a
plain tensor. The optimizer state of in_proj is kept per segment (``in_proj.z_weight`` …).

Not supported (one :class:`TensorParallelError` before anything changes): head, group or width
counts not divisible by the TP degree, the Mamba-3 short convolution (``conv_kernel``), the
whole-width ``*_default`` out-norms (they would need an all-reduce inside the scan), block kinds
without a plan, row-parallel Linears with a bias, and a 2-D mesh. With sequence parallelism the
sequence length must be a multiple of the TP degree (checked at the first forward). Decoding (KV /
SSM caches) under TP is untested.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from hybridlm.blocks.attention import Attention
from hybridlm.blocks.mamba3 import Mamba3
from hybridlm.blocks.swiglu import SwiGLU
from hybridlm.builder.model.registry import block_kind, register_tp_plan, registered_kinds
from hybridlm.errors import HybridLMError

__all__ = [
    "TensorParallelError",
    "TensorParallelPlan",
    "HeadParallelPlan",
    "ShardedBlock",
    "HeadShardedInProj",
    "apply_tensor_parallel",
    "tensor_parallel_problems",
]

# (spec field or None, its value, reason): None when the problem is a parameter's shape
Problem = tuple[str | None, object, str]


class TensorParallelError(HybridLMError):
    """A model (or input) that the tensor-parallel plan cannot shard; the message names what to change."""


class TensorParallelPlan(Protocol):
    """What a block kind's ``tp_plan`` provides (:class:`HeadParallelPlan` is the usual one)."""

    def problems(self, block: nn.Module, tp: int) -> list[Problem]:
        """Every reason ``block`` cannot be sharded over ``tp`` ranks (empty: it can)."""

    def shard(self, block: nn.Module, mesh: DeviceMesh, stream: Placement) -> nn.Module:
        """The block's replacement on this rank: input and output in the residual stream's layout
        ``stream`` (``Shard(1)`` with sequence parallelism, else ``Replicate()``)."""


# ---------------------------------------------------------------------------------------------
# parameters and local tensors
# ---------------------------------------------------------------------------------------------
def _head_local(p: Tensor) -> Tensor:
    """This rank's tensor of ``p`` for computing with its own heads.

    A replicated parameter contributes to the loss only through this rank's heads here, so its
    gradient on this rank is a partial sum (``Partial``); a sharded one gets its shard's gradient."""
    if not isinstance(p, DTensor):
        return p
    return p.to_local(grad_placements=[Partial() if pl.is_replicate() else pl for pl in p.placements])


def _distributed_param(p: nn.Parameter, mesh: DeviceMesh, placement: Placement) -> nn.Parameter:
    new = nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]), requires_grad=p.requires_grad)
    for flag in ("_no_weight_decay",):  # the official optimizer flags survive sharding
        if hasattr(p, flag):
            setattr(new, flag, getattr(p, flag))
    return new


def _find(root: nn.Module, name: str) -> tuple[nn.Module, str, Tensor | None]:
    """(owner module, leaf name, the parameter or None) of a dotted parameter name; None when absent
    (a plan may list parameters that only some configurations have, e.g. Mamba-3's ``mimo_x``)."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return root, leaf, None
    return module, leaf, module._parameters.get(leaf)


def _meta_copy(block: nn.Module) -> nn.Module:
    """``block`` with every parameter and buffer on the meta device: its code and configuration, no values."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in block.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in block.buffers()})
    return copy.deepcopy(block, memo)


# ---------------------------------------------------------------------------------------------
# a sharded block
# ---------------------------------------------------------------------------------------------
class ShardedBlock(nn.Module):
    """A block sharded over a tensor-parallel mesh (see the module docstring).

    Holds the block's parameters (DTensors) and submodules under the block's own names, so state
    dicts and the optimizer see the same names as unsharded. ``template`` is the block on the meta
    device (not a submodule): its forward runs with this rank's tensors (:meth:`local_tensors`)."""

    def __init__(self, block: nn.Module, mesh: DeviceMesh, stream: Placement):
        super().__init__()
        object.__setattr__(self, "template", _meta_copy(block))
        self.mesh = mesh
        self.stream = stream
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in block.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
        for name, child in block.named_children():
            self.add_module(name, child)

    def local_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer of the block by its name, as this rank's tensor. A submodule
        with its own ``local_tensors()`` (:class:`HeadShardedInProj`) supplies its entries."""
        out: dict[str, Tensor] = {}
        skip = None
        for prefix, module in self.named_modules():
            if skip and prefix.startswith(skip):
                continue
            dot = f"{prefix}." if prefix else ""
            if module is not self and hasattr(module, "local_tensors"):
                out.update({dot + k: v for k, v in module.local_tensors().items()})
                skip = dot
                continue
            for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
                out[dot + name] = _head_local(t)
        return out

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, self.mesh, [self.stream], run_check=False)
        # Every rank reads the whole sequence; the input's gradient here covers this rank's heads only.
        x = x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        out = functional_call(self.template, self.local_tensors(), (x, *args), kwargs)
        # the row-parallel output projection left a partial sum on each rank
        out = DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
        return out.redistribute(placements=[self.stream], async_op=True).to_local()

    # -- what the block had, when it had it (see _sharded_class) -------------------------------------
    @torch.no_grad()
    def _reset_from_unsharded(self) -> None:
        """The unsharded block's own init, then each rank keeps its part: the values of an unsharded
        model from the same seed (random init directly on DTensors would depend on the layout)."""
        full = copy.deepcopy(self.template).to_empty(device=next(self.parameters()).device)
        full.reset_parameters()
        with implicit_replication():
            self.load_state_dict(full.state_dict())

    def _allocate_local_cache(self, *args, **kwargs):
        """The block's decode cache for this rank's heads."""
        with torch.no_grad(), _reparametrize_module(self.template, self.local_tensors()):
            return self.template.allocate_cache(*args, **kwargs)


@functools.cache
def _sharded_class(block_cls: type[nn.Module]) -> type[ShardedBlock]:
    """ShardedBlock with the block's ``reset_parameters`` / ``allocate_cache`` where it has them:
    the init recipe and the decoder look for exactly these methods."""
    methods = {}
    if hasattr(block_cls, "reset_parameters"):
        methods["reset_parameters"] = ShardedBlock._reset_from_unsharded
    if hasattr(block_cls, "allocate_cache"):
        methods["allocate_cache"] = ShardedBlock._allocate_local_cache
    return type(f"Sharded{block_cls.__name__}", (ShardedBlock,), methods) if methods else ShardedBlock


@dataclass(frozen=True)
class HeadParallelPlan:
    """Shard a block by heads, Megatron style (a :class:`TensorParallelPlan`).

    * ``colwise``: Linear layers split by output rows (``Shard(0)``: each rank computes its heads);
    * ``rowwise``: Linear layers split by input columns (``Shard(1)``); the block's output must be
      the sum of what they output (each rank's part is a partial sum); no bias;
    * ``sharded``: other parameters split along dim 0 (per-head vectors), dotted names, skipped
      where the block lacks them;
    * every other parameter is replicated;
    * ``check(block, tp)``: the kind's own rules, as ``(spec field, value, reason)``; without any
      problem from it, each listed parameter's split dimension must divide by ``tp``;
    * ``prepare(sharded, mesh)``: a kind's own rewrite before the rest (Mamba-3 splits ``in_proj``
      by segment).
    """

    colwise: tuple[str, ...] = ()
    rowwise: tuple[str, ...] = ()
    sharded: tuple[str, ...] = ()
    check: Callable[[nn.Module, int], Iterable[Problem]] | None = None
    prepare: Callable[[ShardedBlock, DeviceMesh], None] | None = None

    def problems(self, block: nn.Module, tp: int) -> list[Problem]:
        found = list(self.check(block, tp)) if self.check is not None else []
        return found or list(self._shape_problems(block, tp))

    def _shape_problems(self, block: nn.Module, tp: int) -> Iterable[Problem]:
        for names, dim, what in ((self.colwise, 0, "rows"), (self.rowwise, 1, "columns")):
            for name in names:
                _, _, weight = _find(block, f"{name}.weight")
                if weight is None:
                    yield None, name, f"the plan names Linear {name!r}, which the block does not have"
                elif weight.shape[dim] % tp:
                    yield None, name, f"{name}.weight has {weight.shape[dim]} {what}, not a multiple of tp={tp}"
        for name in self.rowwise:
            if _find(block, f"{name}.bias")[2] is not None:
                yield None, name, f"{name} is row-parallel and has a bias (it would be added once per rank)"
        for name in self.sharded:
            _, _, p = _find(block, name)
            if p is not None and p.shape[0] % tp:
                yield None, name, f"{name} has {p.shape[0]} rows, not a multiple of tp={tp}"

    def shard(self, block: nn.Module, mesh: DeviceMesh, stream: Placement) -> ShardedBlock:
        tp = mesh.size()
        problems = self.problems(block, tp)
        if problems:
            raise TensorParallelError(f"tensor parallelism over {tp} ranks cannot shard this "
                                      f"{type(block).__name__}: " + "; ".join(f"{f or 'parameter'} = {v!r}: {r}"
                                                                             for f, v, r in problems))
        sharded = _sharded_class(type(block))(block, mesh, stream)
        if self.prepare is not None:
            self.prepare(sharded, mesh)
        placements = [(f"{name}.{leaf}", Shard(0)) for name in self.colwise for leaf in ("weight", "bias")]
        placements += [(f"{name}.weight", Shard(1)) for name in self.rowwise]
        placements += [(name, Shard(0)) for name in self.sharded]
        placements += [(name, Replicate()) for name, _ in sharded.named_parameters()]
        for name, placement in placements:
            owner, leaf, p = _find(sharded, name)
            if p is not None and not isinstance(p, DTensor):
                owner.register_parameter(leaf, _distributed_param(p, mesh, placement))
        return sharded


# ---------------------------------------------------------------------------------------------
# Mamba-3's fused in_proj, one parameter per segment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Segment:
    name: str  # parameter name in HeadShardedInProj
    start: int  # its first row in the official in_proj.weight
    shape: tuple[int, ...]  # parameter shape: (rows, d_model), or (R, G·N, d_model) for B and C
    placement: Placement
    columns: tuple[int, int] | None = None  # replicated B/C: the dim-1 slice this rank's heads read

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])


class _OfficialShards(LocalShardsWrapper):
    """DCP's multi-shard local tensor, reporting the shards' dtype (the base class reports float32)."""

    @staticmethod
    def __new__(cls, shards: list[Tensor], offsets: list[tuple[int, int]], shape: torch.Size, like: Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device)
        r._local_shards = shards
        r._storage_meta = TensorStorageMetadata(
            properties=TensorProperties.create_from_tensor(like), size=shape,
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=s.size()) for s, o in zip(shards, offsets)])
        return r

    @staticmethod
    def handle_all_gather_into_tensor(args, kwargs):
        # The base class would concatenate the shards in storage order, which is not the official layout.
        raise TensorParallelError("the official in_proj.weight of a tensor-parallel Mamba-3 layer is a "
                                  "checkpoint view and cannot be gathered; use HeadShardedInProj.full_weight()")


class HeadShardedInProj(nn.Module):
    """Mamba-3's fused ``in_proj`` as one parameter per segment, each sharded by heads (or groups),
    or replicated; see the module docstring. Its local weight: this rank's ``[z, x, B, C, dt, A,
    trap, angle]`` rows."""

    def __init__(self, weight: Tensor, segments: list[_Segment], mesh: DeviceMesh):
        super().__init__()
        self.segments = segments
        self.official_shape = torch.Size(weight.shape)
        for seg in segments:
            rows = weight.detach()[seg.start: seg.start + seg.rows].reshape(seg.shape)
            self.register_parameter(seg.name, _distributed_param(nn.Parameter(rows, weight.requires_grad),
                                                                 mesh, seg.placement))

    def reset_parameters(self) -> None:
        # nn.Linear's default init of the fused weight: U(±1/sqrt(fan_in)), the same for every segment.
        bound = 1 / math.sqrt(self.official_shape[1])
        for seg in self.segments:
            nn.init.uniform_(getattr(self, seg.name), -bound, bound)

    def local_tensors(self) -> dict[str, Tensor]:
        """``weight``: this rank's rows of the fused weight, in the order the mixer splits them."""
        weights = []
        for seg in self.segments:
            w = _head_local(getattr(self, seg.name))
            if seg.columns is not None:
                w = w[:, seg.columns[0]: seg.columns[1]]
            weights.append(w.reshape(-1, w.shape[-1]))
        return {"weight": torch.cat(weights)}

    # -- the official weight in checkpoints ---------------------------------------------------------
    def _pieces(self) -> list[tuple[Tensor, tuple[int, int]]]:
        """This rank's parameter storage as 2-D views, each with its (row, column) offset in the
        official weight. A MIMO B/C shard is one piece per rank r (the official layout is r-major)."""
        pieces = []
        for seg in self.segments:
            p = getattr(self, seg.name).detach()
            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if local.numel() == 0:
                continue
            if len(seg.shape) == 2:
                pieces.append((local, (seg.start + offset[0], offset[1])))
            else:
                for i in range(shape[0]):
                    row = seg.start + (offset[0] + i) * seg.shape[1] + offset[1]
                    pieces.append((local[i], (row, offset[2])))
        return pieces

    @property
    def weight(self) -> DTensor:
        """The official ``(d_in_proj, d_model)`` weight as a checkpoint view: a DTensor whose local
        part is this rank's segment shards (views of the parameters). DCP saves and loads through it;
        it is not for computing, and cannot be gathered (:meth:`full_weight` gathers)."""
        first = getattr(self, self.segments[0].name)
        pieces = self._pieces()
        local = _OfficialShards([t for t, _ in pieces], [o for _, o in pieces], self.official_shape,
                                first.to_local())
        mesh = first.device_mesh
        spec = DTensorSpec(mesh, (Shard(0),) * mesh.ndim,
                           tensor_meta=TensorMeta(self.official_shape, (self.official_shape[1], 1), first.dtype))
        return DTensor(local, spec, requires_grad=False)

    def full_weight(self) -> Tensor:
        """The official weight as one plain tensor on every rank (a collective: call it on all ranks)."""
        return torch.cat([getattr(self, s.name).full_tensor().reshape(-1, self.official_shape[1])
                          for s in self.segments])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                                   and "." not in k[len(prefix):])
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if value.shape != self.official_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                              f"checkpoint, the shape in current model is {tuple(self.official_shape)}.")
            return
        with torch.no_grad():
            if isinstance(value, DTensor) and isinstance(value._local_tensor, LocalShardsWrapper):
                # DCP loaded into a view like ours (usually ours: then this copies nothing).
                shards = {tuple(c.offsets): s for s, c in zip(value._local_tensor.local_shards(),
                                                            value._local_tensor.local_chunks)}
                for piece, offset in self._pieces():
                    src = shards.get(offset)
                    if src is None or src.shape != piece.shape:
                        error_msgs.append(f"{key}: the checkpoint view holds no shard at offset {offset}")
                        return
                    if src.data_ptr() != piece.data_ptr():
                        piece.copy_(src)
                return
            if isinstance(value, DTensor):
                value = value.full_tensor()
            for piece, (row, col) in self._pieces():
                piece.copy_(value[row: row + piece.shape[0], col: col + piece.shape[1]])


# ---------------------------------------------------------------------------------------------
# the built-in kinds' plans
# ---------------------------------------------------------------------------------------------
def _mamba3_problems(m: Mamba3, tp: int) -> list[Problem]:
    """(spec field, value, reason) for each thing that keeps ``m`` from being sharded over ``tp`` ranks."""
    out = []
    if m.nheads % tp:
        out.append(("headdim", m.headdim,
                    f"gives {m.nheads} heads (expand·d_model/headdim), not a multiple of tp={tp}"))
    elif m.ngroups % tp and tp % m.ngroups:
        out.append(("ngroups", m.ngroups, f"must divide or be a multiple of tp={tp} (each rank's heads must read "
                                          f"whole B/C groups)"))
    if m.conv_kernel:
        out.append(("conv_kernel", m.conv_kernel, "the short convolution has no tensor-parallel plan; use 0"))
    if m.out_norm.endswith("_default"):
        out.append(("out_norm", m.out_norm, "a whole-width norm would need an all-reduce across TP ranks inside "
                                            "the scan; use pregate_grouped, postgate_grouped or none"))
    return out


def _mamba3_in_proj(sharded: ShardedBlock, mesh: DeviceMesh) -> None:
    """Replace the fused in_proj by :class:`HeadShardedInProj`, its segments from the layout."""
    m = sharded.template
    tp = mesh.size()
    layout = m.in_proj_layout()
    G, N, R = layout.ngroups, layout.d_state, layout.rank
    if G % tp == 0:  # whole groups per rank
        bc_placement, columns = Shard(1), None
    else:  # tp % G == 0: every rank's heads read one group; keep B/C whole, use that group's rows
        group = mesh.get_local_rank() // (tp // G)
        bc_placement, columns = Replicate(), (group * N, (group + 1) * N)
    segments = []
    for name, (start, width) in layout.offsets().items():
        if name in ("B", "C"):
            segments.append(_Segment(f"{name}_weight", start, (R, G * N, m.d_model), bc_placement, columns))
        else:  # the angle rates are shared by all heads
            segments.append(_Segment(f"{name}_weight", start, (width, m.d_model),
                                     Replicate() if name == "angle" else Shard(0)))
    sharded.in_proj = HeadShardedInProj(sharded.in_proj.weight, segments, mesh)


def _attention_problems(a: Attention, tp: int) -> list[Problem]:
    if a.n_kv_heads % tp:
        return [("n_kv_heads", a.n_kv_heads, f"not a multiple of tp={tp} (with n_kv_heads unset, n_heads is)")]
    return []


def _swiglu_problems(f: SwiGLU, tp: int) -> list[Problem]:
    return [("hidden", f.hidden, f"not a multiple of tp={tp}")] if f.hidden % tp else []


MAMBA3_PLAN = HeadParallelPlan(
    rowwise=("out_proj",),
    # per head; the grouped out-norm's weight too (the *_default norms are rejected)
    sharded=("dt_bias", "D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "norm.weight"),
    check=_mamba3_problems, prepare=_mamba3_in_proj)
ATTENTION_PLAN = HeadParallelPlan(colwise=("wq", "wk", "wv"), rowwise=("wo",), check=_attention_problems)
SWIGLU_PLAN = HeadParallelPlan(colwise=("w1", "w3"), rowwise=("w2",), check=_swiglu_problems)
for _kind, _plan in (("mamba3", MAMBA3_PLAN), ("attention", ATTENTION_PLAN), ("swiglu", SWIGLU_PLAN)):
    register_tp_plan(_kind, _plan)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class _SyncRowwiseParallel(RowwiseParallel):
    """RowwiseParallel whose output collective completes before returning (for the embedding).

    The stock style leaves an AsyncCollectiveTensor; fed from the eager embedding into a compiled
    first block, its backward receives a plain tensor and fails ("'Tensor' object has no attribute
    '_local_tensor'", torch 2.13, gloo + aot_eager/inductor). One collective per step, not per layer."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


class _ReplicatedNorm(SequenceParallel):
    """SequenceParallel's handling of a norm, with the sequence replicated (``sequence_parallel=False``)."""

    def __init__(self):
        super().__init__()
        self.sequence_sharding = (Replicate(),)


def _stream(sequence_parallel: bool) -> Placement:
    """How the residual stream is laid out between blocks."""
    return Shard(1) if sequence_parallel else Replicate()


def tensor_parallel_problems(model: nn.Module, tp: int) -> list[str]:
    """Every reason ``model`` cannot be sharded over ``tp`` ranks, each naming the spec field (empty: OK)."""
    problems: dict[tuple, str] = {}  # a block symbol used by many layers fails once, at its first layer
    for layer, block in zip(model.layers.children(), model.spec.resolve(), strict=True):
        plan = block_kind(block.spec.kind).tp_plan
        if plan is None:
            supported = ", ".join(k for k, kind in registered_kinds().items() if kind.tp_plan is not None)
            problems.setdefault((block.symbol, "kind"),
                                f"layer {block.index} (blocks.{block.symbol}, kind {block.spec.kind!r}) has no "
                                f"tensor-parallel plan (supported: {supported})")
            continue
        for field, value, reason in plan.problems(layer.mixer, tp):
            if field is None:  # a parameter's shape
                where = f"blocks.{block.symbol}"
                problems.setdefault((where, value), f"layer {block.index} ({where}, kind {block.spec.kind!r}): "
                                                    f"{reason}")
                continue
            where = f"blocks.{block.symbol}.{field}" + (" (after overrides)" if block.overridden else "")
            problems.setdefault((where, value), f"{where} = {value!r} at layer {block.index}: {reason}")
    return list(problems.values())


def _raise_problems(problems: list[str], tp: int) -> None:
    if problems:
        raise TensorParallelError(f"tensor parallelism over {tp} ranks cannot shard this model: " + "; ".join(problems))


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool = False,
                          sequence_parallel: bool = True) -> nn.Module:
    """Shard a :class:`~hybridlm.builder.model.hybrid_lm.HybridLM` over the 1-D mesh ``tp_mesh``, in place.

    Call it before activation checkpointing, ``torch.compile`` and FSDP (torchtitan's llama3 order),
    on the meta device or on materialized weights (those of rank 0 are broadcast). With
    ``loss_parallel`` the logits are a vocabulary-sharded DTensor (compute the loss under
    ``loss_parallel()``); else they are gathered. Raises :class:`TensorParallelError`, before changing
    anything, if some layer cannot be sharded. Returns ``model``.
    """
    if tp_mesh.ndim != 1:
        raise TensorParallelError(f"apply_tensor_parallel needs a 1-D tensor-parallel mesh; got {tp_mesh.ndim}-D "
                                  f"(pass the 'tp' sub-mesh)")
    if getattr(model, "tp_size", None):
        raise TensorParallelError(f"this model is already sharded over {model.tp_size} tensor-parallel ranks")
    tp = tp_mesh.size()
    _raise_problems(tensor_parallel_problems(model, tp), tp)
    stream = _stream(sequence_parallel)
    norm_style = SequenceParallel if sequence_parallel else _ReplicatedNorm
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": _SyncRowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "norm": norm_style(),
        "output": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    })
    for layer, block in zip(model.layers.children(), model.spec.resolve(), strict=True):
        parallelize_module(layer.norm, tp_mesh, norm_style())
        layer.mixer = block_kind(block.spec.kind).tp_plan.shard(layer.mixer, tp_mesh, stream)
    model.tie_weights()  # a tied head shares the embedding's Shard(0) weight again
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise AssertionError(f"the tensor-parallel plan left parameters unsharded: {plain}")
    if sequence_parallel:
        model.tok_embeddings.register_forward_pre_hook(_sequence_divisible_by(tp))
    model.tp_size = tp
    return model


def _sequence_divisible_by(tp: int):
    def check(module: nn.Module, args) -> None:
        length = args[0].shape[-1]
        if length % tp:
            raise TensorParallelError(f"sequence parallelism over {tp} ranks needs a sequence length divisible "
                                      f"by {tp}; got {length} (set training.seq_len accordingly, or pass "
                                      f"sequence_parallel=False)")
    return check
