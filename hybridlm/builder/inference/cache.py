"""The decode state of a whole model: one cache per layer, one row per sequence."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class HybridCache:
    """Per-layer decode state (None for position-wise layers), one row per sequence.

    Rows may hold different numbers of tokens (a packed prefill of prompts of different lengths);
    the layer caches keep those lengths on the device. ``seqlen_offset`` is the longest row's
    length as the host knows it, for capacity checks without a device sync.
    """

    layers: list[Any]
    batch_size: int
    max_len: int
    seqlen_offset: int = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers if c is not None)

    def reset(self) -> "HybridCache":
        """Empty every row, in place (tensors keep their addresses: a captured CUDA graph stays valid)."""
        for c in self.layers:
            if c is not None:
                c.zero_()
        self.seqlen_offset = 0
        return self

    def rows(self, start: int, stop: int) -> "HybridCache":
        """Rows ``start:stop`` as a cache of their own whose tensors are views of this one's: a forward
        through it writes those rows in place (a prefill of a group of the batch's sequences). Host
        lengths start at 0: use it on empty rows, then :meth:`set_host_length` on the whole cache."""
        layers = [c.rows(start, stop) if c is not None else None for c in self.layers]
        return HybridCache(layers, stop - start, self.max_len)

    def set_host_length(self, n: int) -> None:
        """Set the host-side bound of the longest row to ``n`` tokens: CUDA-graph replays run no
        Python, so the code that replays them keeps this count."""
        self.seqlen_offset = n
        for c in self.layers:
            if hasattr(c, "set_host_length"):
                c.set_host_length(n)
