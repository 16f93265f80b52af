"""The errors hybridlm raises on purpose: each names what to fix."""
from __future__ import annotations

from typing import Any


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
        shown = f" = {value!r}" if self.has_value else ""
        where = path or "<spec>"
        super().__init__(f"{where}{shown}: {reason}")


class BackendUnavailable(HybridLMError):
    """A kernel backend was asked for that cannot run here (missing GPU or GPU package)."""


class ShapeError(HybridLMError, ValueError):
    """Tensor inputs whose shapes or dtypes cannot work together."""
