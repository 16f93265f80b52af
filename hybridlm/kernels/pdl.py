"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on Hopper and newer.

A kernel launched with PDL may start while the kernel before it on the stream finishes: its programs
become resident early, signal that the next kernel may launch too, and wait (``griddepcontrol.wait``:
the previous grid complete, its writes visible) before they read an activation or write anything. In
a captured CUDA graph the launch attribute becomes a programmatic edge. Every kernel so launched must
wait in every program before its first dependent read or write (then a chain is as ordered as a plain
stream: a kernel cannot finish before the one before it has).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.kernels.mamba3.triton.interpreter_compat import interpreting

_CAPABLE: dict[int, bool] = {}


def usable(device: torch.device) -> bool:
    """Whether PDL can run on ``device``: compiled (not interpreted) for Hopper (9.0) or newer."""
    if device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _CAPABLE[index]


def launch_options(on: bool) -> dict:
    """The Triton launch keyword for a kernel launched with PDL (none without)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def let_next_launch(PDL: tl.constexpr):
    """Let the next kernel's programs launch now (they wait for this grid before reading its output)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the kernel before this one finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()
