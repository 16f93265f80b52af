"""Greedy decoding's choice, the first index of each row's maximum (``argmax(-1)``), as one op.

    tokens = argmax(logits)          # (B, V) -> (B,) int64
    argmax(logits, out=tokens)       # in place: a decode step's next input, inside its CUDA graph

Backends (kind ``greedy``, op ``argmax``), chosen by :mod:`hybridlm.kernels.registry`: ``reference``
(``reference.py``: torch's argmax, in two stages for wide vocabularies on CUDA) and ``triton``
(``triton.py``: one kernel; on the CPU under ``TRITON_INTERPRET=1`` when asked for by name). Both give
argmax's exact result, ties and NaNs included. With no backend named: ``auto`` (the kernel on CUDA)
while ``TRITON_BY_DEFAULT``, else the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.errors import ShapeError
from hybridlm.kernels import registry
from hybridlm.kernels.greedy import reference

KIND = "greedy"
OP = "argmax"
# The kernel by default on CUDA: exact on an H100 (tests/gpu/test_inference_e2e_gpu.py -k greedy: 1 to 1,368 rows
# of 128,256 logits; 64 graph-replayed steps of every small family, the same tokens as argmax of eager steps), and
# hybrid-1.5b's batch-1 step 1.450 -> 1.442 ms against torch's five ops inside the graph (2026-12-05,
# docs/benchmarks.md session 28). False: torch's ops. Knob GREEDY_TRITON of benchmarks' --gemv-knobs.
TRITON_BY_DEFAULT = True

registry.register_reference_and_triton(KIND, OP, reference.argmax, "hybridlm.kernels.greedy.triton", "argmax")


def argmax(logits: Tensor, out: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """logits (B, V) -> the first index of each row's maximum, (B,) int64, written into ``out`` when
    given (a (B,) int64 tensor on the same device). ``backend``: a registered ``greedy`` backend, None
    or ``"auto"``."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ShapeError(f"greedy argmax takes logits (batch, vocab) with vocab >= 1; got shape {tuple(logits.shape)}")
    if out is not None and (out.shape != logits.shape[:1] or out.dtype != torch.int64 or out.device != logits.device):
        raise ShapeError(f"greedy argmax's out must be ({logits.shape[0]},) int64 on {logits.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if backend is None:
        backend = registry.AUTO if TRITON_BY_DEFAULT else "reference"
    name = registry.choose(KIND, OP, backend, logits.device.type, logits.device.index, logits.dtype, logits.shape[1])
    return registry.implementation(KIND, name, OP)(logits, out)


__all__ = ["argmax", "KIND", "OP"]
