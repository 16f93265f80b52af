"""The decode GEMVs' module knobs set by name, for benchmarks that compare them in one run.

    knobs, saved = set_knobs("PDL=1,PREFETCH_L2=1,PLAIN_GEMVS=1")
    ...
    set_knobs("", saved)  # back to what they were

Knobs are the upper-case settings of ``hybridlm/kernels/decode_gemv/triton.py`` (the kernel's
blocks, forms, PDL, prefetch), of the ``decode_gemv`` package (``PLAIN_GEMVS``, ``NORM_IN_PROJ``, ``PLAIN_IN_PROJ``:
which projections take the kernel), the other decode kernels' PDL switches (``NORM_PDL``,
``KV_APPEND_PDL``, ``ATTENTION_PDL``: ``ALIASES``) and the greedy kernel's (``GREEDY_TRITON``). Values are ints; booleans from 0/1.
"""
from __future__ import annotations

import importlib


# the other decode kernels' PDL switches, by the names the knobs go by here
ALIASES = {"NORM_PDL": ("hybridlm.kernels.rmsnorm.triton", "PDL"),
           "KV_APPEND_PDL": ("hybridlm.kernels.kv_append.triton", "PDL"),
           "ATTENTION_PDL": ("hybridlm.kernels.decode_attention.triton", "PDL"),
           "GREEDY_TRITON": ("hybridlm.kernels.greedy", "TRITON_BY_DEFAULT")}


def _modules() -> tuple:
    from hybridlm.kernels import decode_gemv
    from hybridlm.kernels.decode_gemv import triton as kernel

    return kernel, decode_gemv


def _where(name: str) -> tuple[object, str] | None:
    """(module, attribute) of knob ``name``; None when it is not one."""
    if name in ALIASES:
        module_name, attribute = ALIASES[name]
        return importlib.import_module(module_name), attribute
    module = next((m for m in _modules() if name.isupper() and hasattr(m, name)), None)
    return None if module is None else (module, name)


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
        where = _where(name)
        if where is None or not value:
            known = sorted({n for m in modules for n in vars(m) if n.isupper() and isinstance(getattr(m, n), (bool, int))}
                           | set(ALIASES))
            raise ValueError(f"decode GEMV knob {item!r}: expected NAME=int with NAME one of {', '.join(known)}")
        module, attribute = where
        current = getattr(module, attribute)
        saved.setdefault((module, attribute), current)
        setattr(module, attribute, bool(int(value)) if isinstance(current, bool) else int(value))
        done[name] = getattr(module, attribute)
    return done, saved
