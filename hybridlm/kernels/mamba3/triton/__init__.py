"""Triton Mamba-3 kernels: the chunked scan forward and backward (SISO and MIMO in one design).

Importing this package imports Triton; :mod:`hybridlm.kernels.dispatch` does so lazily, the
first time the ``triton`` backend is asked for. The kernels are ``torch.library`` custom ops
(namespace ``hybridlm``), opaque to ``torch.compile``.
"""
import torch

from hybridlm.kernels.mamba3.triton.interpreter_compat import patch_interpreter

patch_interpreter()

from hybridlm.kernels.mamba3.triton.scan import mamba3_chunked, unsupported_reason  # noqa: E402
from hybridlm.kernels.mamba3.triton.step import mamba3_decode_step  # noqa: E402
from hybridlm.kernels.mamba3.triton.step import unsupported_reason as step_unsupported_reason  # noqa: E402

# The forward ops whose outputs selective activation checkpointing keeps instead of recomputing:
# re-running the chunk scan costs as much as its forward, while its outputs are one y per token.
SAC_SAVE_OPS = {
    torch.ops.hybridlm.mamba3_chunk_fwd.default,
    torch.ops.hybridlm.token_walk_fwd.default,
    torch.ops.hybridlm.gated_output_fwd.default,
    torch.ops.hybridlm.expand_ranks_fwd.default,
}

__all__ = ["SAC_SAVE_OPS", "mamba3_chunked", "mamba3_decode_step", "step_unsupported_reason", "unsupported_reason"]
