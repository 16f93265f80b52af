"""The model spec: blocks named by symbol, laid out by a pattern, with per-position overrides."""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from hybridlm.errors import SpecError, shown_value
from hybridlm.layouts.blocks import BlockSpec, block_fields, dump_block, reject_bool_for_number
from hybridlm.layouts.pattern import PatternError, compress_symbols, expand_pattern
from hybridlm.layouts.registry import block_kinds, block_spec_class

SPEC_VERSION = 1

_FRIENDLY = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p != "")


def spec_error_from_validation(err: ValidationError, prefix: str = "") -> SpecError:
    """The first problem of a pydantic error, as a SpecError naming its YAML path."""
    first = err.errors(include_url=False)[0]
    path = _join(prefix, *first["loc"])
    reason = _FRIENDLY.get(first["type"], first["msg"])
    if reason.startswith("Value error, "):
        reason = reason[len("Value error, "):]
    if first["type"] in ("missing",):
        return SpecError(path, reason)
    return SpecError(path, reason, first.get("input"))


def parse_block(symbol: str, data: Any) -> BlockSpec:
    """Validate one entry of ``blocks``; errors name ``blocks.<symbol>.<field>``."""
    where = f"blocks.{symbol}"
    if isinstance(data, BlockSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError(where, "a block must be a mapping with a 'kind' field", data)
    if "kind" not in data:
        raise SpecError(f"{where}.kind", f"required field is missing (one of: {', '.join(block_kinds())})")
    cls = block_spec_class(data["kind"]) if isinstance(data["kind"], str) else None
    if cls is None:
        raise SpecError(f"{where}.kind", f"unknown block kind (known: {', '.join(block_kinds())})", data["kind"])
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise spec_error_from_validation(err, where) from None


class Override(BaseModel):
    """Change fields of the blocks at some positions of the expanded pattern."""

    model_config = ConfigDict(extra="forbid")

    at: list[int] = Field(..., min_length=1, description="0-based indices into the expanded pattern")
    set: dict[str, Any] = Field(..., min_length=1, description="fields of that block's kind to change")

    @field_validator("at", mode="before")
    @classmethod
    def _single_index(cls, v: Any, info: ValidationInfo) -> Any:
        v = reject_bool_for_number(cls, v, info)
        return [v] if isinstance(v, int) else v


class ResolvedBlock(NamedTuple):
    index: int
    symbol: str
    spec: BlockSpec
    overridden: bool


class ModelSpec(BaseModel):
    """A whole model: width, vocabulary, block definitions, their layout and overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    version: Literal[1] = Field(SPEC_VERSION, description="spec format version")
    name: str = "hybrid"
    vocab_size: int = Field(..., ge=1)
    d_model: int = Field(..., ge=1)
    blocks: dict[str, SerializeAsAny[BlockSpec]] = Field(..., min_length=1)
    pattern: str
    overrides: list[Override] = Field(default_factory=list)
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    residual_in_fp32: bool = Field(False, description="keep the residual stream in fp32")
    init_std: float = Field(0.02, gt=0, description="std of the embedding and projection init")

    # Turn pydantic's errors into SpecErrors that name the YAML path, wherever a spec is built.
    def __init__(self, /, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise spec_error_from_validation(err) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "ModelSpec":
        if not isinstance(obj, (dict, ModelSpec)):
            raise SpecError("", "a spec must be a mapping of fields", obj)
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise spec_error_from_validation(err) from None

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        return reject_bool_for_number(cls, v, info)

    @field_validator("blocks", mode="before")
    @classmethod
    def _typed_blocks(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # pydantic reports the type error
        out = {}
        for symbol, data in v.items():
            if not isinstance(symbol, str) or not symbol.isidentifier():
                raise SpecError(f"blocks.{symbol}", "a block symbol must be an identifier (letters, digits, _)")
            out[symbol] = parse_block(symbol, data)
        return out

    @model_validator(mode="after")
    def _check_layout(self) -> "ModelSpec":
        self.resolve()
        return self

    # -- layout ------------------------------------------------------------------------------
    def symbols(self) -> list[str]:
        """The expanded pattern."""
        try:
            symbols = expand_pattern(self.pattern)
        except PatternError as err:
            raise SpecError("pattern", str(err), self.pattern) from None
        unknown = sorted({s for s in symbols if s not in self.blocks})
        if unknown:
            raise SpecError("pattern", f"symbol {shown_value(unknown[0], 60)} is not defined in blocks "
                            f"(defined: {', '.join(self.blocks)})", self.pattern)
        return symbols

    def resolve(self) -> list[ResolvedBlock]:
        """Every block in pattern order with overrides applied, checked at this d_model."""
        symbols = self.symbols()
        updates: dict[int, dict[str, tuple[Any, int]]] = {}
        for k, ov in enumerate(self.overrides):
            for j, idx in enumerate(ov.at):
                if not 0 <= idx < len(symbols):
                    raise SpecError(f"overrides.{k}.at.{j}",
                                    f"out of range: the pattern has {len(symbols)} blocks (0..{len(symbols) - 1})", idx)
                block = self.blocks[symbols[idx]]
                allowed = block_fields(type(block))
                for field, value in ov.set.items():
                    if field not in allowed:
                        raise SpecError(f"overrides.{k}.set.{field}",
                                        f"block {idx} ({symbols[idx]}, kind {block.kind}) has no such field "
                                        f"(fields: {', '.join(sorted(allowed))})")
                    updates.setdefault(idx, {})[field] = (value, k)
                if j == 0 or symbols[idx] != symbols[ov.at[0]]:
                    # Check this override's values by type now: a later override may replace them.
                    try:
                        type(block).model_validate({**block.model_dump(), **ov.set})
                    except ValidationError as err:
                        raise spec_error_from_validation(err, f"overrides.{k}.set") from None
        out = []
        for idx, symbol in enumerate(symbols):
            base = self.blocks[symbol]
            changes = updates.get(idx, {})
            spec = base
            if changes:
                data = {**base.model_dump(), **{f: v for f, (v, _) in changes.items()}}
                try:
                    spec = type(base).model_validate(data)
                except ValidationError as err:
                    first = err.errors(include_url=False)[0]
                    field = first["loc"][0] if first["loc"] else ""
                    origin = (f"overrides.{changes[field][1]}.set" if field in changes else f"blocks.{symbol}")
                    raise spec_error_from_validation(err, origin) from None
            for field, reason in spec.problems(self.d_model):
                if field in changes:
                    raise SpecError(f"overrides.{changes[field][1]}.set.{field}",
                                    f"{reason} (at block {idx})", getattr(spec, field))
                raise SpecError(f"blocks.{symbol}.{field}", reason, getattr(spec, field))
            out.append(ResolvedBlock(idx, symbol, spec, bool(changes)))
        return out

    @property
    def n_blocks(self) -> int:
        return len(self.symbols())

    # -- export --------------------------------------------------------------------------------
    def to_dict(self, *, exclude_defaults: bool = True) -> dict[str, Any]:
        """Plain data in the order a YAML file reads best."""
        out: dict[str, Any] = {"version": self.version, "name": self.name,
                               "vocab_size": self.vocab_size, "d_model": self.d_model}
        for field in ("tie_embeddings", "norm_eps", "residual_in_fp32", "init_std"):
            value = getattr(self, field)
            if not exclude_defaults or value != type(self).model_fields[field].default:
                out[field] = value
        out["blocks"] = {s: dump_block(b, exclude_defaults=exclude_defaults) for s, b in self.blocks.items()}
        out["pattern"] = self.pattern
        if self.overrides:
            out["overrides"] = [ov.model_dump(mode="json") for ov in self.overrides]
        return out

    def layer_types(self) -> list[str]:
        """HF-style ``layer_types`` for the mixer blocks (``linear_attention`` / ``full_attention``)."""
        names = {"mamba3": "linear_attention", "attention": "full_attention"}
        return [names.get(r.spec.kind, r.spec.kind) for r in self.resolve() if r.spec.kind != "swiglu"]

    def compact_pattern(self) -> str:
        return compress_symbols(self.symbols())
