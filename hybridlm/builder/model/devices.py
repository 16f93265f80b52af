"""dtype and device arguments given as names or torch objects, checked with one clear error."""
from __future__ import annotations

import torch

from hybridlm.errors import HybridLMError, shown_value

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype: "torch.dtype | str | None") -> torch.dtype | None:
    """``None``, a floating-point torch dtype, or its name ("float32", "bfloat16", "float16", ...)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise HybridLMError(f"dtype {dtype} is not a floating-point type; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in DTYPES:
            return DTYPES[key]
    raise HybridLMError(f"unknown dtype {shown_value(dtype)}: use one of float32, bfloat16, float16, float64 "
                        f"(or {', '.join(k for k in DTYPES if k not in ('float32', 'bfloat16', 'float16', 'float64'))}"
                        ") or a torch dtype such as torch.bfloat16")


def resolve_device(device: "torch.device | str | int | None") -> torch.device:
    """A device torch knows and this machine has, or one clear error."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise HybridLMError(f"unknown device {shown_value(device)}: use e.g. 'cpu', 'cuda' or 'cuda:0' "
                            f"(torch says: {str(err).splitlines()[0]})") from None
    if dev.type == "meta":
        raise HybridLMError("device 'meta' holds no weights: load onto 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HybridLMError(f"device {str(device)!r} asked for, but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise HybridLMError(f"device {str(device)!r} asked for, but this machine has {n} CUDA device(s) "
                                f"(cuda:0..cuda:{n - 1})")
    return dev
