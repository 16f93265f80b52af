#!/usr/bin/env bash
# Issue 17: the Triton GPU tests, then the prefill benchmark with both backward designs.
# --tune: first the official module's full autotune on this GPU (minutes), saved as the peer configs.
source benchmarks/gpu/common.sh
configs=benchmarks/peer_autotune_h100.json
if [ "${1:-}" = "--tune" ]; then
  configs=benchmarks/peer_autotune_h200.json
  python3 benchmarks/prefill.py --tune --peer-configs "$configs" --seqlen 2048 --mimo-rank 0 2>&1 | tail -n 20
  cp "$configs" "$OUT/"
fi
python3 -m pytest -q tests/gpu/test_triton_gpu.py 2>&1 | tail -n 15 | tee "$OUT/tests.log"
python3 benchmarks/prefill.py --peer-configs "$configs" --backward-kernels 1,2 --seqlen 2048,8192,16384 \
  --json "$OUT/prefill.json" 2>&1 | tail -n 60 | tee "$OUT/prefill.log"
