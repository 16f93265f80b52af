"""The kernel backend names a block spec's ``backend`` field accepts, by block kind.

Layouts sit below the kernels and never import them, yet a misspelt backend has to be a
``SpecError`` naming its YAML path when the spec is read (``hybridlm validate``), not an error
at the first forward. So the names live here, at the bottom: the built-in ones below, and every
backend registered with :func:`hybridlm.kernels.registry.register_backend` adds its own (a
user's included). tests/test_backend_registry.py checks that the built-in names here are exactly
the backends the kernels register.
"""
from __future__ import annotations

AUTO = "auto"

_NAMES: dict[str, list[str]] = {
    "mamba3": ["reference", "sequential", "triton", "cute"],
    "attention": ["sdpa", "fa4"],
}


def backend_names(kind: str) -> list[str]:
    """The names a ``kind`` block's spec may give as ``backend`` (``auto`` first)."""
    return [AUTO, *_NAMES.get(kind, [])]


def add_backend_name(kind: str, name: str) -> None:
    """Let ``kind`` specs name ``name`` (called by the kernels' registry)."""
    names = _NAMES.setdefault(kind, [])
    if name not in names:
        names.append(name)


def check_backend_name(kind: str, name: str) -> str:
    """``name`` if a ``kind`` spec may ask for it; a ValueError listing the choices otherwise."""
    if name not in backend_names(kind):
        raise ValueError(f"unknown {kind} backend {name!r}; choose one of: {', '.join(backend_names(kind))}")
    return name


def kinds_accepting(name: str) -> list[str]:
    """The block kinds whose specs may name backend ``name``."""
    return [kind for kind, names in _NAMES.items() if name in names]
