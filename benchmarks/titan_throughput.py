"""Training throughput and MFU under torchtitan, hybrid next to Transformer, in one table.

    python benchmarks/titan_throughput.py --out results.json                  # the whole table
    python benchmarks/titan_throughput.py --out results.json --only small     # a part (results merge)
    python benchmarks/titan_throughput.py --out results.json --table          # print the table only
    python benchmarks/titan_throughput.py --out r.json --only t-b8-auto --profile --tree OLD_TREE

Each configuration is its own `hybridlm train` run on one GPU with specs/train/1gpu.toml (bf16
autocast, torch.compile per block, selective activation checkpointing `op`), seq_len 2048,
synthetic NIAH rows with the loss on every token, or (the `packed` rows) the parity task with the
paper's length curriculum: 3..40-symbol examples packed into each row, so every row holds tens of
documents. tokens/s and MFU are torchtitan's own per-step metrics averaged over the logged steps
after warm-up; MFU = tokens/s × FLOPs/token ÷ the GPU's peak bf16 rate, with FLOPs/token from
hybridlm's accounting: 6 × matmul weights (LM head included) + 3 × the forward sequence mixing
(attention QKᵀ/AV without a causal discount, torchtitan's own term, and the Mamba-3 chunked scan).
Peak memory is torchtitan's max reserved; "first step" is the wall time from launch to the first
step's log line (start-up and compilation). Graph breaks and recompiles are counted from
TORCH_LOGS=graph_breaks,recompiles. `--profile` also profiles two steps (torch.profiler) and adds
benchmarks/step_profile.py's summary; `--tree DIR` runs the hybridlm source tree in DIR instead
(an older commit, for before/after).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import format_summary, summarize  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torchtitan colours its log on a terminal
LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.naninf]+).*?memory:\s*(-?[\d.]+)GiB.*?tps:\s*([\d,]+)"
                  r"\s+tflops:\s*([\d.,]+)\s+mfu:\s*([\d.]+)%")
NIAH = ("task:niah-1", "all", [])
PARITY_PACKED = ("task:parity", "answers", ["--hybrid.curriculum"])

# label: (spec, local batch, attention backend or None, data)
CONFIGS: dict[str, tuple[str, int, str | None, tuple]] = {
    **{f"{m[0]}-b{b}-{a}": (f"{m}-small", b, a, NIAH)
       for m in ("transformer", "hybrid") for b in (8, 16) for a in ("auto", "sdpa")},
    "mamba3-b8": ("mamba3-small", 8, None, NIAH),
    "mamba3-b16": ("mamba3-small", 16, None, NIAH),
    "mimo-b8": ("mamba3-mimo-small", 8, None, NIAH),
    "mimo-b16": ("mamba3-mimo-small", 16, None, NIAH),
    "t1.5b-b4-auto": ("transformer-1.5b", 4, "auto", NIAH),
    "h1.5b-b4-auto": ("hybrid-1.5b", 4, "auto", NIAH),
    "t-b16-auto-packed": ("transformer-small", 16, "auto", PARITY_PACKED),
    "h-b16-auto-packed": ("hybrid-small", 16, "auto", PARITY_PACKED),
}
GROUPS = {
    "small": [k for k in CONFIGS if k[0] in "th" and k.count("-") == 2 and "1.5b" not in k],
    "mamba": ["mamba3-b8", "mamba3-b16", "mimo-b8", "mimo-b16"],
    "large": ["t1.5b-b4-auto", "h1.5b-b4-auto"],
    "packed": ["t-b16-auto-packed", "h-b16-auto-packed"],
}


def run(label: str, steps: int, seq_len: int, dump: Path, extra: list[str], timeout: float,
        profile: bool = False, tree: str | None = None, log_freq: int = 10, profile_top: int = 12) -> dict:
    spec, batch, attention, (data, loss_on, data_flags) = CONFIGS[label]
    cmd = [sys.executable, "-m", "hybridlm.cli.main", "train", spec, "--config", "1gpu",
           "--training.steps", str(steps), "--training.local_batch_size", str(batch),
           "--training.seq_len", str(seq_len), "--metrics.log_freq", str(log_freq), "--metrics.no-enable-tensorboard",
           "--checkpoint.no-enable", "--job.dump_folder", str(dump), "--hybrid.data", data,
           "--hybrid.loss_on", loss_on, "--hybrid.log", "torchtitan", *data_flags, *extra]  # its own step lines
    if profile:  # two profiled steps at the end (3 of warm-up before them)
        cmd += ["--profiling.enable_profiling", "--profiling.save_traces_folder", "profile",
                "--profiling.profile_freq", str(steps), "--profiling.profiler_warmup", "3",
                "--profiling.profiler_active", "2"]
    env = dict(os.environ, TORCH_LOGS="graph_breaks,recompiles", PYTHONUNBUFFERED="1")
    if attention:
        env["HYBRIDLM_ATTENTION"] = attention
    cwd = None
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).resolve()), env.get("PYTHONPATH", "")])
        cwd = tree
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    reader.start()
    rows, first_step_s, out_lines = [], None, []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    for line in proc.stdout:
        out_lines.append(line)
        m = LINE.search(ANSI.sub("", line))
        if m:
            if first_step_s is None:
                first_step_s = time.monotonic() - start
            s, loss, mem, tps, tf, mfu = m.groups()
            rows.append((int(s), float(loss), float(mem), float(tps.replace(",", "")), float(tf.replace(",", "")),
                         float(mfu)))
    proc.wait()
    timer.cancel()
    reader.join(timeout=10)
    err = "".join(stderr_lines)
    steady = [r for r in rows if r[0] > max(10, steps // 3)]  # skip compilation and warm-up
    result = {"label": label, "spec": spec, "local_batch": batch, "attention": attention or "-", "data": data,
              "steps": steps, "seq_len": seq_len, "returncode": proc.returncode,
              "wall_s": round(time.monotonic() - start, 1), "first_step_s": first_step_s,
              "graph_breaks": err.count("Graph break in user code"), "recompiles": err.count("Recompiling function"),
              # a recompile for another block kind is expected (one graph per kind); one for a new
              # size or value is what a changing batch would cause
              "shape_recompiles": sum(1 for line in err.splitlines()
                                      if re.search(r"- \d+/\d+: ", line) and "___check_type_id" not in line),
              "losses": [(r[0], r[1]) for r in rows], "tree": tree or "."}
    breaks = sorted({line.split("]", 2)[-1].strip()[:160] for line in err.splitlines()
                     if "Graph break in user code" in line or "Graph break from" in line})
    result["graph_break_lines"] = breaks[:8]
    if steady:
        result.update(tokens_per_s=statistics.mean(r[3] for r in steady), mfu_pct=statistics.mean(r[5] for r in steady),
                      tflops=statistics.mean(r[4] for r in steady), peak_memory_gib=max(r[2] for r in rows))
    else:
        result["tail"] = "".join(out_lines)[-2000:] + err[-3000:]
    if profile:
        traces = sorted(Path(cwd or ".", dump).glob("profile/iteration_*/rank0_trace.json"))
        if traces:
            result["profile"] = summarize(traces[-1], top=profile_top)
            print(format_summary(result["profile"]), flush=True)
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(results: list[dict]) -> str:
    """Markdown, one row per run, and the hybrid ÷ Transformer ratios where both sides ran."""
    by = {r["label"]: r for r in results if r.get("tree", ".") == "."}
    head = "| config | preset | data | batch | attention | tokens/s | MFU | peak mem GiB | first step s | graph breaks | shape recompiles |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for label in CONFIGS:
        r = by.get(label)
        if not r:
            continue
        tps = f"{r['tokens_per_s'] / 1e3:.1f}K" if r.get("tokens_per_s") else f"failed ({r['returncode']})"
        mfu = f"{r['mfu_pct']:.1f} %" if r.get("mfu_pct") is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        first = f"{r['first_step_s']:.0f}" if r.get("first_step_s") else "-"
        data = "packed parity" if "packed" in label else "NIAH rows"
        lines.append(f"| {label} | {r['spec']} | {data} | {r['local_batch']} | {r['attention']} | {tps} | {mfu} | {mem} "
                     f"| {first} | {r['graph_breaks']} | {r.get('shape_recompiles', '-')} |")
    pairs = [(f"h-b{b}-{a}", f"t-b{b}-{a}") for b in (8, 16) for a in ("auto", "sdpa")]
    pairs += [("h1.5b-b4-auto", "t1.5b-b4-auto"), ("h-b16-auto-packed", "t-b16-auto-packed")]
    lines += ["", "| hybrid vs Transformer | MFU ratio | tokens/s ratio |", "|---|---|---|"]
    for h, t in pairs:
        if h in by and t in by:
            lines.append(f"| {h} / {t} | {ratio(by[h].get('mfu_pct'), by[t].get('mfu_pct'))} "
                         f"| {ratio(by[h].get('tokens_per_s'), by[t].get('tokens_per_s'))} |")
    lines += ["", "| batch 8 ÷ batch 16 (tokens/s) | ratio |", "|---|---|"]
    for a, b in (("h-b8-auto", "h-b16-auto"), ("h-b8-sdpa", "h-b16-sdpa"), ("mamba3-b8", "mamba3-b16"),
                 ("mimo-b8", "mimo-b16"), ("t-b8-auto", "t-b16-auto")):
        if a in by and b in by:
            lines.append(f"| {a} / {b} | {ratio(by[a].get('tokens_per_s'), by[b].get('tokens_per_s'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="all", help="comma-separated labels or groups (" + ", ".join(GROUPS) + ")")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dump", default="/tmp/titan-bench")
    parser.add_argument("--out", default="titan_throughput.json")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--profile", action="store_true", help="profile two steps of each run")
    parser.add_argument("--profile-top", type=int, default=12, help="kernels listed per profiled run")
    parser.add_argument("--tree", default=None, help="run the hybridlm source tree in this folder")
    parser.add_argument("--log-freq", type=int, default=10, help="log every N steps (1: every loss, for checks)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    if not args.table:
        labels = []
        for item in (CONFIGS if args.only == "all" else args.only.split(",")):
            labels += GROUPS.get(item, [item])
        for label in labels:
            if label not in CONFIGS:
                parser.error(f"unknown configuration {label!r}; known: {', '.join(CONFIGS)}")
        for label in labels:
            tag = f"{label}@{args.tree}" if args.tree else label
            r = run(label, args.steps, args.seq_len, Path(args.dump) / tag.replace("/", "_"), extra, args.timeout,
                    args.profile, args.tree, args.log_freq, args.profile_top)
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "profile")}), flush=True)
            results = [x for x in results if (x["label"], x.get("tree", ".")) != (label, r["tree"])] + [r]
            out.write_text(json.dumps(results, indent=2) + "\n")  # keep what finished
    print(table(results))


if __name__ == "__main__":
    main()
