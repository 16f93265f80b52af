#!/usr/bin/env bash
# Issue 21: the inference GPU tests, the GEMV micro-benchmark, then batch-1 generation fused vs
# unfused. $@: the parts to run (tests, gemv, generate; default all three, ≈ 10 minutes: near a
# call's limit, so a fresh machine is safer with `tests gemv` in one call and `generate` in the next).
source benchmarks/gpu/common.sh
parts=${*:-tests gemv generate}
for part in $parts; do
  case "$part" in
    tests)
      HYBRIDLM_RESULTS_E2E="$OUT/e2e-errors.json" python3 -m pytest -q -rf tests/gpu/test_inference_e2e_gpu.py 2>&1 \
        | tail -n 40 | tee "$OUT/tests.log" ;;
    gemv)
      python3 benchmarks/gemv.py --sweep --json "$OUT/gemv.json" 2>&1 | tail -n 40 | tee "$OUT/gemv.log" ;;
    generate)
      python3 benchmarks/generate.py --only 'a:*' --variants fused,unfused --json "$OUT/generate.json" 2>&1 \
        | tail -n 40 | tee "$OUT/generate.log" ;;
    *) echo "unknown part $part (tests, gemv, generate)"; exit 2 ;;
  esac
done
