"""spec -> model."""
from __future__ import annotations

import torch

from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.layouts.spec import ModelSpec


def build_model(spec: ModelSpec, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                *, seed: int | None = None) -> HybridLM:
    """Build and initialize a model (hybridlm.builder.model.init documents the recipe).

    The init recipe runs once the modules exist, after seeding with ``seed`` when one is given, so
    the values depend only on the seed (or the RNG state), not on how the model was constructed.
    ``device="meta"`` returns the model unmaterialized (for accounting, or to shard before
    ``model.to_empty(device=...)`` and ``model.init_weights()``); user block kinds must then define
    ``reset_parameters`` for parameters that are not Linear weights.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build_model expects a ModelSpec, got {type(spec).__name__}; "
                        "use hybridlm.load_spec(path) for YAML files")
    model = HybridLM(spec, device=device, dtype=dtype)
    if str(device) == "meta":
        return model
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model
