"""Arrival counters for kernels whose programs share a result: each program that wrote its part
takes a ticket (an atomic add), and the last to arrive combines the parts and resets the counter.

Kept per (device, user) and reused, so a step pays no memset; a user's launches run on one stream
at a time. Never first made inside a CUDA-graph capture: memory from the graph's pool could be
reused after the graph is freed, so a capture gets counters of its own (a memset node in the graph).
"""
from __future__ import annotations

import torch
from torch import Tensor

_COUNTERS: dict[tuple[torch.device, str], Tensor] = {}
# Counters a larger request outgrew, kept: a CUDA graph captured with them holds their address, not a
# reference, and still takes its tickets there (a Decoder of batch 1 beside one of batch 1,368, say).
_OUTGROWN: list[Tensor] = []


def tickets(device: torch.device, count: int, user: str) -> Tensor:
    """``count`` int32 counters, zero between launches, for ``user`` (a kernel's name)."""
    have = _COUNTERS.get((device, user))
    if have is not None and have.numel() >= count:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, device=device, dtype=torch.int32)
    if have is not None:
        _OUTGROWN.append(have)
    _COUNTERS[(device, user)] = torch.zeros(max(count, 1024), device=device, dtype=torch.int32)
    return _COUNTERS[(device, user)]


def counters(device: torch.device, user: str) -> Tensor | None:
    """The counters ``user`` holds on ``device`` (tests check they are back at zero)."""
    return _COUNTERS.get((device, user))
