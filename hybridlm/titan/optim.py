"""AdamW with weight decay only where it belongs.

No decay on norm weights, biases, vectors and on the parameters each block kind lists as
``no_decay`` (Mamba-3's per-head scalars and vectors: dt_bias, D, B/C biases, MIMO vectors) — the
Mamba recipe; decay on matmul weights and the embedding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer

from hybridlm.builder.model.registry import block_kind


def decays(name: str, param: nn.Parameter, no_decay: frozenset[str] = frozenset()) -> bool:
    """Whether parameter ``name`` decays; ``no_decay``: the last name parts its block kind exempts."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in no_decay or leaf == "bias" or param.ndim < 2:
        return False
    return "norm" not in name.lower()


def _kind_exempt(model: nn.Module) -> dict[int, frozenset[str]]:
    """id(parameter) -> the no-decay names of the block kind it belongs to."""
    out: dict[int, frozenset[str]] = {}
    spec = getattr(model, "spec", None)
    if spec is None:
        return out
    for layer, resolved in zip(model.layers, spec.resolve(), strict=True):
        names = frozenset(block_kind(resolved.spec.kind).no_decay)
        for p in layer.parameters():
            out[id(p)] = names
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    exempt = _kind_exempt(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p, exempt.get(id(p), frozenset())) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GroupedDecayOptimizers(OptimizersContainer):
    """torchtitan's container (checkpointing, resharding, hooks) with two parameter groups per part."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type, optimizer_kwargs: dict[str, Any]):
        self.optimizers = []
        self.model_parts = model_parts
        all_params = []
        kwargs = dict(optimizer_kwargs)
        weight_decay = kwargs.pop("weight_decay", 0.0)
        for model in model_parts:
            groups = param_groups(model, weight_decay)
            self.optimizers.append(optimizer_cls(groups, **kwargs))
            all_params += [p for g in groups for p in g["params"]]
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


def build_optimizers(model_parts: list[nn.Module], optimizer_config, parallel_dims=None, **unused):
    name = optimizer_config.name
    classes = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if name not in classes:
        from hybridlm.errors import HybridLMError

        raise HybridLMError(f"optimizer.name={name!r} is not supported; choose Adam or AdamW")
    impl = optimizer_config.implementation
    kwargs = {"lr": optimizer_config.lr, "betas": (optimizer_config.beta1, optimizer_config.beta2),
              "eps": optimizer_config.eps, "weight_decay": optimizer_config.weight_decay,
              "fused": impl == "fused", "foreach": impl == "foreach"}
    return GroupedDecayOptimizers(model_parts, classes[name], kwargs)
