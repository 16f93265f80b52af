"""The control of the state-tracking study: the official ``mamba_ssm`` Mamba3 module as a block kind.

Importing this module registers the kind ``mamba3_official`` (only the study does so): a spec block
``{kind: mamba3_official, d_state: 64, headdim: 16}`` builds ``mamba_ssm.modules.mamba3.Mamba3``
(SISO, its Triton path) behind hybridlm's mixer interface, so it trains through the study's own
loop next to hybridlm's Mamba-3. What had to be adapted (docs/results.md §1, "The control"):

* interface: hybridlm calls ``mixer(x, cu_seqlens=None, cache=None)``, the official module
  ``forward(u, seq_idx=None, cu_seqlens=None, inference_params=None)``; shapes are the same
  (batch, seq, d_model). Decoding is not needed and is refused.
* init: the official module draws ``dt_bias`` in its constructor and leaves ``in_proj`` /
  ``out_proj`` at PyTorch's Linear init. :meth:`reset_parameters` redraws them in the order of
  hybridlm's Mamba-3, so one seed gives both models the same weights (parameter names and shapes
  are the same: docs/mamba3.md §1.2), and the builder then scales ``out_proj`` for both alike.
* A: mamba_ssm 2.3.2 computes A = −softplus(dd_A), clamped at −A_floor: the paper-era map, i.e.
  hybridlm's ``a_activation: softplus`` (later official versions use a heavy-tailed map).
* its Triton SISO kernel casts Q, K, V, the angles, trap and z to bf16 (Δ and A·Δ stay fp32) and
  takes ``headdim`` and ``d_state`` as powers of two (tensor-core tiles: 16 or more), and an even
  number of rotated pairs; :class:`OfficialMamba3Spec` checks these.

Without ``mamba_ssm`` building such a block raises one :class:`StudyError` saying so.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import Field

from hybridlm.builder.model.registry import register_block, registered_kinds
from hybridlm.kernels.mamba3.contract import InProjLayout
from hybridlm.layouts.blocks import BlockSpec, mamba3_problems, mamba3_rope_angles
from hybridlm.studies.config import StudyError

KIND = "mamba3_official"
OFFICIAL_MODULE = "mamba_ssm.modules.mamba3"


class OfficialMamba3Spec(BlockSpec):
    """The official Mamba3 (SISO, no output norm) with the constructor fields the study sets."""

    kind: Literal["mamba3_official"] = "mamba3_official"
    label: ClassVar[str] = "Mamba-3 (official mamba_ssm)"

    d_state: int = Field(128, ge=2)
    expand: int = Field(2, ge=1)
    headdim: int = Field(64, ge=1)
    ngroups: int = Field(1, ge=1)
    rope_fraction: float = 0.5
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, ge=0)
    A_floor: float = Field(1e-4, gt=0)
    chunk_size: int = Field(64, ge=1)

    def problems(self, d_model: int) -> Iterator[tuple[str, str]]:
        yield from mamba3_problems(d_model, d_state=self.d_state, expand=self.expand, headdim=self.headdim,
                                   ngroups=self.ngroups, rope_fraction=self.rope_fraction, rotation=True,
                                   dt_min=self.dt_min, dt_max=self.dt_max, a_activation="softplus",
                                   discretization="trapezoid", out_norm="none")
        for field in ("headdim", "d_state"):
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                yield field, "the official SISO kernel takes powers of two from 16"
        if mamba3_rope_angles(self.d_state, self.rope_fraction) % 2:
            yield "d_state", "the official SISO kernel needs an even number of rotated pairs"

    def describe(self, d_model: int) -> str:
        return f"official Mamba3 d_state={self.d_state} headdim={self.headdim}"


def official_class() -> type[torch.nn.Module]:
    """The official module class, adapted to hybridlm's mixer interface; StudyError when missing."""
    try:
        module = importlib.import_module(OFFICIAL_MODULE)
    except ImportError as err:
        raise StudyError(f"block kind {KIND!r} needs the official mamba_ssm package ({OFFICIAL_MODULE} does not "
                         f"import: {err}); on the GPU machine `source .gpu/setup.sh` puts it on the path") from None
    except Exception as err:  # noqa: BLE001 - mamba_ssm imports the CuTe DSL, which raises RuntimeError
        raise StudyError(f"block kind {KIND!r}: {OFFICIAL_MODULE} fails to import ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); it imports the CuTe DSL, whose libraries a fresh GPU "
                         f"machine gets from a first call that carries .gpu-cute and sources "
                         f".gpu-cute/setup.sh") from None
    return _adapted(module.Mamba3)


