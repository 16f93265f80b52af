"""Training throughput and MFU under torchtitan: hybrid vs an equal-size Transformer, 1 rank vs 2 (FSDP).

    python benchmarks/titan_throughput.py --out results.json [--steps 200] [--specs hybrid-small,transformer-small]

Each configuration is its own `hybridlm train` run (torch.compile per block, bf16 mixed precision,
synthetic NIAH rows at seq_len 2048); tokens/s and MFU are torchtitan's own per-step metrics (its
FLOP formula, fed by hybridlm's accounting), averaged over the logged steps after warm-up.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torchtitan colours its log on a terminal
LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+).*?tps:\s*([\d,]+)\s+tflops:\s*([\d.,]+)\s+mfu:\s*([\d.]+)%")


def run(spec: str, nproc: int, steps: int, batch: int, seq_len: int, dump: Path, extra: list[str],
        timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "hybridlm.cli.main", "train", spec, "--config", "1gpu", "--nproc", str(nproc),
           "--training.steps", str(steps), "--training.local_batch_size", str(batch),
           "--training.seq_len", str(seq_len), "--metrics.log_freq", "10", "--metrics.no-enable-tensorboard",
           "--checkpoint.no-enable", "--job.dump_folder", str(dump), "--hybrid.data", "task:niah-1",
           "--hybrid.loss_on", "all", *extra]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(cmd, -9, e.stdout or "", e.stderr or "")
        proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
        proc.stderr = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    wall = time.time() - start
    rows = [(int(s), float(loss), float(tps.replace(",", "")), float(tf.replace(",", "")), float(mfu))
            for s, loss, tps, tf, mfu in LINE.findall(ANSI.sub("", proc.stdout))]
    steady = [r for r in rows if r[0] > max(20, steps // 5)]  # skip compile and warm-up
    result = {"spec": spec, "nproc": nproc, "steps": steps, "local_batch": batch, "seq_len": seq_len,
              "returncode": proc.returncode, "wall_s": round(wall, 1), "logged_steps": len(rows)}
    if steady:
        result.update(tokens_per_s_per_rank=statistics.mean(r[2] for r in steady),
                      tokens_per_s=statistics.mean(r[2] for r in steady) * nproc,
                      tflops_per_rank=statistics.mean(r[3] for r in steady), mfu_pct=statistics.mean(r[4] for r in steady),
                      first_loss=rows[0][1], last_loss=rows[-1][1])
    else:
        result["tail"] = (proc.stdout[-2000:] + proc.stderr[-3000:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", default="hybrid-small,transformer-small")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dump", default="/tmp/titan-bench")
    parser.add_argument("--out", default="titan_throughput.json")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args, extra = parser.parse_known_args()
    results = []
    for spec in args.specs.split(","):
        for nproc in map(int, args.nprocs.split(",")):
            r = run(spec, nproc, args.steps, args.batch, args.seq_len, Path(args.dump) / f"{spec}-{nproc}", extra,
                    args.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # keep what finished


if __name__ == "__main__":
    main()
