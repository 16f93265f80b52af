"""What the G-form decode state would buy the CuTe step, measured before building it (issue 21).

The step's update is H ← αH + Σ_r (γ x_r k_rᵀ + β x_prev,r k_prev,rᵀ), then it reads H q_r out: 3R + 1
FMAs a state element (13 at MIMO R = 4, 4 for SISO). Held without this token's term, G = H − γ Σ_r x_r k_rᵀ
(docs/benchmarks.md, kernel design notes), the update drops the γ terms: 2R + 1. Building that changes the
decode state's meaning in the oracle, both step kernels and the prefill hand-off; this script first times the
step kernel as it is against a probe that leaves the γ terms out (its numbers are wrong; its loads, stores
and the rest of its work are the step's), in one process: the most the design can gain (it adds R² dot
products of length N a head and R FMAs a column of the read-out, small beside the P·N·R it removes).

    python benchmarks/cute_step_probe.py [--batch 1,128] [--d-state 64,128] [--mimo-rank 1,4] [--json out.json]

Columns: the step kernel alone (µs, CUDA-graph replay, median), with and without the γ terms, and the state
traffic's time at the measured copy bandwidth (the kernel's floor at large batch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from decode import build_layer, copy_bandwidth, time_graph  # benchmarks/decode.py, beside this script


@contextlib.contextmanager
def without_this_tokens_terms():
    """The CuTe step compiled from a subclass whose update leaves out γ x_r k_rᵀ (the G-form's update count)."""
    import hybridlm.kernels.mamba3.cute as cute_step_api
    import hybridlm.kernels.mamba3.cute.step as step_module

    real = step_module.Mamba3DecodeStep

    class Probe(real):
        def _add_rank_terms(self, vals, cg, k, cb, k_prev):
            return [vals[s] + cb * k_prev[s] for s in range(len(vals))]

    step_module.Mamba3DecodeStep = Probe  # build_op imports the class at each compile
    cute_step_api._compiled.cache_clear()
    try:
        yield
    finally:
        step_module.Mamba3DecodeStep = real
        cute_step_api._compiled.cache_clear()


def kernel_us(layer, batch: int) -> tuple[float, torch.Tensor]:
    """The CuTe step kernel's µs on a random row and state, and its output (to tell the probe ran)."""
    from hybridlm.kernels import dispatch
    from hybridlm.testing import random_decode_state

    torch.manual_seed(2)
    cache = random_decode_state(layer, batch)
    proj = torch.randn(batch, layer.in_proj.out_features, device="cuda", dtype=torch.bfloat16)
    layout, params = layer.decode_layout(), layer.decode_params()
    step = lambda: dispatch.mamba3_decode_step(proj, cache.state, params, layout, backend="cute")  # noqa: E731
    ms = time_graph(step)
    torch.manual_seed(2)
    cache = random_decode_state(layer, batch)  # the same state again: one step's output to compare
    with torch.no_grad():
        out = step()
    return ms * 1e3, out.float()


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=ints, default=[1, 128])
    p.add_argument("--d-state", type=ints, default=[64, 128])
    p.add_argument("--mimo-rank", type=ints, default=[1, 4])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for rank in args.mimo_rank:
        for d_state in args.d_state:
            layer, _ = build_layer(args.d_model, d_state, args.headdim, rank, with_peer=False)
            for batch in args.batch:
                step_us, out = kernel_us(layer, batch)
                with without_this_tokens_terms():
                    probe_us, probe_out = kernel_us(layer, batch)
                if torch.equal(out, probe_out):
                    raise SystemExit("the probe's output equals the step's: the override did not reach the compile")
                state_us = 2 * batch * layer.state_bytes() / bandwidth * 1e6
                row = {"mimo_rank": rank, "d_state": d_state, "batch": batch, "step_us": step_us,
                       "without_gamma_terms_us": probe_us, "state_traffic_us": state_us,
                       "gain": 1 - probe_us / step_us, "device": torch.cuda.get_device_name(),
                       "copy_bandwidth_TBps": bandwidth / 1e12}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| R | d_state | batch | step µs | without γ terms µs | gain | state traffic µs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mimo_rank']} | {r['d_state']} | {r['batch']} | {r['step_us']:.1f} | "
              f"{r['without_gamma_terms_us']:.1f} | {100 * r['gain']:.1f} % | {r['state_traffic_us']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
