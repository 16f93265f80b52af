"""Block kinds known to the spec parser: kind name -> pydantic model.

Built-in kinds register themselves in :mod:`hybridlm.layouts.blocks`; users add their own with
:func:`hybridlm.register_block` (which also tells the builder how to make the module).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridlm.layouts.blocks import BlockSpec

_SPEC_CLASSES: dict[str, type["BlockSpec"]] = {}


def register_block_spec(kind: str, spec_cls: type["BlockSpec"], *, replace: bool = False) -> None:
    if not kind.isidentifier():
        raise ValueError(f"block kind {kind!r} must be an identifier")
    if kind in _SPEC_CLASSES and not replace and _SPEC_CLASSES[kind] is not spec_cls:
        raise ValueError(f"block kind {kind!r} is already registered; pass replace=True to override it")
    _SPEC_CLASSES[kind] = spec_cls


def unregister_block_spec(kind: str) -> None:
    _SPEC_CLASSES.pop(kind, None)


def block_spec_class(kind: str) -> type["BlockSpec"] | None:
    return _SPEC_CLASSES.get(kind)


def block_kinds() -> list[str]:
    return sorted(_SPEC_CLASSES)
