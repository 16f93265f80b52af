"""Triton 3.6's interpreter under NumPy >= 2.4: a loop bound read from memory fails.

The interpreter turns scalars into 1-element arrays and converts them with ``int(array)``, which
NumPy 2.4 no longer allows ("only 0-dimensional arrays can be converted to Python scalars",
triton-lang/triton#9171, fixed upstream after 3.6). The kernels loop over a sequence's chunks with
a trip count loaded from ``cu_seqlens``, so under TRITON_INTERPRET=1 we apply the upstream fix:
convert through ``squeeze()``. Compiled kernels are untouched.
"""
from __future__ import annotations

import os


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
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
