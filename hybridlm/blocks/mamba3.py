"""The Mamba-3 mixer, parameter-compatible with the official ``mamba_ssm`` module.

Parameter names, shapes and dtypes follow docs/mamba3.md §1.2, so an official state_dict loads with
``strict=True``. The spec switches beyond the official module (``a_activation``,
``discretization``, ``rotation``, ``bc_bias``, ``conv_kernel``, ``out_norm``) only add or drop
slices of ``in_proj`` and small parameters when they are set away from the official defaults.

The module knows nothing of parallelism: each call reads its head and group counts from the
parameters' shapes (:meth:`Mamba3.in_proj_layout`), so hybridlm/titan/tensor_parallel.py runs this
same code on one rank's heads by passing that rank's tensors (``torch.func.functional_call``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm.blocks.norms import RMSNorm
from hybridlm.blocks.projection import project
from hybridlm.errors import ShapeError
from hybridlm.kernels import decode_gemv, dispatch
from hybridlm.kernels.mamba3.contract import (DecodeLayout, DecodeParams, InProjLayout, Mamba3State,
                                             ScanParams)
from hybridlm.kernels.mamba3.shared import causal_conv1d
from hybridlm.kernels.norms import upcast
from hybridlm.layouts.blocks import mamba3_problems, mamba3_rope_angles


@dataclass
class Mamba3Cache:
    """Decode state of one Mamba-3 layer, updated in place (official cache layout, docs/mamba3.md §4.1)."""

    angle: Tensor  # (B, H, S) fp32
    ssm: Tensor  # (B, H, P, N) fp32
    k: Tensor  # (B, R, H, N)
    v: Tensor  # (B, H, P)
    conv: Tensor | None = None  # (B, K-1, conv channels) when the layer has a short conv

    @property
    def state(self) -> Mamba3State:
        return Mamba3State(self.angle, self.ssm, self.k, self.v)

    def update(self, state: Mamba3State, conv: Tensor | None = None) -> None:
        for dst, src in zip(self.state, state):
            dst.copy_(src.detach())
        if conv is not None:
            self.conv.copy_(conv.detach())

    def rows(self, start: int, stop: int) -> "Mamba3Cache":
        """Rows ``start:stop``, views of this cache's tensors (updated in place through them)."""
        return Mamba3Cache(*(t[start:stop] if t is not None else None
                             for t in (getattr(self, f.name) for f in fields(self))))

    def zero_(self) -> "Mamba3Cache":
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                t.zero_()
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if (t := getattr(self, f.name)) is not None)


