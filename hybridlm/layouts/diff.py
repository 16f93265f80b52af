"""Field-by-field differences between two specs (as plain dicts), for messages that name them."""
from __future__ import annotations

from typing import Any, Iterator


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()  # the value of a field one side does not have


def spec_differences(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every leaf that differs; :data:`MISSING` marks an
    absent field. Lists of equal length are compared item by item, others as values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            yield from spec_differences(old.get(key, MISSING), new.get(key, MISSING), where)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from spec_differences(a, b, f"{path}.{i}" if path else str(i))
    elif old != new:
        yield path or "<spec>", old, new
