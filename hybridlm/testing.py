"""Helpers for tests that compare Mamba-3 implementations (ours, the reference, the official one).

The default init hides layout bugs (biases all 1, D 1, mimo_x = 1/R for every rank): randomize
every such parameter before comparing (docs/mamba3.md §8).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


@torch.no_grad()
def randomize_mamba3_(module: nn.Module, seed: int = 0, angle_scale: float = 8.0) -> nn.Module:
    """Give every constant-at-init parameter of a Mamba-3 module distinct random values, and
    enlarge the angle rows of ``in_proj`` so that rotations matter."""
    gen = torch.Generator().manual_seed(seed)

    def rand(t: Tensor, lo: float, hi: float) -> Tensor:
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t)

    for name in ("B_bias", "C_bias"):
        if hasattr(module, name):
            p = getattr(module, name)
            p.copy_(rand(p, -1.0, 2.0))
    module.D.copy_(rand(module.D, -1.0, 2.0))
    module.dt_bias.add_(rand(module.dt_bias, -0.5, 0.5))
    for norm in ("B_norm", "C_norm", "norm"):
        if hasattr(module, norm):
            w = getattr(module, norm).weight
            w.copy_(rand(w, 0.5, 1.5))
    for name in ("mimo_x", "mimo_z", "mimo_o"):
        if hasattr(module, name):
            p = getattr(module, name)
            p.copy_(rand(p, -1.0, 1.0))
    if getattr(module, "num_rope_angles", 0):
        module.in_proj.weight[-module.num_rope_angles:] *= angle_scale
    return module


def write_results(env_var: str, results: dict) -> None:
    """Write a test module's measured errors as JSON to the path in ``env_var``, if it is set. Under
    pytest-xdist (tests spread over processes: ``pytest -n N``) each worker merges its results into what the
    other workers of the same run wrote, under a file lock; a file from another run is replaced."""
    import fcntl
    import json
    import os

    path = os.environ.get(env_var)
    if not path or not results:
        return
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        return
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {}
        if os.path.exists(path):
            with open(path) as f:
                merged = json.load(f)
            if merged.pop("_xdist_run", None) != run:
                merged = {}
        with open(path, "w") as f:
            json.dump({**_merged(merged, results), "_xdist_run": run}, f, indent=2)


def _merged(old: dict, new: dict) -> dict:
    """``old`` updated by ``new``, nested dicts merged key by key (two workers fill one table's rows)."""
    out = dict(old)
    for key, value in new.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def random_decode_state(module: nn.Module, batch: int, seed: int = 0):
    """A decode cache of a Mamba-3 module filled with plausible random values (angles in [0, 2π))."""
    import math

    gen = torch.Generator().manual_seed(seed)
    cache = module.allocate_cache(batch)
    for t, scale in ((cache.ssm, 0.5), (cache.k, 1.0), (cache.v, 1.0)):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * scale)
    cache.angle.copy_(torch.rand(cache.angle.shape, generator=gen, dtype=torch.float64) * 2 * math.pi)
    return cache


def scan_kwargs(flat: dict) -> dict:
    """Keywords for a scan or step call from one flat dict: the :class:`ScanParams` fields become
    ``params``, the rest (``z``, ``initial_state``, ...) stay keywords. Lets a test vary one
    parameter with ``{**kw, "D": ...}``."""
    from hybridlm.kernels.mamba3.contract import ScanParams

    fields = {k: v for k, v in flat.items() if k in ScanParams._fields}
    return {"params": ScanParams(**fields), **{k: v for k, v in flat.items() if k not in ScanParams._fields}}


def reference_walk(dt: Tensor, lam: Tensor, rate: Tensor | None, theta0: Tensor, lengths: list[int]):
    """The Triton token walk's function (hybridlm/kernels/mamba3/triton/angles.py) as the torch ops it
    replaced: γ, scale and θ of packed sequences of ``lengths``, from dt, lam (T, H), rate (T, S) or
    None and theta0 (NS, H, S). θ is not reduced mod 2π (compare its cos and sin)."""
    from hybridlm.kernels.mamba3.shared import angle_increment

    gammas, scales, thetas = [], [], []
    start = 0
    for i, n in enumerate(lengths):
        d, lm = dt[start:start + n], lam[start:start + n]
        gamma = lm * d
        shifted = torch.cat([(d * (1 - lm))[1:], d.new_zeros(min(n, 1), d.shape[1])])
        gammas.append(gamma)
        scales.append(gamma + shifted)
        if rate is not None:
            thetas.append(theta0[i] + angle_increment(rate[start:start + n], d).cumsum(0))
        start += n
    theta = torch.cat(thetas) if rate is not None else dt.new_zeros(dt.shape[0], dt.shape[1], 0)
    return torch.cat(gammas), torch.cat(scales), theta
