"""Where the CuTe step's time goes, and what the G-form decode state would buy, before building it (issue 21).

The step's update is H ← αH + Σ_r (γ x_r k_rᵀ + β x_prev,r k_prev,rᵀ), then it reads H q_r out: 3R + 1
FMAs a state element (13 at MIMO R = 4, 4 for SISO). Held without this token's term, G = H − γ Σ_r x_r k_rᵀ
(docs/benchmarks.md, kernel design notes), the update drops the γ terms: 2R + 1. Building that changes the
decode state's meaning in the oracle, both step kernels and the prefill hand-off; this script first times the
step kernel as it is against probes compiled from subclasses that leave parts of its arithmetic out (their
numbers are wrong; their loads, stores and the rest of the work are the step's), in one process:

* ``no-gamma-terms``: the update without this token's terms, the G-form's count: the most that design can
  gain (it adds R² dot products of length N a head and R FMAs a column of the read-out, small beside the
  P·N·R it removes);
* ``no-rank-terms``: the update only αH (the k, k_prev reads go too);
* ``no-readout``: the read-out's dot products zero (the row sums' shuffles stay);
* ``state-only``: both of the last two: what the state's loads and stores and the rest cost alone.

    python benchmarks/cute_step_probe.py [--batch 1,128] [--d-state 128] [--mimo-rank 1,4] [--probes ...]
        [--json out.json]

Columns: the step kernel alone (µs, CUDA-graph replay, median) and each probe's, and the state traffic's time at
the measured copy bandwidth (the kernel's floor at large batch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from decode import build_layer, copy_bandwidth, time_graph  # benchmarks/decode.py, beside this script

PROBES = ("no-gamma-terms", "no-rank-terms", "no-readout", "state-only")


def probe_class(base, probe: str):
    """A subclass of the CuTe step that leaves the probe's part of the arithmetic out."""

    class Probe(base):
        def _add_rank_terms(self, vals, cg, k, cb, k_prev):
            if probe == "no-gamma-terms":
                return [vals[s] + cb * k_prev[s] for s in range(len(vals))]
            if probe in ("no-rank-terms", "state-only"):
                return list(vals)
            return super()._add_rank_terms(vals, cg, k, cb, k_prev)

        def _row_dot(self, vals, q):
            if probe in ("no-readout", "state-only"):
                return vals[0] * 0.0  # a zero of the state's type; the dot product's loads and FMAs go
            return super()._row_dot(vals, q)

    return Probe


@contextlib.contextmanager
def compiled_as(probe: str):
    """The CuTe step compiled from the probe's subclass while inside (build_op imports the class at each compile)."""
    import hybridlm.kernels.mamba3.cute as cute_step_api
    import hybridlm.kernels.mamba3.cute.step as step_module

    real = step_module.Mamba3DecodeStep
    step_module.Mamba3DecodeStep = probe_class(real, probe)
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
    p.add_argument("--d-state", type=ints, default=[128])
    p.add_argument("--mimo-rank", type=ints, default=[1, 4])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--probes", type=lambda s: s.split(","), default=list(PROBES), help=", ".join(PROBES))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    unknown = sorted(set(args.probes) - set(PROBES))
    if unknown:
        p.error(f"--probes: unknown {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    bandwidth = copy_bandwidth()
    rows = []
    for rank in args.mimo_rank:
        for d_state in args.d_state:
            layer, _ = build_layer(args.d_model, d_state, args.headdim, rank, with_peer=False)
            here = []
            for batch in args.batch:
                step_us, out = kernel_us(layer, batch)
                here.append(({"mimo_rank": rank, "d_state": d_state, "batch": batch, "step_us": step_us,
                              "state_traffic_us": 2 * batch * layer.state_bytes() / bandwidth * 1e6,
                              "device": torch.cuda.get_device_name(), "copy_bandwidth_TBps": bandwidth / 1e12},
                             out))
            for probe in args.probes:  # one compile a probe and layer: the batch is symbolic
                with compiled_as(probe):
                    for row, out in here:
                        row[f"{probe}_us"], probe_out = kernel_us(layer, row["batch"])
                        if torch.equal(out, probe_out):
                            raise SystemExit(f"probe {probe}: its output equals the step's, so the override did "
                                             "not reach the compile")
            for row, _ in here:
                print(json.dumps(row), flush=True)
                rows.append(row)
    probes = " | ".join(f"{p} µs" for p in args.probes)
    print(f"\n| R | d_state | batch | step µs | {probes} | state traffic µs |")
    print("|---" * (5 + len(args.probes)) + "|")
    for r in rows:
        print(f"| {r['mimo_rank']} | {r['d_state']} | {r['batch']} | {r['step_us']:.1f} | "
              + " | ".join(f"{r[f'{p}_us']:.1f}" for p in args.probes) + f" | {r['state_traffic_us']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
