"""The init recipe of a built model.

* token embedding: N(0, init_std)
* every residual block's norm: ones; its mixer: the mixer's own ``reset_parameters`` when it has
  one (Mamba-3 keeps the official init: Kaiming-uniform in_proj, log-uniform Δ, biases 1, D 1),
  otherwise every Linear weight N(0, init_std)
* Linear layers that write into the residual stream (Mamba-3 ``out_proj``, attention ``wo``,
  SwiGLU ``w2`` and user kinds' declared ones): N(0, init_std / sqrt(n_blocks)), so the residual
  stream's variance stays O(1) with depth (GPT-2 / Megatron practice; the official Mamba LM
  divides its Kaiming init by sqrt(n_layer) for the same reason)
* final norm: ones; an untied LM head: N(0, init_std)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hybridlm.builder.model.registry import block_kind


def _reset(module: nn.Module, std: float) -> None:
    """A module's own ``reset_parameters`` if it has one, else N(0, std) Linears and recurse."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for child in module.children():
            _reset(child, std)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    spec = model.spec
    std = spec.init_std
    nn.init.normal_(model.tok_embeddings.weight, std=std)
    out_std = std / math.sqrt(max(len(model.layers), 1))
    for layer, resolved in zip(model.layers, spec.resolve()):
        layer.norm.reset_parameters()
        mixer = layer.mixer
        _reset(mixer, std)
        for name in block_kind(resolved.spec.kind).out_projections:
            nn.init.normal_(mixer.get_submodule(name).weight, std=out_std)
    model.norm.reset_parameters()
    if not spec.tie_embeddings:
        nn.init.normal_(model.output.weight, std=std)
