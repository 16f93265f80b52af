"""spec -> model."""
from __future__ import annotations

import torch

from hybridlm.builder.model import HybridLM
from hybridlm.layouts.spec import ModelSpec


def build_model(spec: ModelSpec, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                *, seed: int | None = None) -> HybridLM:
    """Build and initialize a model (hybridlm.builder.init documents the recipe).

    The model is constructed on the meta device, materialized on ``device`` and initialized once,
    so the values depend only on ``seed`` (or the global RNG state), not on how it was built.
    ``device="meta"`` returns it unmaterialized (for accounting, or to shard before
    ``model.to_empty(device=...)`` and ``model.init_weights()``).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build_model expects a ModelSpec, got {type(spec).__name__}; "
                        "use hybridlm.load_spec(path) for YAML files")
    model = HybridLM(spec, device="meta", dtype=dtype)
    if str(device) == "meta":
        return model
    model.to_empty(device=device or "cpu")
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model
