"""The decode GEMVs' module knobs set by name, for benchmarks that compare them in one run.

    knobs, saved = set_knobs("PDL=1,PREFETCH_L2=1,PLAIN_GEMVS=1")
    ...
    set_knobs("", saved)  # back to what they were

Knobs are the upper-case settings of ``hybridlm/kernels/decode_gemv/triton.py`` (the kernel's
blocks, forms, PDL, prefetch) and of the ``decode_gemv`` package (``PLAIN_GEMVS``, ``NORM_IN_PROJ``:
which projections take the kernel). Values are ints; booleans from 0/1.
"""
from __future__ import annotations


def _modules() -> tuple:
    from hybridlm.kernels import decode_gemv
    from hybridlm.kernels.decode_gemv import triton as kernel

    return kernel, decode_gemv


def set_knobs(text: str, saved: dict | None = None) -> tuple[dict, dict]:
    """Put back ``saved`` (an earlier call's second value), then set ``text``'s knobs
    (``"NAME=value,..."``). Returns ({name: value set}, what to pass back to restore every knob
    changed so far). A name that is not a knob raises ValueError naming the knobs."""
    modules = _modules()
    for (module, name), value in (saved or {}).items():
        setattr(module, name, value)
    done, saved = {}, dict(saved or {})
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        module = next((m for m in modules if name.isupper() and hasattr(m, name)), None)
        if module is None or not value:
            known = sorted({n for m in modules for n in vars(m) if n.isupper() and isinstance(getattr(m, n), (bool, int))})
            raise ValueError(f"decode GEMV knob {item!r}: expected NAME=int with NAME one of {', '.join(known)}")
        current = getattr(module, name)
        saved.setdefault((module, name), current)
        setattr(module, name, bool(int(value)) if isinstance(current, bool) else int(value))
        done[name] = getattr(module, name)
    return done, saved