class Mamba3(nn.Module):
    """Mamba-3 mixer: (batch, seq, d_model) -> (batch, seq, d_model), or packed with ``cu_seqlens``.

    Every keyword of the official constructor is accepted under its name (``dropout``,
    ``fuse_pregate_headwise_norm``, ``n_layer`` and ``layer_idx`` change nothing, as there), plus the
    spec's switches after ``*``. Unlike the official module there is no ``**kwargs``: a misspelt
    keyword is a ``TypeError``, not a silently default layer."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        fuse_pregate_headwise_norm: bool = True,  # official kernel-fusion switch; same math
        chunk_size: int = 64,
        dropout: float = 0.0,  # accepted and ignored, as in the official module
        layer_idx: int | None = None,
        n_layer: int | None = None,  # accepted and ignored, as in the official module
        device=None,
        dtype=None,
        *,
        a_activation: Literal["heavy_tail", "softplus"] = "heavy_tail",
        discretization: Literal["trapezoid", "euler", "half"] = "trapezoid",
        rotation: bool = True,
        bc_bias: bool = True,
        conv_kernel: int = 0,
        out_norm: str | None = None,
        norm_eps: float = 1e-5,
        backend: str | None = None,
    ):
        super().__init__()
        if out_norm is None:
            out_norm = "pregate_grouped" if is_outproj_norm else "none"
        elif is_outproj_norm and out_norm != "pregate_grouped":
            raise ValueError(f"is_outproj_norm=True means out_norm='pregate_grouped'; got out_norm={out_norm!r}")
        config = dict(d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups, rope_fraction=rope_fraction,
                      rotation=rotation, dt_min=dt_min, dt_max=dt_max, a_activation=a_activation,
                      discretization=discretization, out_norm=out_norm)
        # the rules of the spec (hybridlm/layouts/blocks.py), so a layer built by hand obeys them too
        problems = [f"{field}={config[field]!r} {reason}" for field, reason in mamba3_problems(d_model, **config)]
        if problems:
            raise ValueError(f"Mamba3(d_model={d_model}): " + "; ".join(problems))
        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.rope_fraction = rope_fraction
        # the whole layer's sizes (a tensor-parallel rank computes fewer heads: see in_proj_layout)
        self.d_inner = int(expand * d_model)
        self.nheads = self.d_inner // headdim
        self.is_mimo = is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.pair_layout = "half" if is_mimo else "interleaved"
        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.num_rope_angles = mamba3_rope_angles(d_state, rope_fraction, rotation)
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_floor = dt_min, dt_max, dt_init_floor, A_floor
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.a_activation = a_activation
        self.discretization = discretization
        self.rotation = rotation
        self.bc_bias = bc_bias
        self.conv_kernel = conv_kernel
        self.out_norm = out_norm
        self.is_outproj_norm = out_norm == "pregate_grouped"
        self.norm_eps = norm_eps
        self.backend = backend
        self.gemv_backend: str | None = None  # decode_gemv's, for normed_forward (None: the separate norm, measured faster)

        H, R, G, N, P = self.nheads, self.mimo_rank, ngroups, d_state, headdim
        layout = InProjLayout(H, P, G, R, N, self.num_rope_angles, discretization == "trapezoid")
        factory = {"device": device, "dtype": dtype}
        fp32 = {"device": device, "dtype": torch.float32}
        self.in_proj = nn.Linear(d_model, layout.width, bias=False, **factory)
        if conv_kernel:
            conv_dim = self._conv_channels(layout)
            self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, padding=0, **factory)
        self.dt_bias = nn.Parameter(torch.empty(H, **fp32))
        self.dt_bias._no_weight_decay = True
        if bc_bias:
            self.B_bias = nn.Parameter(torch.empty(H, R, N, **fp32))
            self.C_bias = nn.Parameter(torch.empty(H, R, N, **fp32))
        self.B_norm = RMSNorm(N, eps=1e-5, **factory)
        self.C_norm = RMSNorm(N, eps=1e-5, **factory)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, R, P, **fp32))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P, **fp32))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P, **fp32))
        self.D = nn.Parameter(torch.empty(H, **fp32))
        self.D._no_weight_decay = True
        if out_norm != "none":
            self.norm = RMSNorm(self.d_inner, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- init --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official init (docs/mamba3.md §1.2)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        if self.conv_kernel:
            self.conv1d.reset_parameters()
        u = torch.rand_like(self.dt_bias, dtype=torch.float32)  # a DTensor when sharded: copy_ below stays legal
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if self.bc_bias:
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
        self.B_norm.reset_parameters()
        self.C_norm.reset_parameters()
        if self.is_mimo:
            self.mimo_x.fill_(1.0 / self.mimo_rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.mimo_rank)
        self.D.fill_(1.0)
        if self.out_norm != "none":
            self.norm.reset_parameters()

    # -- sizes -------------------------------------------------------------------------------------
    def in_proj_layout(self) -> InProjLayout:
        """The in_proj layout of the heads this module computes, read from the parameters' shapes:
        H from ``D`` (H,), the B/C groups from what is left of ``in_proj``'s rows (docs/mamba3.md §1.3).
        The whole layer, or one tensor-parallel rank's heads and groups when it is called with that
        rank's tensors."""
        R, N, S, trap = self.mimo_rank, self.d_state, self.num_rope_angles, self.discretization == "trapezoid"
        H = self.D.shape[0]
        without_bc = InProjLayout(H, self.headdim, 0, R, N, S, trap).width
        groups, rest = divmod(self.in_proj.weight.shape[0] - without_bc, 2 * R * N)
        if rest or groups < 1:
            raise ShapeError(f"in_proj has {self.in_proj.weight.shape[0]} rows, which no group count fits "
                             f"with {H} heads (docs/mamba3.md §1.3)")
        return InProjLayout(H, self.headdim, groups, R, N, S, trap)

    @staticmethod
    def _conv_channels(layout: InProjLayout) -> int:
        """Channels of the short conv: x, B and C."""
        return sum(width for name, width in layout.segments() if name in ("x", "B", "C"))

    @property
    def split_sizes(self) -> list[int]:
        return self.in_proj_layout().split_sizes()

    # -- projections -------------------------------------------------------------------------------
    def _project(self, u: Tensor, cu_seqlens: Tensor | None, conv_state: Tensor | None):
        """in_proj and the per-token scalars. u (B, L, d) -> kernel inputs (+ the new conv state)."""
        layout = self.in_proj_layout()
        H, R, P = layout.nheads, layout.rank, layout.headdim
        seg = layout.split(self.in_proj(u))
        z, x, b, c, angle = seg["z"], seg["x"], seg["B"], seg["C"], seg.get("angle")
        new_conv = None
        if self.conv_kernel:
            xbc = torch.cat([x, b, c], dim=-1)
            xbc, new_conv = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                          initial_state=conv_state, cu_seqlens=cu_seqlens, return_final_state=True)
            x, b, c = torch.split(F.silu(xbc), [x.shape[-1], b.shape[-1], c.shape[-1]], dim=-1)
        q, k, dt, adt, lam = dispatch.mamba3_inputs(
            b, c, seg["dt"], seg["A"], seg.get("trap"), self.dt_bias, self.B_norm.weight, self.C_norm.weight,
            rank=R, a_activation=self.a_activation, A_floor=self.A_floor, discretization=self.discretization,
            b_eps=self.B_norm.eps, c_eps=self.C_norm.eps, backend=self.backend)
        return dict(
            q=q, k=k, x=x.unflatten(-1, (H, P)), dt=dt, adt=adt, lam=lam,
            angle_rate=None if angle is None else upcast(angle),
        ), z.unflatten(-1, (H, P)), new_conv

    def scan_params(self) -> ScanParams:
        return ScanParams(
            q_bias=self.C_bias if self.bc_bias else None,
            k_bias=self.B_bias if self.bc_bias else None,
            D=self.D,
            mimo_x=self.mimo_x if self.is_mimo else None,
            mimo_z=self.mimo_z if self.is_mimo else None,
            mimo_o=self.mimo_o if self.is_mimo else None,
            norm_weight=self.norm.weight if self.out_norm != "none" else None,
            out_norm=self.out_norm,
            norm_eps=self.norm_eps,
            pair_layout=self.pair_layout,
        )

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        u: Tensor,
        cu_seqlens: Tensor | None = None,
        *,
        cache: Mamba3Cache | None = None,
        initial_state: Mamba3State | None = None,
        return_final_state: bool = False,
        seq_idx: Tensor | None = None,  # accepted and ignored, as by the official module
    ):
        """u (B, L, d_model), or (1, T, d_model) packed with ``cu_seqlens`` (NS+1 offsets), or
        (B, L, d_model) rows of packed documents with ``cu_seqlens`` over the flattened B·L tokens.

        ``cache``: start from it and write the final state back into it (decode / chunked prefill).
        ``initial_state`` / ``return_final_state``: the same, functionally and differentiably.
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ShapeError(f"Mamba3 expects (batch, seq, {self.d_model}); got {tuple(u.shape)}")
        if cu_seqlens is not None and u.shape[0] > 1:  # rows of packed documents: scan them flattened
            if cache is not None:
                raise ShapeError("packed input with a cache must be (1, total); got several rows")
            result = self.forward(u.reshape(1, -1, self.d_model), cu_seqlens, initial_state=initial_state,
                                  return_final_state=return_final_state)
            out = result[0] if return_final_state else result
            out = out.view(u.shape)
            return (out, result[1]) if return_final_state else out
        if self._takes_decode_step(u, cu_seqlens, cache) and not return_final_state and initial_state is None:
            return self._decode_step(u, cache)
        conv_state = None
        if cache is not None:
            if initial_state is not None:
                raise ValueError("pass either cache or initial_state, not both")
            initial_state, conv_state = cache.state, cache.conv
        inputs, z, new_conv = self._project(u, cu_seqlens, conv_state)
        want_state = return_final_state or cache is not None
        if u.shape[1] == 1 and cu_seqlens is None and initial_state is not None:
            y, state = dispatch.mamba3_step(
                *(t[:, 0] if t is not None else None for t in inputs.values()), initial_state, self.scan_params(),
                z=z[:, 0], backend=self.backend)
            y = y.unsqueeze(1)
        else:
            result = dispatch.mamba3_scan(
                *inputs.values(), self.scan_params(), z=z, initial_state=initial_state, cu_seqlens=cu_seqlens,
                chunk_size=self.chunk_size, return_final_state=want_state, backend=self.backend)
            y, state = result if want_state else (result, None)
        out = self.out_proj(y.flatten(-2).to(self.out_proj.weight.dtype))
        if cache is not None:
            cache.update(state, new_conv)
        if return_final_state:
            return out, state
        return out

    # -- decode ------------------------------------------------------------------------------------
    def decode_layout(self) -> DecodeLayout:
        layout = self.in_proj_layout()
        return DecodeLayout(
            nheads=layout.nheads, headdim=self.headdim, ngroups=layout.ngroups, rank=self.mimo_rank,
            d_state=self.d_state, n_angles=self.num_rope_angles, discretization=self.discretization,
            a_activation=self.a_activation, A_floor=self.A_floor, out_norm=self.out_norm, norm_eps=self.norm_eps,
            bc_norm_eps=self.B_norm.eps, pair_layout=self.pair_layout)

    def decode_params(self) -> DecodeParams:
        p = self.scan_params()
        return DecodeParams(
            dt_bias=self.dt_bias, B_norm=self.B_norm.weight, C_norm=self.C_norm.weight, D=p.D,
            B_bias=p.k_bias, C_bias=p.q_bias, mimo_x=p.mimo_x, mimo_z=p.mimo_z, mimo_o=p.mimo_o,
            norm_weight=p.norm_weight)

    def _takes_decode_step(self, u: Tensor, cu_seqlens: Tensor | None, cache: Mamba3Cache | None) -> bool:
        return cache is not None and u.shape[1] == 1 and cu_seqlens is None and not self.conv_kernel

    def _decode_step(self, u: Tensor, cache: Mamba3Cache) -> Tensor:
        """One token through the fused step (in_proj -> step kernel -> out_proj), the cache in place.
        in_proj is cuBLAS's unless ``decode_gemv.PLAIN_IN_PROJ`` sends it to the GEMV kernel (its PDL chain)."""
        if decode_gemv.PLAIN_IN_PROJ:
            return self._step_projected(decode_gemv.linear(u[:, 0], self.in_proj.weight, backend=self.gemv_backend
                                                           or "auto"), cache)
        return self._step_projected(self.in_proj(u[:, 0]), cache)

    def _step_projected(self, zxbc: Tensor, cache: Mamba3Cache) -> Tensor:
        o = dispatch.mamba3_decode_step(zxbc, cache.state, self.decode_params(), self.decode_layout(),
                                        backend=self.backend)
        return project(self.out_proj, o.to(self.out_proj.weight.dtype), self.gemv_backend).unsqueeze(1)

    def normed_forward(self, h: Tensor, residual: Tensor | None, norm: RMSNorm, cu_seqlens: Tensor | None = None,
                       *, cache: Mamba3Cache | None = None) -> tuple[Tensor, Tensor] | None:
        """A decode step with the block boundary in front of it (``norm`` of h + residual) and in_proj
        as one op (:mod:`hybridlm.kernels.decode_gemv`): (output, stream). None where this input
        takes the separate norm (not a decode step, autograd, or no kernel for it).

        Only when ``gemv_backend`` names a backend or ``decode_gemv.NORM_IN_PROJ`` is set: by default the separate fused norm and
        cuBLAS's in_proj run instead, the faster pair on an H200 (2026-12-03, ``benchmarks/gemv.py``,
        mamba3-1.5b's 2048 -> 8672 at batch 1: 12.8 µs against the kernel's best config 17.8 µs; its
        271 column blocks of 32 fill 132 SMs in 2.05 waves)."""
        if self.gemv_backend is None and not decode_gemv.NORM_IN_PROJ:
            return None
        if torch.is_grad_enabled() or not self._takes_decode_step(h, cu_seqlens, cache):
            return None
        row = None if residual is None else residual[:, 0]
        if decode_gemv.backend_for("norm_gemv", h[:, 0], row, norm.weight, self.in_proj.weight,
                                   backend=self.gemv_backend) == "reference":
            return None
        zxbc, stream = decode_gemv.norm_gemv(h[:, 0], row, norm.weight, norm.eps, self.in_proj.weight,
                                             backend=self.gemv_backend)
        return self._step_projected(zxbc, cache), stream.unsqueeze(1)

    # -- decode (official API) ---------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_seqlen: int = 0, device=None, dtype=None) -> Mamba3Cache:
        """A zero state: fp32 angle and SSM state; k and v in the module dtype (as the official cache)."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        layout = self.in_proj_layout()
        H, R, N, P, S = layout.nheads, self.mimo_rank, self.d_state, self.headdim, self.num_rope_angles
        conv = None
        if self.conv_kernel:
            conv = torch.zeros(batch_size, self.conv_kernel - 1, self._conv_channels(layout),
                               device=device, dtype=dtype)
        return Mamba3Cache(
            angle=torch.zeros(batch_size, H, S, device=device, dtype=state_dtype),
            ssm=torch.zeros(batch_size, H, P, N, device=device, dtype=state_dtype),
            k=torch.zeros(batch_size, R, H, N, device=device, dtype=dtype),
            v=torch.zeros(batch_size, H, P, device=device, dtype=dtype),
            conv=conv,
        )

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, device=None, dtype=None, **kwargs):
        """Official signature: returns ``(angle_state, ssm_state, k_state, v_state)``."""
        cache = self.allocate_cache(batch_size, max_seqlen, device=device, dtype=dtype)
        return cache.angle, cache.ssm, cache.k, cache.v

    def step(self, u: Tensor, angle_state: Tensor, ssm_state: Tensor, k_state: Tensor, v_state: Tensor):
        """Official signature: one token ``u (B, d_model)`` (or ``(B, 1, d_model)``); updates the states
        in place and returns ``(out, angle_state, ssm_state, k_state, v_state)``."""
        if self.conv_kernel:
            raise ValueError("this layer has a short conv: use forward(u, cache=layer.allocate_cache(...))")
        squeeze = u.dim() == 2
        cache = Mamba3Cache(angle_state, ssm_state, k_state, v_state)
        out = self.forward(u.unsqueeze(1) if squeeze else u, cache=cache)
        return (out.squeeze(1) if squeeze else out), angle_state, ssm_state, k_state, v_state

    # -- accounting --------------------------------------------------------------------------------
    def state_bytes(self, context: int = 0, dtype: torch.dtype | None = None) -> int:
        """Bytes of decode state per sequence, whatever the ``context`` (fp32 angle/SSM state,
        k/v/conv in ``dtype``)."""
        item = torch.empty((), dtype=dtype or self.in_proj.weight.dtype).element_size()
        layout = self.in_proj_layout()
        H, R, N, P, S = layout.nheads, self.mimo_rank, self.d_state, self.headdim, self.num_rope_angles
        conv = (self.conv_kernel - 1) * self._conv_channels(layout) if self.conv_kernel else 0
        return 4 * (H * S + H * P * N) + item * (R * H * N + H * P + conv)

    def scan_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the chunked scan (matmul-like terms, multiply-add = 2)."""
        H, R, N, P = self.in_proj_layout().nheads, self.mimo_rank, self.d_state, self.headdim
        C = min(self.chunk_size, max(seq_len, 1))
        intra = 2 * C * R * R * N + 2 * C * R * R * P  # q·k scores, then weights·v (half is masked)
        inter = 2 * R * N * P * 2  # chunk state build + state read-out
        return H * (intra // 2 + inter)

    def extra_repr(self) -> str:
        bits = [f"d_model={self.d_model}", f"d_state={self.d_state}", f"headdim={self.headdim}",
                f"nheads={self.nheads}", f"ngroups={self.ngroups}"]
        if self.is_mimo:
            bits.append(f"mimo_rank={self.mimo_rank}")
        bits.append(f"out_norm={self.out_norm}")
        return ", ".join(bits)
