"""Tensor parallelism for HybridLM: attention, SwiGLU and the Mamba-3 mixer sharded by heads.

Plain ``torch.distributed.tensor`` (no torchtitan), so it runs and is tested without the trainer.
The plan follows torchtitan's llama3 (Megatron-style TP with sequence parallelism) and extends it
to Mamba-3:

* ``tok_embeddings``: vocabulary-sharded (``RowwiseParallel``); its output is sequence-sharded
  (``Shard(1)``) with sequence parallelism, else replicated. ``norm``: ``SequenceParallel``.
  ``output``: vocabulary-sharded (``ColwiseParallel``); logits are gathered, or stay
  vocabulary-sharded DTensors with ``loss_parallel`` (compute the loss under
  ``torch.distributed.tensor.parallel.loss_parallel()``). A tied head shares the embedding's
  ``Shard(0)`` weight.
* every residual block: its RMSNorm runs on sequence shards; the mixer gathers the sequence
  (``Shard(1) -> Replicate``), computes this rank's heads, and its output projection is row-parallel,
  reduce-scattering back to sequence shards (with ``sequence_parallel=False`` the stream stays
  replicated and the row-parallel output is all-reduced).
* attention: ``wq``/``wk``/``wv`` column-parallel by heads (``n_kv_heads % tp == 0``), ``wo``
  row-parallel; ``q_norm``/``k_norm`` run on the local heads with a replicated weight.
* SwiGLU: ``w1``/``w3`` column-parallel, ``w2`` row-parallel (``hidden % tp == 0``).
* Mamba-3 (:class:`Mamba3HeadParallel`): the fused ``in_proj`` becomes
  :class:`HeadShardedInProj`, one parameter per segment of the official layout (docs/mamba3.md §1.3):
  ``z``, ``x``, ``dt``, ``A``, ``trap`` rows sharded by heads (``Shard(0)``); ``B``/``C`` (rank, group,
  state) sharded by groups when ``ngroups % tp == 0``, else replicated (each rank reads the group of
  its heads: ``tp % ngroups == 0``); the angle rates, shared by all heads, replicated. One local
  matmul computes the rank's ``[z, x, B, C, dt, A, trap, angle]`` in the order the mixer splits.
  ``dt_bias``, ``D``, ``B_bias``, ``C_bias``, ``mimo_x/z/o`` and the grouped out-norm weight are
  ``Shard(0)`` by heads; ``B_norm``/``C_norm`` replicated; ``out_proj`` row-parallel. The mixer's
  ``nheads``, ``ngroups``, ``d_inner``, ``bc_width`` and ``split_sizes`` become this rank's counts,
  so its forward (and the scan kernels) run unchanged on local heads.

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
without a plan, and a 2-D mesh. With sequence parallelism the sequence length must be a multiple
of the TP degree (checked at the first forward). Decoding (KV / SSM caches) under TP is untested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from hybridlm.blocks import RMSNorm
from hybridlm.blocks.attention import Attention
from hybridlm.blocks.mamba3 import Mamba3
from hybridlm.blocks.swiglu import SwiGLU
from hybridlm.errors import HybridLMError
from hybridlm.kernels.norms import rms_norm

__all__ = [
    "TensorParallelError",
    "apply_tensor_parallel",
    "tensor_parallel_problems",
    "Mamba3HeadParallel",
    "AttentionHeadParallel",
    "SwiGLUParallel",
    "HeadShardedInProj",
    "HeadLocalRMSNorm",
]


class TensorParallelError(HybridLMError):
    """A model (or input) that the tensor-parallel plan cannot shard; the message names what to change."""


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _mamba3_problems(m: Mamba3, tp: int) -> list[tuple[str, object, str]]:
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


def _attention_problems(a: Attention, tp: int) -> list[tuple[str, object, str]]:
    if a.n_kv_heads % tp:
        return [("n_kv_heads", a.n_kv_heads, f"not a multiple of tp={tp} (with n_kv_heads unset, n_heads is)")]
    return []


def _swiglu_problems(f: SwiGLU, tp: int) -> list[tuple[str, object, str]]:
    return [("hidden", f.hidden, f"not a multiple of tp={tp}")] if f.hidden % tp else []


_PROBLEMS = {Mamba3: _mamba3_problems, Attention: _attention_problems, SwiGLU: _swiglu_problems}


def tensor_parallel_problems(model: nn.Module, tp: int) -> list[str]:
    """Every reason ``model`` cannot be sharded over ``tp`` ranks, each naming the spec field (empty: OK)."""
    problems: dict[tuple, str] = {}  # a block symbol used by many layers fails once, at its first layer
    for layer, block in zip(model.layers.children(), model.spec.resolve(), strict=True):
        check = _PROBLEMS.get(type(layer.mixer))
        if check is None:
            problems.setdefault((block.symbol, "kind"),
                                f"layer {block.index} (blocks.{block.symbol}, kind {block.spec.kind!r}) has no "
                                f"tensor-parallel plan (supported: mamba3, attention, swiglu)")
            continue
        for field, value, reason in check(layer.mixer, tp):
            where = f"blocks.{block.symbol}.{field}" + (" (after overrides)" if block.overridden else "")
            problems.setdefault((where, value), f"{where} = {value!r} at layer {block.index}: {reason}")
    return list(problems.values())


def _raise_problems(problems: list[str], tp: int) -> None:
    if problems:
        raise TensorParallelError(f"tensor parallelism over {tp} ranks cannot shard this model: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# local computation with head-sharded parameters
# ---------------------------------------------------------------------------------------------
def _head_local(p: DTensor) -> Tensor:
    """This rank's tensor of ``p`` for computing with its own heads.

    A replicated parameter contributes to the loss only through this rank's heads here, so its
    gradient on this rank is a partial sum (``Partial``); a sharded one gets its shard's gradient."""
    return p.to_local(grad_placements=[Partial() if pl.is_replicate() else pl for pl in p.placements])


