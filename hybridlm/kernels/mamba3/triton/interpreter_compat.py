"""Running the Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

:func:`interpreting` and :func:`device_reason` are the one place that asks whether the kernels
can run on a tensor's device. :func:`patch_interpreter` works around Triton 3.6's interpreter
under NumPy >= 2.4, where a loop bound read from memory fails.

The interpreter turns scalars into 1-element arrays and converts them with ``int(array)``, which
NumPy 2.4 no longer allows ("only 0-dimensional arrays can be converted to Python scalars",
triton-lang/triton#9171, fixed upstream after 3.6). The kernels loop over a sequence's chunks with
a trip count loaded from ``cu_seqlens``, so under TRITON_INTERPRET=1 we apply the upstream fix:
convert through ``squeeze()``. Compiled kernels are untouched.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (Triton's own switch, read per call
    as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_reason(t: Tensor, what: str) -> str | None:
    """Why ``what`` (Triton kernels) cannot run on ``t``'s device; None when it can."""
    return device_type_reason(t.device, what)


def device_type_reason(device: torch.device, what: str) -> str | None:
    """:func:`device_reason` for a device (the registry's support checks take plain values)."""
    if device.type != "cuda" and not interpreting():
        return f"tensors are on {device.type}; {what} need CUDA (or TRITON_INTERPRET=1)"
    return None


def one_dtype_reason(dtypes: tuple[torch.dtype, ...], allowed: tuple[torch.dtype, ...]) -> str | None:
    """Why a kernel that takes one dtype of ``allowed`` for all its inputs cannot take ``dtypes``."""
    if len(set(dtypes)) > 1 or dtypes[0] not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"dtypes {names} (one of {', '.join(str(d).removeprefix('torch.') for d in allowed)} for all)"
    return None


def dtypes_reason(dtypes: tuple[torch.dtype | None, ...], allowed: tuple[torch.dtype, ...]) -> str | None:
    """Why a kernel that takes any mix of ``allowed`` dtypes cannot take ``dtypes`` (None: absent)."""
    odd = sorted({str(d).removeprefix("torch.") for d in dtypes if d is not None and d not in allowed})
    if odd:
        return f"dtype {', '.join(odd)} (the kernel takes {', '.join(str(d).removeprefix('torch.') for d in allowed)})"
    return None


def patch_interpreter() -> None:
    if not interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_hybridlm_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._hybridlm_patched = True
    interpreter._patch_lang_tensor = patched
