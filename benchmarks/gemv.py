"""The decode GEMVs on the GPU: cuBLAS (what the blocks ran before) next to the decode GEMV kernel
(hybridlm/kernels/decode_gemv/), at the 1.5B presets' shapes, with a config sweep of the kernel.

    python benchmarks/gemv.py [--rows 1,8,16] [--sweep] [--json out.json]

Each case is what a block boundary and the block's first projection cost at decode sizes:

- ``in_proj``: mamba3-1.5b's boundary + in_proj: the add + RMSNorm kernel then cuBLAS, against
  ``norm_gemv`` (one kernel);
- ``swiglu``: the boundary + w1, w3 and the gate: norm kernel, two cuBLAS GEMVs and the gate kernel;
  norm kernel and ``silu_mul_gemv``; ``norm_gemv`` with both weights (one kernel);
- ``qkv``: hybrid-1.5b's attention boundary + q, k, v (16 and 4 heads of 128): norm kernel and three
  cuBLAS GEMVs, against ``norm_gemv`` with the three weights stacked;
- ``plain``: one GEMV of a (2048, 4096) weight (out_proj, w2) by cuBLAS and by the kernel's plain form.

Timing: ``reps`` calls captured in one CUDA graph and replayed (median of 20 replays), each call on
its own copy of the weights, so that the weights read exceed the 50 MB L2 cache and come from
memory as in a model step. ``GB/s`` counts the weight bytes; ``of copy`` divides that by the
device-to-device copy bandwidth measured in the same run. ``--sweep`` times the kernel's form of
every case at each (BLOCK_N, BLOCK_K, num_warps, num_stages, split-K) of a grid of 24 on tensor
cores (SWEEP_GRID), at 1 and the most rows, then at one row 24 configs of the CUDA-core form
(ONE_ROW_GRID), to pin its configs (a few minutes, most of it compiling).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
D_MODEL, HIDDEN = 2048, 4096  # the 1.5B presets
L2_BYTES = 50 * 2**20
DEVICE = "cuda"
# the kernel configs --sweep times, on tensor cores (rows on CUDA cores were up to 5x slower at 8-16
# rows and no faster at 1: H200, 2026-12-03): BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES, SPLIT_K
# (CUDA_CORES_AT_ONE_ROW off: at one row the default now takes the one-row form, timed by the grid below)
SWEEP_KNOBS = ("CUDA_CORES_AT_ONE_ROW", "BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES", "SPLIT_K")
SWEEP_GRID = list(itertools.product((False,), (16, 32), (256, 512), (4, 8), (3,), (1, 2, 4)))
# and at one row, the CUDA-core form with its own blocks (CUDA_CORES_AT_ONE_ROW): 24 more configs
ONE_ROW_KNOBS = ("CUDA_CORES_AT_ONE_ROW", "ONE_ROW_BLOCK_N", "ONE_ROW_BLOCK_K", "NUM_WARPS", "SPLIT_K")
ONE_ROW_GRID = list(itertools.product((True,), (4, 8, 16), (512, 1024), (4, 8), (1, 2)))


def copy_bandwidth() -> float:
    src = torch.empty(1 << 28, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (graph_ms(lambda i: dst.copy_(src), 1) * 1e-3)


def graph_ms(call, reps: int) -> float:
    """ms per call: ``call(i)`` for i in range(reps) captured in one CUDA graph, median of 20 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(reps):  # warm-up: compile, cuBLAS handles
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            call(i)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / reps


def weight_copies(n: int, k: int, count: int) -> list[torch.Tensor]:
    return [torch.randn(n, k, device=DEVICE, dtype=BF16) / k ** 0.5 for _ in range(count)]


