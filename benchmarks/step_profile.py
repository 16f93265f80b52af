"""Summarise a torch.profiler Chrome trace of training steps (torchtitan's ``--profiling.*`` output).

    python benchmarks/step_profile.py TRACE.json[.gz]

Per profiled step: wall time, GPU busy time (the union of kernel, copy and set intervals) and its
share of the wall, the largest GPU idle gaps, kernel launches, host-device syncs (the CUDA calls
that block the host), compiled-region calls and eager aten ops run on the host, and the kernels
that took the most GPU time. `titan_throughput.py --profile` calls :func:`summarize` on its runs.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}  # calls that block the host
STEP = re.compile(r"ProfilerStep#(\d+)")


def _load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total covered length and the gaps between covered stretches (sorted input not needed)."""
    total, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s))
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total, gaps


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def summarize(path: str | Path, top: int = 12) -> dict:
    events = [e for e in _load(Path(path)) if e.get("ph") == "X" and "dur" in e]
    steps = sorted(((int(m.group(1)), e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "user_annotation" and (m := STEP.fullmatch(e.get("name", "")))))
    result = {"trace": str(path), "steps": []}
    kernel_time: dict[str, float] = defaultdict(float)
    kernel_calls: dict[str, int] = defaultdict(int)
    for step, start, end in steps:
        inside = [e for e in events if start <= e["ts"] < end]
        gpu = [e for e in inside if e.get("cat") in GPU_CATS]
        busy, gaps = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
        gpu_span = (min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu)) if gpu else (start, start)
        runtime = [e for e in inside if e.get("cat") in ("cuda_runtime", "cuda_driver")]
        syncs = [e for e in runtime if e["name"] in SYNC_CALLS]
        d2h = [e for e in gpu if "DtoH" in e.get("name", "") or "Device -> Host" in e.get("name", "")]
        cpu_ops = [e for e in inside if e.get("cat") == "cpu_op"]
        compiled = [e for e in cpu_ops if e["name"].startswith("Torch-Compiled Region")]
        for e in gpu:
            if e.get("cat") == "kernel":
                kernel_time[e["name"]] += e["dur"]
                kernel_calls[e["name"]] += 1
        wall = end - start
        result["steps"].append({
            "step": step, "wall_ms": wall / 1e3, "gpu_busy_ms": busy / 1e3,
            "gpu_busy_pct": 100 * busy / wall if wall else 0.0,
            "gpu_span_ms": (gpu_span[1] - gpu_span[0]) / 1e3,
            "largest_gaps_ms": sorted(((b - a) / 1e3 for a, b in gaps), reverse=True)[:5],
            "gaps_over_100us": sum(1 for a, b in gaps if b - a > 100),
            "kernels": sum(1 for e in gpu if e.get("cat") == "kernel"),
            "host_syncs": len(syncs), "host_sync_ms": sum(e["dur"] for e in syncs) / 1e3,
            "device_to_host_copies": len(d2h),
            "compiled_region_calls": len(compiled),
            "aten_ops_on_host": sum(1 for e in cpu_ops if e["name"].startswith("aten::")),
        })
    n = max(1, len(steps))
    total = sum(kernel_time.values()) or 1.0
    result["top_kernels"] = [
        {"kernel": _short(k), "ms_per_step": t / n / 1e3, "share_pct": 100 * t / total, "calls_per_step": kernel_calls[k] / n}
        for k, t in sorted(kernel_time.items(), key=lambda kv: -kv[1])[:top]]
    return result


def format_summary(summary: dict) -> str:
    lines = []
    for s in summary["steps"]:
        lines.append(f"step {s['step']}: wall {s['wall_ms']:.1f} ms, GPU busy {s['gpu_busy_ms']:.1f} ms "
                     f"({s['gpu_busy_pct']:.0f} %), {s['kernels']} kernels, {s['host_syncs']} host syncs "
                     f"({s['host_sync_ms']:.1f} ms), {s['gaps_over_100us']} GPU gaps > 0.1 ms (largest "
                     f"{', '.join(f'{g:.2f}' for g in s['largest_gaps_ms'][:3])} ms), "
                     f"{s['compiled_region_calls']} compiled-region calls, {s['aten_ops_on_host']} aten ops on the host")
    for k in summary["top_kernels"]:
        lines.append(f"  {k['ms_per_step']:7.2f} ms {k['share_pct']:5.1f} % x{k['calls_per_step']:.0f}  {k['kernel']}")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg)
        print(format_summary(summarize(arg)))
