#!/usr/bin/env bash
# Issues 15/17: training throughput and MFU under torchtitan, hybrid next to Transformer
# (benchmarks/titan_throughput.py). $1: the configurations (labels or groups; default: the
# batch-16 pair of the small presets and the 1.5B pair), $2: seconds per run (default 240).
source benchmarks/gpu/common.sh
only=${1:-t-b16-auto,h-b16-auto,large}
python3 benchmarks/titan_throughput.py --only "$only" --out "$OUT/titan.json" --timeout "${2:-240}" 2>&1 \
  | tail -n 40 | tee "$OUT/titan.log"
python3 benchmarks/titan_throughput.py --out "$OUT/titan.json" --table 2>&1 | tee -a "$OUT/titan.log"
