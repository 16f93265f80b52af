"""Parameter matching: resize a spec's SwiGLU so that two architectures have equal size."""
from __future__ import annotations

from hybridlm.builder.model.accounting import account
from hybridlm.layouts.blocks import SwiGLUSpec
from hybridlm.layouts.spec import ModelSpec


def match_swiglu_hidden(spec: ModelSpec, target_params: int, symbol: str = "F", multiple: int = 16) -> ModelSpec:
    """The same spec with SwiGLU ``symbol`` resized (to a multiple of ``multiple``) so that its
    parameter count is as close to ``target_params`` as that granularity allows."""
    block = spec.blocks.get(symbol)
    if not isinstance(block, SwiGLUSpec):
        raise ValueError(f"block {symbol!r} is not a SwiGLU block")
    n_ffn = spec.symbols().count(symbol)
    hidden = block.resolved_hidden(spec.d_model)
    per_unit = 3 * spec.d_model * n_ffn  # w1, w2, w3 each hold d_model weights per hidden unit
    gap = target_params - account(spec).total_params
    new_hidden = max(multiple, round((hidden + gap / per_unit) / multiple) * multiple)
    return spec.model_copy(update={"blocks": {**spec.blocks, symbol: SwiGLUSpec(hidden=new_hidden)}})
