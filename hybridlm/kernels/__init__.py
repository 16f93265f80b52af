"""Kernels: tensors in, tensors out. ``mamba3/oracle`` is the ground truth; ``registry`` picks a
backend per call; ``dispatch`` (Mamba-3), ``attention``, ``rmsnorm`` (the fused residual add +
RMSNorm), ``swiglu_gate`` and ``decode_gemv`` hold the entry points and register the built-in backends, so
importing this package registers them all."""
from hybridlm.kernels import attention, decode_gemv, dispatch, registry, rmsnorm, swiglu_gate
from hybridlm.kernels.dispatch import mamba3_decode_step, mamba3_scan, mamba3_step
from hybridlm.kernels.mamba3.contract import Mamba3State
from hybridlm.kernels.mamba3.shared import causal_conv1d
from hybridlm.kernels.registry import Op, backend_names, register_backend

__all__ = ["Op", "attention", "backend_names", "dispatch", "register_backend", "registry", "rmsnorm",
           "swiglu_gate", "decode_gemv", "mamba3_decode_step", "mamba3_scan", "mamba3_step", "Mamba3State", "causal_conv1d"]
