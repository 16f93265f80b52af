"""Per-block spec models: one pydantic model per block kind.

Per-field rules live on the fields; rules that need the model width (``d_model``) live in
``problems()``, which the model spec calls on every resolved block so that an error names the
YAML path of the field that has to change. The rules of the built-in kinds are written once, in
:func:`mamba3_problems` and :func:`attention_problems`: the specs and the modules' constructors
(hybridlm/blocks/) both call them.
"""
from __future__ import annotations

import types
from typing import Any, ClassVar, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hybridlm.layouts.backends import check_backend_name
from hybridlm.layouts.registry import register_block_spec

OutNorm = Literal["none", "pregate_grouped", "pregate_default", "postgate_grouped", "postgate_default"]
AActivation = Literal["heavy_tail", "softplus"]
Discretization = Literal["trapezoid", "euler", "half"]
Position = Literal["rope", "nope"]


# -- the rules of the built-in kinds, one (field, reason) per broken rule ---------------------------
def _choice(value: Any, literal: Any) -> str | None:
    choices = get_args(literal)
    return None if value in choices else "must be one of " + " | ".join(choices)


def _rope_fraction_problem(rope_fraction: float) -> str | None:
    return None if rope_fraction in (0.5, 1.0) else "must be 0.5 or 1.0"


def _d_state_problem(d_state: int) -> str | None:
    return None if d_state % 2 == 0 else "must be even (the rotation acts on pairs of state dims)"


def mamba3_rope_angles(d_state: int, rope_fraction: float, rotation: bool = True) -> int:
    """S, the number of rotation angles (pairs of state dims rotated); 0 without rotation."""
    if not rotation:
        return 0
    split = int(d_state * rope_fraction)
    return (split - split % 2) // 2


def mamba3_problems(d_model: int, *, d_state: int, expand: int, headdim: int, ngroups: int, rope_fraction: float,
                    rotation: bool, dt_min: float, dt_max: float, a_activation: str, discretization: str,
                    out_norm: str) -> Iterator[tuple[str, str]]:
    """Every rule a Mamba-3 configuration breaks, as ``(field, reason)``: what :class:`Mamba3Spec`
    reports on its YAML paths and what ``hybridlm.blocks.Mamba3`` raises."""
    for field, value, literal in (("a_activation", a_activation, AActivation),
                                  ("discretization", discretization, Discretization), ("out_norm", out_norm, OutNorm)):
        if (reason := _choice(value, literal)) is not None:
            yield field, reason
    if (reason := _rope_fraction_problem(rope_fraction)) is not None:
        yield "rope_fraction", reason
        return
    if (reason := _d_state_problem(d_state)) is not None:
        yield "d_state", reason
    d_inner = expand * d_model
    if d_inner % headdim:
        yield "headdim", f"d_inner = expand * d_model = {d_inner} is not a multiple of headdim"
        return
    nheads = d_inner // headdim
    if nheads % ngroups:
        yield "ngroups", f"must divide the number of heads ({nheads} = d_inner / headdim)"
    if rotation and mamba3_rope_angles(d_state, rope_fraction) == 0:
        yield "d_state", "too small to rotate any pair at this rope_fraction (set rotation: false)"
    if dt_min > dt_max:
        yield "dt_min", f"must not exceed dt_max ({dt_max})"


