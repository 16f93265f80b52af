#!/usr/bin/env bash
# Issue 21: the inference GPU tests, the GEMV micro-benchmark, batch-1 generation, and where a
# batch-1 step's time goes. $@: the parts to run (default tests gemv generate, ≈ 5 minutes):
#   tests     tests/gpu/test_inference_e2e_gpu.py (TESTS_K: a pytest -k filter)
#   attention tests/gpu/test_attention_gpu.py (FA4) and test_decode_attention_gpu.py (the Triton decode kernel)
#   gemv      benchmarks/gemv.py at the kernel's defaults; gemv-sweep adds its 24-config sweep (GEMV_ROWS: its --rows,
#             default 1,8,16)
#   generate  benchmarks/generate.py's batch-1 rows (VARIANTS, default fused,unfused)
#   tables    issue 21's two tables in one run: generate.py's every case, fused, the Table 7 decode sampled at
#             B_SAMPLES contexts (default 3): batch 1 (a), then L 512 and 16K at the Transformer-fit batch and
#             128 (b); the Transformer first. H100 2026-12-05: all 19 rows in 331 s (session 27; 14 in 540 s
#             before Decoder.extend filled the later contexts); if one call does not hold them all, the same
#             command again on the warm machine measures the rest (TABLES_FRESH=1: anew)
#   profile   benchmarks/decode_profile.py: the kernels of graph-replayed steps (PROFILE_MODELS, ATTENTION,
#             GEMV_KNOBS: knob sets, ';' between; BATCH, default 1, and PROMPT, default 2048; SAMPLING: where the
#             greedy choice runs, graph (default, as generate() runs it) or outside, or both: graph,outside)
#   choose    profile the knob sets GEMV_SETS (and ATTENTION backends) of PROFILE_MODELS, then generate's batch-1
#             rows with the fastest of the first model
#   step      tests/gpu/test_step_kernels_gpu.py, the CuTe and Triton decode-step kernels (TESTS_K: a -k filter)
#   probe     benchmarks/cute_step_probe.py: the CuTe step kernel beside probes that leave parts of its arithmetic
#             out (this token's γ terms: what the G-form state would gain; all rank terms; the read-out; both),
#             R 1,4, d_state 128, batch 1,128; ≈ 2 min (10 compiles)
#   layer     benchmarks/decode.py's layer-step table at LAYER_BATCH (default 1,128), LAYER_D_STATE (64,128), R 1,4, for
#             BACKENDS (default "cute"; a knob's A/B: e.g. "cute,cute[cute_max_rows=2]"), the official step too if PEER=1
source benchmarks/gpu/common.sh
parts=${*:-tests gemv generate}
for part in $parts; do
  case "$part" in
    tests)
      HYBRIDLM_RESULTS_E2E="$OUT/e2e-errors.json" python3 -m pytest -q $PYTEST_PARALLEL -rf --tb=short -p no:warnings \
        tests/gpu/test_inference_e2e_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -n 60 | tee "$OUT/tests.log" ;;
    attention)
      HYBRIDLM_RESULTS_ATTENTION="$OUT/attention-errors.json" HYBRIDLM_RESULTS_DECODE_ATTENTION="$OUT/decode-attention-errors.json" \
        python3 -m pytest -q $PYTEST_PARALLEL -rf --tb=short -p no:warnings tests/gpu/test_attention_gpu.py tests/gpu/test_decode_attention_gpu.py 2>&1 | tail -n 30 | tee "$OUT/attention-tests.log" ;;
    gemv)
      python3 benchmarks/gemv.py --rows "${GEMV_ROWS:-1,8,16}" --json "$OUT/gemv.json" 2>&1 | tail -n 40 | tee "$OUT/gemv.log" ;;
    gemv-sweep)
      python3 benchmarks/gemv.py --rows "${GEMV_ROWS:-1,8,16}" --sweep --json "$OUT/gemv.json" 2>&1 | tail -n 40 \
        | tee "$OUT/gemv.log" ;;
    generate)
      python3 benchmarks/generate.py --only 'a:*' --variants "${VARIANTS:-fused,unfused}" --json "$OUT/generate.json" \
        2>&1 | grep -v Warning | tail -n 40 | tee "$OUT/generate.log" ;;
    probe)
      python3 benchmarks/cute_step_probe.py --json "$OUT/cute-step-probe.json" 2>&1 | grep -v Warning \
        | tail -n 20 | tee "$OUT/cute-step-probe.log" ;;
    tables)
      # bounded (TABLES_SECONDS, default 540) so that what it measured comes back: the JSON gets each row as it
      # comes. The rows live in runs/ (kept between calls on a warm machine): the next call, right after, goes
      # on with the cases not yet measured (--skip-measured); TABLES_FRESH=1 starts over.
      mkdir -p runs/inference; tables=runs/inference/generate-tables.json
      [ "${TABLES_FRESH:-0}" = 1 ] && rm -f "$tables"
      timeout -k 5 "${TABLES_SECONDS:-540}" python3 benchmarks/generate.py --variants fused --b-samples "${B_SAMPLES:-3}" \
        --json "$tables" --skip-measured --markdown "$OUT/generate-tables.md" > "$OUT/generate-tables.log" 2>&1
      echo "generate.py exit status $?"; cp "$tables" "$OUT/generate-tables.json"
      [ -f "$OUT/generate-tables.md" ] || python3 benchmarks/generate.py --report "$tables" > "$OUT/generate-tables.md"
      grep -v Warning "$OUT/generate-tables.log" | tail -n 60 ;;
    profile)
      python3 benchmarks/decode_profile.py --model "${PROFILE_MODELS:-hybrid-1.5b}" --attention "${ATTENTION:-auto}" \
        --gemv-knobs "${GEMV_KNOBS:-}" --batch "${BATCH:-1}" --prompt "${PROMPT:-2048}" --sampling "${SAMPLING:-graph}" \
        --json "$OUT/decode-profile.json" \
        2>&1 | grep -v Warning | tail -n 80 | tee "$OUT/profile.log" ;;
    choose)
      python3 benchmarks/decode_profile.py --model "${PROFILE_MODELS:-hybrid-1.5b}" --attention "${ATTENTION:-auto}" \
        --gemv-knobs "${GEMV_SETS:-}" --top 14 --json "$OUT/decode-profile-sets.json" \
        2>&1 | grep -v Warning | tail -n 200 | tee "$OUT/profile-sets.log"
      { read -r knobs; read -r attention; } < <(python3 benchmarks/decode_profile.py --best "$OUT/decode-profile-sets.json")
      echo "fastest: knobs '$knobs', attention $attention" | tee -a "$OUT/profile-sets.log"
      python3 benchmarks/generate.py --only 'a:*' --variants fused --gemv-knobs "$knobs" --attention "$attention" \
        --json "$OUT/generate-chosen.json" 2>&1 | grep -v Warning | tail -n 40 | tee "$OUT/generate-chosen.log" ;;
    step)
      HYBRIDLM_RESULTS_STEP="$OUT/step-errors.json" python3 -m pytest -q $PYTEST_PARALLEL -rf --tb=short -p no:warnings \
        tests/gpu/test_step_kernels_gpu.py ${TESTS_K:+-k "$TESTS_K"} > "$OUT/step-tests.log" 2>&1
      tail -n 30 "$OUT/step-tests.log" ;;
    layer)
      peer=--no-peer
      [ "${PEER:-0}" = 1 ] && peer=""
      python3 benchmarks/decode.py --batch "${LAYER_BATCH:-1,128}" --d-state "${LAYER_D_STATE:-64,128}" --mimo-rank 1,4 \
        --backends "${BACKENDS:-cute}" $peer --json "$OUT/decode-layer.json" > "$OUT/layer.log" 2>&1
      grep -v Warning "$OUT/layer.log" | tail -n 20 ;;
    *) echo "unknown part $part (tests, attention, gemv, gemv-sweep, generate, tables, probe, profile, choose, step, layer)"; exit 2 ;;
  esac
done
# the JSON results come back as they are, every log inside logs.tgz (a call brings back at most 8 files)
tidy_out "*.json" "generate-tables.md"
