#!/usr/bin/env bash
# Issue 21: the inference GPU tests, the GEMV micro-benchmark, then batch-1 generation fused vs unfused.
source benchmarks/gpu/common.sh
HYBRIDLM_RESULTS_E2E="$OUT/e2e-errors.json" python3 -m pytest -q -rf tests/gpu/test_inference_e2e_gpu.py 2>&1 | tail -n 40 | tee "$OUT/tests.log"
python3 benchmarks/gemv.py --sweep --json "$OUT/gemv.json" 2>&1 | tail -n 40 | tee "$OUT/gemv.log"
python3 benchmarks/generate.py --only 'a:*' --variants fused,unfused --json "$OUT/generate.json" 2>&1 \
  | tail -n 40 | tee "$OUT/generate.log"