def uses_official(model: torch.nn.Module) -> bool:
    return any(resolved.spec.kind == KIND for resolved in model.spec.resolve())


CHOICES_DIR = Path(__file__).resolve().parents[2] / "specs" / "studies" / "state-tracking"


@functools.cache
def pin_official_choices(device_name: str) -> int:
    """Pin the official kernels' autotune choices saved for this GPU
    (``specs/studies/state-tracking/official-autotune-<gpu>.json``), once a process; returns how many
    (0: no file for this GPU, the kernels tune on their first call, under :func:`autotune_turn`).
    2026-12-04: with a fresh Triton cache, one control run tuned for ~6 minutes beside 8 busy runs while
    the other 7 waited for their turn, so the control trained for 1 of a call's 8 minutes."""
    from hybridlm.kernels.official_autotune import gpu_slug, pin_chosen

    path = CHOICES_DIR / f"official-autotune-{gpu_slug(device_name)}.json"
    return pin_chosen(path) if path.exists() else 0


@contextlib.contextmanager
def autotune_turn(folder: Path, wait_seconds: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder/.official-autotune.lock`` (runs side by side share the folder);
    yields whether the turn came within ``wait_seconds`` (None: wait as long as it takes).

    The official kernels autotune 27-81 configs each on their first call, keyed by head sizes and
    dtypes only; 16 processes doing so at once took ~6 minutes before their 20th step on the H200
    (2026-12-03). Under this lock the first process tunes alone and, with TRITON_CACHE_AUTOTUNING=1
    (the study sets it), writes the choices to Triton's disk cache, where the others find them.
    A run waiting in line must still stop at its call's deadline (2026-12-04: runs queued behind the
    lock carried a call past its 10 minutes), hence the bounded wait."""
    folder.mkdir(parents=True, exist_ok=True)
    give_up = None if wait_seconds is None else time.monotonic() + wait_seconds
    with open(folder / ".official-autotune.lock", "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if give_up is not None and time.monotonic() >= give_up:
                    yield False
                    return
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def _adapted(official: type[torch.nn.Module]) -> type[torch.nn.Module]:
    class OfficialMamba3(official):
        """``mamba_ssm``'s Mamba3 behind ``forward(x, cu_seqlens=None, cache=None)``."""

        a_activation = "softplus"  # what mamba_ssm 2.3.2's forward computes (for the diagnostics)
        discretization = "trapezoid"

        def __init__(self, *args, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, **kwargs):
            # kept before the official constructor runs: a constructor may call reset_parameters
            object.__setattr__(self, "_dt_init", (dt_max, dt_min, dt_init_floor))
            super().__init__(*args, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, **kwargs)

        def forward(self, x, cu_seqlens=None, cache=None):  # noqa: D102
            if cache is not None:
                raise StudyError(f"block kind {KIND!r} is for training only: it does not decode")
            return super().forward(x, cu_seqlens=cu_seqlens)

        def in_proj_layout(self) -> InProjLayout:
            return InProjLayout(self.nheads, self.headdim, self.num_bc_heads, self.mimo_rank, self.d_state,
                                self.num_rope_angles, True)

        @torch.no_grad()
        def reset_parameters(self) -> None:
            """hybridlm's Mamba-3 init, draw for draw (hybridlm/blocks/mamba3.py, reset_parameters)."""
            self.in_proj.reset_parameters()
            self.out_proj.reset_parameters()
            dt_max, dt_min, floor = self._dt_init
            u = torch.rand_like(self.dt_bias, dtype=torch.float32)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
            self.B_norm.weight.fill_(1.0)
            self.C_norm.weight.fill_(1.0)
            self.D.fill_(1.0)

    return OfficialMamba3


def build_official(spec: OfficialMamba3Spec, d_model: int, layer_idx: int, **ctx: Any) -> torch.nn.Module:
    cls = official_class()
    return cls(d_model=d_model, d_state=spec.d_state, expand=spec.expand, headdim=spec.headdim,
               ngroups=spec.ngroups, rope_fraction=spec.rope_fraction, dt_min=spec.dt_min, dt_max=spec.dt_max,
               dt_init_floor=spec.dt_init_floor, A_floor=spec.A_floor, is_outproj_norm=False, is_mimo=False,
               chunk_size=spec.chunk_size, layer_idx=layer_idx, device=ctx.get("device"), dtype=ctx.get("dtype"))


def register() -> None:
    """Register the kind (idempotent)."""
    if KIND not in registered_kinds():
        register_block(KIND, OfficialMamba3Spec, build_official, out_projections=("out_proj",),
                       no_decay=("dt_bias", "D", "B_bias", "C_bias"))


register()
