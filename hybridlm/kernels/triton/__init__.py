"""Triton Mamba-3 kernels: the chunked scan forward and backward (SISO and MIMO in one design).

Importing this package imports Triton; :mod:`hybridlm.kernels.dispatch` does so lazily, the
first time the ``triton`` backend is asked for.
"""
from hybridlm.kernels.triton.interpreter_compat import patch_interpreter

patch_interpreter()

from hybridlm.kernels.triton.scan import mamba3_chunked, unsupported_reason  # noqa: E402

__all__ = ["mamba3_chunked", "unsupported_reason"]
