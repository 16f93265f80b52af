"""SwiGLU's gate in one op: ``silu(gate) * value``, written into the gate's buffer at inference.

    hidden = silu_mul_(w1(x), w3(x))     # then w2(hidden)

Backends (kind ``swiglu_gate``, op ``silu_mul_``), chosen by :mod:`hybridlm.kernels.registry`:
``reference`` (``reference.py``: ``F.silu(gate, inplace=True).mul_(value)``, two kernels; every
device and dtype) and ``triton`` (``triton.py``: one kernel; ``auto`` on CUDA, on the CPU under
``TRITON_INTERPRET=1`` when asked for by name). In place means no autograd: while autograd records
(grad mode on and an input that requires grad) the out-of-place reference runs, as in training.
"""
from __future__ import annotations

from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.swiglu_gate import reference

KIND = "swiglu_gate"
OP = "silu_mul_"

registry.register_reference_and_triton(KIND, OP, reference.silu_mul_, "hybridlm.kernels.swiglu_gate.triton",
                                       "silu_mul_")


def silu_mul_(gate: Tensor, value: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * value (same shapes): in ``gate``'s buffer (returned) unless autograd records,
    then a new tensor. ``backend``: a registered ``swiglu_gate`` backend, None or ``"auto"``."""
    if gate.shape != value.shape:
        raise ValueError(f"silu_mul_: gate shape {tuple(gate.shape)} != value shape {tuple(value.shape)}")
    if registry.records_autograd(gate, value):
        return reference.silu_mul(gate, value)
    name = registry.choose(KIND, OP, backend, gate.device.type, gate.device.index, (gate.dtype, value.dtype),
                           gate.is_contiguous())
    return registry.implementation(KIND, name, OP)(gate, value)


__all__ = ["silu_mul_", "KIND", "OP"]