def _distributed_param(p: nn.Parameter, mesh: DeviceMesh, placement: Placement) -> nn.Parameter:
    new = nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]), requires_grad=p.requires_grad)
    for flag in ("_no_weight_decay",):  # the official optimizer flags survive sharding
        if hasattr(p, flag):
            setattr(new, flag, getattr(p, flag))
    return new


class HeadLocalRMSNorm(RMSNorm):
    """RMSNorm over a head-local tensor (this rank's query/key heads, Mamba-3 B/C groups) with a
    replicated weight; same parameter name (``weight``) as the module it replaces."""

    @classmethod
    def replacing(cls, norm: RMSNorm, mesh: DeviceMesh) -> "HeadLocalRMSNorm":
        new = cls(norm.weight.shape[0], eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        new.weight = _distributed_param(norm.weight, mesh, Replicate())
        return new

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, _head_local(self.weight), self.eps)


# ---------------------------------------------------------------------------------------------
# the fused in_proj, one parameter per segment
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
    or replicated; see the module docstring. Output: this rank's ``[z, x, B, C, dt, A, trap, angle]``."""

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

    def forward(self, u: Tensor) -> Tensor:
        if not isinstance(u, DTensor):
            raise TensorParallelError("HeadShardedInProj expects the mixer input as a DTensor (the Mamba-3 "
                                      "mixer's tensor-parallel input hook makes it one)")
        # Every rank multiplies the whole sequence; its gradient here covers this rank's heads only.
        if u.placements != (Replicate(),):
            u = u.redistribute(placements=[Replicate()])
        u = u.to_local(grad_placements=[Partial()])
        weights = []
        for seg in self.segments:
            w = _head_local(getattr(self, seg.name))
            if seg.columns is not None:
                w = w[:, seg.columns[0]: seg.columns[1]]
            weights.append(w.reshape(-1, w.shape[-1]))
        return F.linear(u, torch.cat(weights))

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
# per-block styles
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


class _MixerParallel(ParallelStyle):
    """A mixer sharded by heads: validated first, then sharded by ``_shard``; its input is gathered
    from the residual stream's layout to a replicated DTensor (``Shard(1) -> Replicate``), and its
    row-parallel output goes back to the stream's layout."""

    mixer_type: type  # set by each subclass, with problems(module, tp) -> [(field, value, reason)]

    def __init__(self, *, sequence_parallel: bool = True):
        super().__init__()
        self.stream = _stream(sequence_parallel)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, self.mixer_type):
            raise TensorParallelError(f"{type(self).__name__} applies to {self.mixer_type.__name__}, "
                                      f"not {type(module).__name__}")
        tp = device_mesh.size()
        _raise_problems([f"{f} = {v!r}: {r}" for f, v, r in self.problems(module, tp)], tp)
        self._shard(module, device_mesh)
        module.tp_size = tp
        return parallelize_module(module, device_mesh, PrepareModuleInput(
            input_layouts=(self.stream,), desired_input_layouts=(Replicate(),)))

    def _shard(self, module: nn.Module, mesh: DeviceMesh) -> None:
        raise NotImplementedError


