"""The device check shared by the Hopper-and-newer kernels (FA4, the CuTe step)."""
from __future__ import annotations

import torch
from torch import Tensor

MIN_CAPABILITY = (9, 0)


def device_reason(device: torch.device, what: str) -> str | None:
    """Why ``what`` cannot run on ``device`` (not CUDA, or older than Hopper); None when it can."""
    if device.type != "cuda":
        return f"tensors are on {device.type}; {what} needs CUDA"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability}; {what} needs Hopper (9.0) or newer"
    return None


def hopper_reason(t: Tensor, what: str) -> str | None:
    """Why ``what`` cannot run on ``t``'s device; None when it can."""
    return device_reason(t.device, what)
