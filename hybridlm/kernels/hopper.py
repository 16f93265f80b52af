"""The device check shared by the Hopper-and-newer kernels (FA4, the CuTe step)."""
from __future__ import annotations

import torch
from torch import Tensor

MIN_CAPABILITY = (9, 0)


def hopper_reason(t: Tensor, what: str) -> str | None:
    """Why ``what`` cannot run on ``t``'s device (not CUDA, or older than Hopper); None when it can."""
    if t.device.type != "cuda":
        return f"tensors are on {t.device.type}; {what} needs CUDA"
    capability = torch.cuda.get_device_capability(t.device)
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability}; {what} needs Hopper (9.0) or newer"
    return None