class Mamba3HeadParallel(_MixerParallel):
    """Shard a :class:`~hybridlm.blocks.Mamba3` mixer by heads (see the module docstring)."""

    mixer_type = Mamba3
    problems = staticmethod(_mamba3_problems)

    def _shard(self, m: Mamba3, mesh: DeviceMesh) -> None:
        tp = mesh.size()
        H, G, R, N, P, S = m.nheads, m.ngroups, m.mimo_rank, m.d_state, m.headdim, m.num_rope_angles
        if G % tp == 0:  # whole groups per rank
            G_local, bc_placement, columns = G // tp, Shard(1), None
        else:  # tp % G == 0: every rank's heads read one group; keep B/C whole, use that group's rows
            group = mesh.get_local_rank() // (tp // G)
            G_local, bc_placement, columns = 1, Replicate(), (group * N, (group + 1) * N)

        names = ["z", "x", "B", "C", "dt", "A"] + (["trap"] if m.discretization == "trapezoid" else [])
        names += ["angle"] if S else []
        shapes = {"z": (H * P, m.d_model), "x": (H * P, m.d_model), "B": (R, G * N, m.d_model),
                  "C": (R, G * N, m.d_model), "dt": (H, m.d_model), "A": (H, m.d_model),
                  "trap": (H, m.d_model), "angle": (S, m.d_model)}
        segments, start = [], 0
        for name, size in zip(names, m.split_sizes, strict=True):
            if name in ("B", "C"):
                seg = _Segment(f"{name}_weight", start, shapes[name], bc_placement, columns)
            else:
                seg = _Segment(f"{name}_weight", start, shapes[name], Replicate() if name == "angle" else Shard(0))
            if seg.rows != size:
                raise AssertionError(f"in_proj segment {name}: {seg.rows} rows, the mixer splits {size}")
            segments.append(seg)
            start += size
        m.in_proj = HeadShardedInProj(m.in_proj.weight, segments, mesh)

        per_head = ["dt_bias", "D"] + (["B_bias", "C_bias"] if m.bc_bias else [])
        per_head += ["mimo_x", "mimo_z", "mimo_o"] if m.is_mimo else []
        for name in per_head:
            m.register_parameter(name, _distributed_param(getattr(m, name), mesh, Shard(0)))
        if m.out_norm != "none":  # grouped by heads (the *_default norms were rejected)
            m.norm.weight = _distributed_param(m.norm.weight, mesh, Shard(0))
        m.B_norm = HeadLocalRMSNorm.replacing(m.B_norm, mesh)
        m.C_norm = HeadLocalRMSNorm.replacing(m.C_norm, mesh)
        parallelize_module(m.out_proj, mesh, RowwiseParallel(output_layouts=self.stream))

        # From here on the mixer computes this rank's heads.
        m.nheads, m.ngroups, m.d_inner = H // tp, G_local, m.d_inner // tp
        m.bc_width = R * G_local * N
        m.split_sizes = [m.d_inner, m.d_inner, m.bc_width, m.bc_width, m.nheads, m.nheads]
        m.split_sizes += [m.nheads] if m.discretization == "trapezoid" else []
        m.split_sizes += [S] if S else []


class AttentionHeadParallel(_MixerParallel):
    """Shard :class:`~hybridlm.blocks.attention.Attention` by heads: q/k/v column-, o row-parallel."""

    mixer_type = Attention
    problems = staticmethod(_attention_problems)

    def _shard(self, a: Attention, mesh: DeviceMesh) -> None:
        parallelize_module(a, mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
                                     "wo": RowwiseParallel(output_layouts=self.stream)})
        if a.qk_norm:
            a.q_norm = HeadLocalRMSNorm.replacing(a.q_norm, mesh)
            a.k_norm = HeadLocalRMSNorm.replacing(a.k_norm, mesh)
        a.n_heads //= mesh.size()
        a.n_kv_heads //= mesh.size()


class SwiGLUParallel(_MixerParallel):
    """Shard :class:`~hybridlm.blocks.swiglu.SwiGLU`: w1/w3 column-, w2 row-parallel."""

    mixer_type = SwiGLU
    problems = staticmethod(_swiglu_problems)

    def _shard(self, f: SwiGLU, mesh: DeviceMesh) -> None:
        parallelize_module(f, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                     "w2": RowwiseParallel(output_layouts=self.stream)})


_STYLES = {Mamba3: Mamba3HeadParallel, Attention: AttentionHeadParallel, SwiGLU: SwiGLUParallel}


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
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
    for layer in model.layers.children():
        parallelize_module(layer.norm, tp_mesh, norm_style())
        style = _STYLES[type(layer.mixer)](sequence_parallel=sequence_parallel)
        parallelize_module(layer.mixer, tp_mesh, style)
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