def attention_problems(d_model: int, *, n_heads: int, n_kv_heads: int | None, head_dim: int | None,
                       position: str) -> Iterator[tuple[str, str]]:
    """Every rule an attention configuration breaks, as ``(field, reason)``: what :class:`AttentionSpec`
    reports on its YAML paths and what ``hybridlm.blocks.Attention`` raises."""
    if (reason := _choice(position, Position)) is not None:
        yield "position", reason
    if head_dim is None and d_model % n_heads:
        yield "n_heads", f"must divide d_model ({d_model}) unless head_dim is set"
    if n_heads % (n_kv_heads or n_heads):
        yield "n_kv_heads", f"must divide n_heads ({n_heads})"
    if position == "rope" and (head_dim or d_model // n_heads) % 2:
        yield "head_dim", "must be even for rope"


def _numeric(tp: Any) -> bool:
    """Whether a field annotated ``tp`` takes numbers only (int, float, Literal[1], int | None, list[int])."""
    if tp in (int, float):
        return True
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return all(type(a) in (int, float) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bool(rest) and all(_numeric(a) for a in rest)
    if origin is list:
        return bool(args) and _numeric(args[0])
    return False


def reject_bool_for_number(model_cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Pydantic's lax mode reads ``True`` as 1, so YAML's ``yes``/``on``/``true`` would pass for a count;
    a spec treats a boolean where a number belongs as a wrong type."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) for v in items) and _numeric(model_cls.model_fields[info.field_name].annotation):
        raise ValueError("Input should be a number, not a boolean")
    return value


class BlockSpec(BaseModel):
    """Base of every block spec. Subclasses set ``kind`` to a Literal of their kind name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    kind: str
    # Short label used in tables (``hybridlm show``).
    label: ClassVar[str] = "block"

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        return reject_bool_for_number(cls, v, info)

    @field_validator("backend", check_fields=False)
    @classmethod
    def _known_backend(cls, v: str) -> str:
        # checked against names kept in layouts (layouts/backends.py), which the kernels' registry
        # extends: layouts may not import the kernels, and a misspelt name must fail here, on its YAML path
        return check_backend_name(cls.model_fields["kind"].default, v)

    def problems(self, d_model: int) -> Iterator[tuple[str, str]]:
        """Yield ``(field, reason)`` for each rule this block breaks at width ``d_model``."""
        return iter(())

    def describe(self, d_model: int) -> str:
        """One-line summary for tables."""
        return self.kind


class Mamba3Spec(BlockSpec):
    """A Mamba-3 mixer. Defaults follow the official ``Mamba3`` constructor."""

    kind: Literal["mamba3"] = "mamba3"
    label: ClassVar[str] = "Mamba-3"

    d_state: int = Field(128, ge=2, description="N, the state size (head dim of B and C)")
    expand: int = Field(2, ge=1, description="d_inner = expand * d_model")
    headdim: int = Field(64, ge=1, description="P, head dim of x, z and y")
    ngroups: int = Field(1, ge=1, description="number of B/C groups shared across heads")
    rope_fraction: float = Field(0.5, description="share of the state dims rotated: 0.5 or 1.0")
    mimo_rank: int = Field(1, ge=1, description="R; 1 = SISO")
    a_activation: AActivation = Field(
        "heavy_tail", description="map from the A projection to -A (softplus = mamba_ssm <= 2.3.2)")
    discretization: Discretization = Field(
        "trapezoid", description="lambda = sigmoid(projection) | 1 (exponential Euler) | 1/2")
    rotation: bool = Field(True, description="data-dependent rotation of B/C (complex state)")
    bc_bias: bool = Field(True, description="learned per-head B/C biases")
    conv_kernel: int = Field(0, ge=0, description="short causal conv width on x/B/C; 0 = none")
    out_norm: OutNorm = Field("none", description="norm before the output projection")
    chunk_size: int = Field(64, ge=1, description="chunk length of the chunked scan")
    backend: str = Field(
        "auto", description="kernels: auto (on CUDA the CuTe decode step and the Triton scan where they "
                            "import, the reference otherwise) or a registered backend (reference, sequential, "
                            "triton, cute, ...); it wins over the HYBRIDLM_BACKEND environment variable")
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, ge=0)
    A_floor: float = Field(1e-4, gt=0)

    # These two need no d_model: checked per field, so an override's value fails on its own path.
    @field_validator("rope_fraction")
    @classmethod
    def _rope_fraction(cls, v: float) -> float:
        if (reason := _rope_fraction_problem(v)) is not None:
            raise ValueError(f"rope_fraction {reason}")
        return float(v)

    @field_validator("d_state")
    @classmethod
    def _even_state(cls, v: int) -> int:
        if (reason := _d_state_problem(v)) is not None:
            raise ValueError(f"d_state {reason}")
        return v

    # -- derived sizes ---------------------------------------------------------------------
    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def nheads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.headdim

    @property
    def num_rope_angles(self) -> int:
        return mamba3_rope_angles(self.d_state, self.rope_fraction, self.rotation)

    def problems(self, d_model: int) -> Iterator[tuple[str, str]]:
        return mamba3_problems(
            d_model, d_state=self.d_state, expand=self.expand, headdim=self.headdim, ngroups=self.ngroups,
            rope_fraction=self.rope_fraction, rotation=self.rotation, dt_min=self.dt_min, dt_max=self.dt_max,
            a_activation=self.a_activation, discretization=self.discretization, out_norm=self.out_norm)

    def describe(self, d_model: int) -> str:
        parts = [f"N={self.d_state}", f"P={self.headdim}", f"H={self.nheads(d_model)}"]
        if self.ngroups > 1:
            parts.append(f"G={self.ngroups}")
        if self.mimo_rank > 1:
            parts.append(f"MIMO R={self.mimo_rank}")
        if self.discretization != "trapezoid":
            parts.append(self.discretization)
        if not self.rotation:
            parts.append("no-rotation")
        if self.out_norm != "none":
            parts.append(self.out_norm)
        if self.conv_kernel:
            parts.append(f"conv{self.conv_kernel}")
        return " ".join(parts)


class AttentionSpec(BlockSpec):
    """Causal grouped-query attention."""

    kind: Literal["attention"] = "attention"
    label: ClassVar[str] = "Attention"

    n_heads: int = Field(..., ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="defaults to n_heads (plain MHA)")
    head_dim: int | None = Field(None, ge=1, description="defaults to d_model / n_heads")
    position: Position = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    qk_norm: bool = False
    window: int | None = Field(None, ge=1, description="sliding window in tokens; null = full")
    backend: str = Field(
        "auto", description="attention kernels: auto (FA4 where installed and the GPU takes it, SDPA otherwise) "
                            "or a registered backend (sdpa, fa4, ...); it wins over the HYBRIDLM_ATTENTION "
                            "environment variable")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def problems(self, d_model: int) -> Iterator[tuple[str, str]]:
        return attention_problems(d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                  head_dim=self.head_dim, position=self.position)

    def describe(self, d_model: int) -> str:
        parts = [f"heads={self.n_heads}/{self.kv_heads}", f"hd={self.resolved_head_dim(d_model)}",
                 self.position]
        if self.qk_norm:
            parts.append("qk-norm")
        if self.window:
            parts.append(f"window={self.window}")
        return " ".join(parts)


class SwiGLUSpec(BlockSpec):
    """A SwiGLU feed-forward block."""

    kind: Literal["swiglu"] = "swiglu"
    label: ClassVar[str] = "SwiGLU"

    hidden: int | None = Field(None, ge=1, description="defaults to 8/3 d_model rounded up to 64")

    def resolved_hidden(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        return -(-(8 * d_model // 3) // 64) * 64

    def describe(self, d_model: int) -> str:
        return f"hidden={self.resolved_hidden(d_model)}"


BUILTIN_BLOCK_SPECS: dict[str, type[BlockSpec]] = {
    "mamba3": Mamba3Spec,
    "attention": AttentionSpec,
    "swiglu": SwiGLUSpec,
}
for _kind, _cls in BUILTIN_BLOCK_SPECS.items():
    register_block_spec(_kind, _cls)


def block_fields(spec_cls: type[BlockSpec]) -> set[str]:
    return set(spec_cls.model_fields) - {"kind"}


def dump_block(block: BlockSpec, *, exclude_defaults: bool = True) -> dict[str, Any]:
    data = block.model_dump(mode="json", exclude_defaults=exclude_defaults)
    return {"kind": block.kind, **{k: v for k, v in data.items() if k != "kind"}}
