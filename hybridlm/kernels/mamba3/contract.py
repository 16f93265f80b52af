"""What every Mamba-3 kernel and its callers agree on, defined once (docs/mamba3.md §6).

* :class:`InProjLayout`: how one row of the fused ``in_proj`` output splits into named segments.
  The module's split, the decode-step kernels' column offsets, the tensor-parallel shards and the
  checkpoint converters all read it from here.
* :class:`DecodeLayout`: the static configuration of one layer (shapes and switches).
* :class:`DecodeParams`: the layer parameters the decode step reads.
* :class:`ScanParams`: the per-layer parameters and switches the scan and the step read, one
  bundle instead of a dozen keywords.
* :class:`Mamba3State`: the recurrent state of a batch of sequences (the official cache layout).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

PairLayout = Literal["interleaved", "half"]
OutNormKind = Literal["none", "pregate_grouped", "pregate_default", "postgate_grouped", "postgate_default"]


class Mamba3State(NamedTuple):
    """One row per sequence: the cumulative angle, the SSM state, and the last token's rotated,
    biased B (``k``) and raw x (``v``), which the trapezoid rule reads at the next token."""

    angle: Tensor  # (B, H, S)
    ssm: Tensor  # (B, H, P, N)
    k: Tensor  # (B, R, H, N)
    v: Tensor  # (B, H, P)


class InProjLayout(NamedTuple):
    """The columns of ``in_proj``'s output, in order: ``z``, ``x`` (H·P each), ``B``, ``C``
    (R·G·N each, rank-major then group), ``dt``, ``A`` (H each), then ``trap`` (H, trapezoid
    discretization only) and ``angle`` (S rates shared by all heads, when S > 0). This is the
    official module's order, so official checkpoints load unchanged."""

    nheads: int
    headdim: int
    ngroups: int
    rank: int
    d_state: int
    n_angles: int
    has_trap: bool = True

    def segments(self) -> tuple[tuple[str, int], ...]:
        """(name, width) of every segment present, in column order."""
        H, P, W = self.nheads, self.headdim, self.rank * self.ngroups * self.d_state
        out = [("z", H * P), ("x", H * P), ("B", W), ("C", W), ("dt", H), ("A", H)]
        if self.has_trap:
            out.append(("trap", H))
        if self.n_angles:
            out.append(("angle", self.n_angles))
        return tuple(out)

    def split_sizes(self) -> list[int]:
        return [width for _, width in self.segments()]

    @property
    def width(self) -> int:
        return sum(self.split_sizes())

    def offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (first column, width), for the segments present."""
        out, start = {}, 0
        for name, width in self.segments():
            out[name] = (start, width)
            start += width
        return out

    def split(self, row: Tensor) -> dict[str, Tensor]:
        """The segments of ``row`` (..., width) by name, as views."""
        names = [name for name, _ in self.segments()]
        return dict(zip(names, torch.split(row, self.split_sizes(), dim=-1)))

    def offset(self, name: str) -> int:
        """First column of segment ``name``; a segment the layer lacks starts where the row ends
        (a kernel never reads it)."""
        return self.offsets().get(name, (self.width, 0))[0]


class DecodeLayout(NamedTuple):
    """The static configuration of one layer's step: its shapes and spec switches (hashable, so a
    compiled kernel can be cached per layout)."""

    nheads: int
    headdim: int
    ngroups: int
    rank: int
    d_state: int
    n_angles: int
    discretization: str = "trapezoid"
    a_activation: str = "heavy_tail"
    A_floor: float = 1e-4
    out_norm: OutNormKind = "none"
    norm_eps: float = 1e-5
    bc_norm_eps: float = 1e-5
    pair_layout: PairLayout = "interleaved"

    @property
    def in_proj(self) -> InProjLayout:
        return InProjLayout(self.nheads, self.headdim, self.ngroups, self.rank, self.d_state, self.n_angles,
                            self.discretization == "trapezoid")

    def split_sizes(self) -> list[int]:
        return self.in_proj.split_sizes()


class DecodeParams(NamedTuple):
    """The layer's parameters the step reads (shapes as the module's, docs/mamba3.md §1.2)."""

    dt_bias: Tensor  # (H,)
    B_norm: Tensor  # (N,)
    C_norm: Tensor  # (N,)
    D: Tensor  # (H,)
    B_bias: Tensor | None = None  # (H, R, N)
    C_bias: Tensor | None = None
    mimo_x: Tensor | None = None  # (H, R, P)
    mimo_z: Tensor | None = None
    mimo_o: Tensor | None = None
    norm_weight: Tensor | None = None  # (H·P,)


class ScanParams(NamedTuple):
    """What the scan and the step read besides the per-token inputs: the C and B biases
    (``q_bias``/``k_bias``, (H, R, N)), the D skip (H,), the MIMO vectors (H, R, P), the output
    norm's weight (H·P,) and kind, and how rotated pairs are laid out."""

    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    D: Tensor | None = None
    mimo_x: Tensor | None = None
    mimo_z: Tensor | None = None
    mimo_o: Tensor | None = None
    norm_weight: Tensor | None = None
    out_norm: OutNormKind = "none"
    norm_eps: float = 1e-5
    pair_layout: PairLayout = "interleaved"

    @classmethod
    def from_decode(cls, params: DecodeParams, layout: DecodeLayout) -> "ScanParams":
        return cls(q_bias=params.C_bias, k_bias=params.B_bias, D=params.D, mimo_x=params.mimo_x,
                   mimo_z=params.mimo_z, mimo_o=params.mimo_o, norm_weight=params.norm_weight,
                   out_norm=layout.out_norm, norm_eps=layout.norm_eps, pair_layout=layout.pair_layout)
