"""Where a decode step's time goes: the kernels of CUDA-graph replays under torch.profiler.

    python benchmarks/decode_profile.py [--model hybrid-1.5b] [--steps 50] [--attention auto,triton] [--json out.json]
    python benchmarks/decode_profile.py --model mamba3-1.5b,mamba3-mimo-1.5b --batch 128 --prompt 512

The step as users run it (``hybridlm.Decoder``, random bf16 weights, ``--batch`` sequences (default 1)
after a ``--prompt``-token prompt (default 2,048), the captured graph replayed), profiled over
``--steps`` steps. Per step: wall time, kernels, the GPU busy time (the union of kernel intervals)
and so the time between kernels, then the kernels by name: count per step and device microseconds per step, largest first. What ``generate.py``'s
ms per step is made of: weights read, other kernels, and gaps. ``--attention``: profile each model
once per attention backend of its decode steps (``HYBRIDLM_ATTENTION``: ``auto``, ``fa4``, ``triton``
(hybridlm/kernels/decode_attention/, split-KV), ``sdpa``). ``--gemv-knobs``: once per set of the
decode GEMVs' knobs (hybridlm/kernels/decode_gemv/knobs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from hybridlm.kernels.decode_gemv.knobs import set_knobs


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def next_tokens(decoder, tokens, sampling: str):
    """One greedy step: ``graph``, as generate() runs it (the choice inside the step's graph, fed back from
    the device after the first step: Decoder.step_greedy); ``outside``, the logits copied out and the choice
    after the replay, fed back in."""
    from hybridlm.builder.inference.generate import greedy

    if sampling == "graph":
        return decoder.step_greedy(tokens if not decoder.greedy_fed else None)
    return greedy(decoder.step(tokens))


def profile(model_name: str, steps: int, prompt: int, attention: str, batch: int = 1, sampling: str = "graph") -> dict:
    from hybridlm.builder import Decoder, build_model
    from hybridlm.builder.inference.generate import greedy
    from hybridlm.layouts.presets import spec_or_preset

    os.environ["HYBRIDLM_ATTENTION"] = attention  # read by the registry at each choice
    device = torch.device("cuda")
    model = build_model(spec_or_preset(model_name), device=device, dtype=torch.bfloat16, seed=0).eval()
    decoder = Decoder(model, batch, prompt + 3 * steps + 8)
    ids = torch.randint(0, model.spec.vocab_size, (batch, prompt), device=device)
    tokens = greedy(decoder.prefill(ids))
    for _ in range(steps):  # capture and warm
        tokens = next_tokens(decoder, tokens, sampling)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = next_tokens(decoder, tokens, sampling)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = next_tokens(decoder, tokens, sampling)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = defaultdict(list)
    intervals = []
    for e in kernels:
        by_name[e.name].append(e.time_range.elapsed_us())
        intervals.append((e.time_range.start, e.time_range.end))
    busy_us = busy_time(intervals) / steps
    rows = sorted(({"kernel": name[:110], "per_step": len(t) / steps, "us_per_step": sum(t) / steps}
                   for name, t in by_name.items()), key=lambda r: -r["us_per_step"])
    return {"model": model_name, "attention": attention, "sampling": sampling, "device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "steps": steps, "batch": batch, "prompt": prompt, "wall_ms_per_step": wall_ms,
            "kernels_per_step": len(kernels) / steps, "gpu_busy_ms_per_step": busy_us / 1e3,
            "kernel_sum_ms_per_step": sum(r["us_per_step"] for r in rows) / 1e3, "kernels": rows}


def fastest(profiles: list[dict]) -> tuple[str, dict]:
    """(the first model profiled, its profile of the least wall time a step)."""
    first = profiles[0]["model"]
    return first, min((r for r in profiles if r["model"] == first), key=lambda r: r["wall_ms_per_step"])


def print_kernels(r: dict, top: int) -> None:
    print("| kernel | per step | µs per step |\n|---|---|---|")
    for row in r["kernels"][:top]:
        print(f"| {row['kernel']} | {row['per_step']:.0f} | {row['us_per_step']:.1f} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hybrid-1.5b", help="preset or spec (comma-separated: several)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences a step (the MIMO ÷ SISO question is at 128)")
    p.add_argument("--top", type=int, default=25, help="kernels printed per model")
    p.add_argument("--attention", default="auto", help="attention backends of the decode steps to profile (auto, fa4, triton, sdpa)")
    p.add_argument("--gemv-knobs", default="", help="decode GEMV knobs, e.g. CUDA_CORES_AT_ONE_ROW=1,ONE_ROW_BLOCK_N=8; "
                   "';' between sets profiles each (an empty set: the defaults)")
    p.add_argument("--sampling", default="graph", help="where the greedy choice runs: graph (inside the step's graph, "
                   "as generate() runs it), outside (after the replay, the logits copied out); comma-separated: each")
    p.add_argument("--json", help="write every model's profile here")
    p.add_argument("--best", type=Path, default=None,
                   help="instead: print the knobs (line 1) and attention backend (line 2) of the fastest profile of "
                        "the first model in this --json file")
    args = p.parse_args(argv)
    if args.best:
        first, best = fastest(json.loads(args.best.read_text()))
        print(",".join(f"{k}={int(v)}" for k, v in best["gemv_knobs"].items()))
        print(best["attention"])
        return {"best": best}
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py profiles CUDA-graph replays: it needs a GPU")
    results, defaults = [], {}
    for knob_set in args.gemv_knobs.split(";"):
        try:
            knobs, defaults = set_knobs(knob_set, defaults)
        except ValueError as e:
            raise SystemExit(f"--gemv-knobs: {e}")
        for name, attention, sampling in ((m, a, s) for m in args.model.split(",") for a in args.attention.split(",")
                                          for s in args.sampling.split(",")):
            r = profile(name, args.steps, args.prompt, attention, args.batch, sampling)
            r["gemv_knobs"] = knobs
            results.append(r)
            print(f"## {name} at batch {args.batch} (attention {attention}, greedy {sampling}, {knobs or 'default GEMV'}): "
                  f"{r['wall_ms_per_step']:.3f} ms a step (wall), {r['kernels_per_step']:.0f} kernels, "
                  f"GPU busy {r['gpu_busy_ms_per_step']:.3f} ms, between kernels "
                  f"{r['wall_ms_per_step'] - r['gpu_busy_ms_per_step']:.3f} ms")
            print_kernels(r, args.top)
            torch.cuda.empty_cache()
    print("## summary: ms a step (wall)")
    for r in results:
        print(f"{r['model']:20s} attention {r['attention']:7s} greedy {r['sampling']:7s} {r['gemv_knobs'] or 'default'}: "
              f"{r['wall_ms_per_step']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return {"profiles": results}


if __name__ == "__main__":
    main()