def copies_for(weight_bytes: int) -> int:
    """Enough copies that one graph's weights are 4× the L2 cache."""
    return max(2, -(-4 * L2_BYTES // weight_bytes))


def cases(rows: int, in_proj_width: int):
    """(case, variant, weight bytes per call, call(i)) for every variant of every case."""
    from hybridlm.kernels.decode_gemv import norm_gemv, silu_mul_gemv
    from hybridlm.kernels.rmsnorm import add_rms_norm
    from hybridlm.kernels.swiglu_gate import silu_mul_

    h, residual = (torch.randn(rows, D_MODEL, device=DEVICE, dtype=BF16) for _ in range(2))
    g = torch.rand(D_MODEL, device=DEVICE, dtype=BF16) + 0.5
    triton = {"backend": "triton"}

    def norm():
        return add_rms_norm(h, residual, g, 1e-5, out_dtype=BF16, backend="triton")[0]

    n = copies_for(in_proj_width * D_MODEL * 2)
    w = weight_copies(in_proj_width, D_MODEL, n)
    nbytes = in_proj_width * D_MODEL * 2
    yield "in_proj", "norm + cuBLAS", nbytes, lambda i: F.linear(norm(), w[i % n])
    yield "in_proj", "norm_gemv", nbytes, lambda i: norm_gemv(h, residual, g, 1e-5, w[i % n], **triton)

    n = copies_for(2 * HIDDEN * D_MODEL * 2)
    w1, w3 = weight_copies(HIDDEN, D_MODEL, n), weight_copies(HIDDEN, D_MODEL, n)
    nbytes = 2 * HIDDEN * D_MODEL * 2

    def unfused_swiglu(i):
        x = norm()
        return silu_mul_(F.linear(x, w1[i % n]), F.linear(x, w3[i % n]), **triton)

    yield "swiglu", "norm + 2 cuBLAS + gate", nbytes, unfused_swiglu
    yield "swiglu", "norm + silu_mul_gemv", nbytes, lambda i: silu_mul_gemv(norm(), w1[i % n], w3[i % n], **triton)
    yield "swiglu", "norm_gemv", nbytes, lambda i: norm_gemv(h, residual, g, 1e-5, w1[i % n], w3[i % n], **triton)

    n = copies_for(3 * D_MODEL * D_MODEL)  # q (2048 rows), k and v (512 each): 3,072 rows of 2,048
    wq, wk, wv = (weight_copies(rows_, D_MODEL, n) for rows_ in (D_MODEL, D_MODEL // 4, D_MODEL // 4))
    nbytes = 3 * D_MODEL * D_MODEL

    def unfused_qkv(i):
        x = norm()
        return F.linear(x, wq[i % n]), F.linear(x, wk[i % n]), F.linear(x, wv[i % n])

    yield "qkv", "norm + 3 cuBLAS", nbytes, unfused_qkv
    yield "qkv", "norm_gemv", nbytes, \
        lambda i: norm_gemv(h, residual, g, 1e-5, wq[i % n], stacked=(wk[i % n], wv[i % n]), **triton)

    yield from plain_cases(rows)


def plain_cases(rows: int):
    from hybridlm.kernels.decode_gemv.triton import gemv

    x = torch.randn(rows, HIDDEN, device=DEVICE, dtype=BF16)
    n = copies_for(D_MODEL * HIDDEN * 2)
    w = weight_copies(D_MODEL, HIDDEN, n)
    yield "plain", "cuBLAS", D_MODEL * HIDDEN * 2, lambda i: F.linear(x, w[i % n])
    yield "plain", "gemv", D_MODEL * HIDDEN * 2, lambda i: gemv(x, w[i % n])


def sweep(rows: int, bandwidth: float, reps: int, in_proj_width: int, only: set[str] | None = None,
          knobs: tuple[str, ...] = SWEEP_KNOBS, grid: list[tuple] | None = None) -> list[dict]:
    """The kernel's configs (``grid`` of ``knobs``, default SWEEP_GRID) on every case's kernel
    variant (norm_gemv, the plain gemv)."""
    from hybridlm.kernels.decode_gemv import triton as kernel

    grid = SWEEP_GRID if grid is None else grid
    default = tuple(getattr(kernel, knob) for knob in knobs)
    plain_split_k = kernel.PLAIN_SPLIT_K
    rows_out = []
    try:
        # one case at a time, as cases() yields it: its calls close over variables the next case rebinds
        for case, variant, nbytes, call in cases(rows, in_proj_width):
            if variant not in ("norm_gemv", "gemv") or (only and case not in only):
                continue
            for config in grid:
                for knob, value in zip(knobs, config):
                    setattr(kernel, knob, value)
                    if knob == "SPLIT_K":  # the plain form has its own
                        kernel.PLAIN_SPLIT_K = value
                row = dict(rows=rows, case=case, **{knob.lower(): v for knob, v in zip(knobs, config)})
                try:
                    ms = graph_ms(call, reps)
                except Exception as e:  # a config that does not compile or launch: say so, go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                else:
                    row.update(us=round(ms * 1e3, 2), of_copy=round(nbytes / (ms * 1e-3) / bandwidth, 3))
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    finally:
        for knob, value in zip(knobs, default):
            setattr(kernel, knob, value)
        kernel.PLAIN_SPLIT_K = plain_split_k
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16", help="decode batch sizes (rows of x), at most 16")
    p.add_argument("--reps", type=int, default=48, help="calls per CUDA graph")
    p.add_argument("--sweep", action="store_true", help="also time the kernel's configs (a few minutes)")
    p.add_argument("--sweep-cases", default="", help="only these cases in the sweep (in_proj,swiglu,qkv,plain)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemv.py times CUDA kernels: run it on a machine with a GPU")
    from hybridlm import build_model, get_preset

    in_proj_width = build_model(get_preset("mamba3-1.5b"), device="meta").layers[0].mixer.in_proj.weight.shape[0]
    bandwidth = copy_bandwidth()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                copy_bandwidth_TBps=bandwidth / 1e12, in_proj_width=in_proj_width)
    print(json.dumps(meta), flush=True)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for case, variant, nbytes, call in cases(rows, in_proj_width):
            row = dict(rows=rows, case=case, variant=variant)
            try:
                ms = graph_ms(call, args.reps)
            except Exception as e:  # one failing variant should not cost the rest of the run
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            else:
                row.update(us=round(ms * 1e3, 2), GBps=round(nbytes / (ms * 1e-3) / 1e9),
                           of_copy=round(nbytes / (ms * 1e-3) / bandwidth, 3))
            print(json.dumps(row), flush=True)
            results.append(row)
    swept = []
    if args.sweep:
        for rows in sorted({1, max(int(r) for r in args.rows.split(","))}):
            swept += sweep(rows, bandwidth, args.reps, in_proj_width,
                           set(args.sweep_cases.split(",")) if args.sweep_cases else None)
        if 1 in {int(r) for r in args.rows.split(",")}:
            swept += sweep(1, bandwidth, args.reps, in_proj_width,
                           set(args.sweep_cases.split(",")) if args.sweep_cases else None, ONE_ROW_KNOBS, ONE_ROW_GRID)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, results=results, sweep=swept), indent=1) + "\n")


if __name__ == "__main__":
    main()
