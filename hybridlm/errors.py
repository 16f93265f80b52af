"""The errors hybridlm raises on purpose: each names what to fix."""
from __future__ import annotations

from typing import Any

MAX_SHOWN_CHARS = 200  # an error message shows at most this much of an offending value


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was (a message stays one short line)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def shown_value(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """A bounded repr: a huge string or list is cut before repr() runs over all of it."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = _bounded_repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def _bounded_repr(value: Any) -> str:
    """repr() with nesting and container sizes bounded (an alias-built structure can be huge)."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 6, MAX_SHOWN_CHARS, MAX_SHOWN_CHARS
    bounded.maxlong = MAX_SHOWN_CHARS
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 20
    return bounded.repr(value)


class HybridLMError(Exception):
    """Base class of every error hybridlm raises deliberately."""


class SpecError(HybridLMError):
    """An invalid model spec.

    ``path`` is the dotted location in the YAML document (``blocks.M.headdim``), ``value``
    the offending value, ``reason`` what is wrong with it.
    """

    _MISSING = object()

    def __init__(self, path: str, reason: str, value: Any = _MISSING):
        self.path = path
        self.reason = reason
        self.value = None if value is SpecError._MISSING else value
        self.has_value = value is not SpecError._MISSING
        shown = f" = {shown_value(value)}" if self.has_value else ""
        where = path or "<spec>"
        super().__init__(f"{where}{shown}: {reason}")


class BackendUnavailable(HybridLMError):
    """A kernel backend was asked for that cannot run here (missing GPU or GPU package)."""


class ShapeError(HybridLMError, ValueError):
    """Tensor inputs whose shapes or dtypes cannot work together."""
