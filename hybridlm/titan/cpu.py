"""Let torchtitan 0.2.2 run on a machine without an accelerator (CI, laptops).

torchtitan picks ``cuda`` when no accelerator is found and calls CUDA-only memory functions. Before
torchtitan is imported we make the device type ``cpu`` and give ``torch.cpu`` the few calls its
memory monitor makes; with the device type ``cpu`` the process group becomes gloo.
"""
from __future__ import annotations

import types

import torch


def needs_cpu_shim() -> bool:
    return torch._utils._get_available_device_type() is None


def apply_cpu_shim() -> None:
    import sys

    if "torchtitan.tools.utils" in sys.modules:
        raise RuntimeError("apply_cpu_shim() must run before torchtitan is imported")
    torch._utils._get_available_device_type = lambda: "cpu"
    cpu = torch.cpu
    cpu.get_device_name = lambda *a, **k: "cpu"
    cpu.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=1, name="cpu")
    cpu.reset_peak_memory_stats = lambda *a, **k: None
    cpu.empty_cache = lambda *a, **k: None
    cpu.memory_stats = lambda *a, **k: {}
    cpu.current_device = lambda: 0  # gloo's barrier(device_ids=[...]) wants an int
    cpu.set_device = lambda *a, **k: None
