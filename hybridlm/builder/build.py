"""spec -> model."""
from __future__ import annotations

import torch

from hybridlm.builder.model import HybridLM
from hybridlm.layouts.spec import ModelSpec


def build_model(spec: ModelSpec, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                *, seed: int | None = None) -> HybridLM:
    """Build and initialize a model. ``device="meta"`` builds without memory (for accounting or
    for sharding first); call ``model.to_empty(device=...)`` and ``model.init_weights()`` later."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build_model expects a ModelSpec, got {type(spec).__name__}; "
                        "use hybridlm.load_spec(path) for YAML files")
    if seed is not None:
        torch.manual_seed(seed)
    model = HybridLM(spec, device=device, dtype=dtype)
    if str(device) != "meta":
        model.init_weights()
    return model
