"""What a Mamba-3 layer does per token on parity, to see why a run learns or not (docs/results.md §1).

Parity needs a '1' to turn a rotated state pair by π and nothing to decay the state: per head h and
pair s, the turn per token in units of π is Δ_h·tanh(θ_s), so we want Δ·tanh(θ) ≈ ±1 on '1' tokens
and ≈ 0 on '0' tokens, and |A|·Δ ≈ 0 (no decay) on every token. :func:`measure` reads these from the
layer's own projections on a batch:

* ``turn_on_1[h][s]``, ``turn_on_0[h][s]``: mean Δ·tanh(θ) over the '1' (the '0') tokens;
* ``decay[h]``: mean |A|·Δ over every input token (the symbols, not '=').

It works for any mixer with ``in_proj``, ``in_proj_layout()``, ``dt_bias``, ``a_activation``,
``A_floor`` and ``discretization``: hybridlm's Mamba-3 and the study's official control.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.kernels.mamba3.shared import step_scalars


def is_mamba_mixer(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("in_proj", "in_proj_layout", "dt_bias", "a_activation"))


def step_quantities(mixer: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Δ (B, L, H), |A|·Δ (B, L, H) and tanh(θ) (B, L, S) or None, from the mixer input u (B, L, d_model)."""
    seg = mixer.in_proj_layout().split(mixer.in_proj(u))
    dt, adt, _ = step_scalars(seg["dt"], seg["A"], seg.get("trap"), mixer.dt_bias, a_activation=mixer.a_activation,
                              A_floor=mixer.A_floor, discretization=mixer.discretization)
    angle = seg.get("angle")
    return dt, -adt, None if angle is None or angle.shape[-1] == 0 else torch.tanh(angle.float())


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the (B, L) positions where ``mask`` holds; values (B, L, ...). NaN where none does."""
    weights = mask.to(values.dtype).view(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum((0, 1)) / weights.sum((0, 1))


@torch.no_grad()
def measure(model: nn.Module, ids: Tensor, one_id: int, zero_id: int, symbols: int | None = None) -> list[dict]:
    """One dict per Mamba layer of ``model`` (a HybridLM): ``layer``, ``turn_on_1``, ``turn_on_0``
    (H lists of S floats; empty lists without rotation), ``decay`` (H floats). ``ids`` (B, L); only
    the first ``symbols`` positions count (default: all but the last, the '=')."""
    inputs: dict[int, Tensor] = {}
    hooks = [layer.mixer.register_forward_pre_hook(lambda mod, args, kwargs, i=i: inputs.__setitem__(i, args[0]),
                                                   with_kwargs=True)
             for i, layer in enumerate(model.layers) if is_mamba_mixer(layer.mixer)]
    try:
        model.features(ids)
    finally:
        for hook in hooks:
            hook.remove()
    symbols = ids.shape[1] - 1 if symbols is None else symbols
    ones, zeros = ids[:, :symbols] == one_id, ids[:, :symbols] == zero_id
    out = []
    for i, u in sorted(inputs.items()):
        dt, decay, tanh_angle = step_quantities(model.layers[i].mixer, u[:, :symbols])
        entry = {"layer": i, "decay": _masked_mean(decay, torch.ones_like(ones)).tolist()}
        if tanh_angle is None:
            entry["turn_on_1"] = entry["turn_on_0"] = [[] for _ in range(dt.shape[-1])]
        else:
            turn = dt.unsqueeze(-1) * tanh_angle.unsqueeze(-2)  # (B, L, H, S), in units of π
            entry["turn_on_1"] = _masked_mean(turn, ones).tolist()
            entry["turn_on_0"] = _masked_mean(turn, zeros).tolist()
        out.append(entry)
    return out
