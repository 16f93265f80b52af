#!/usr/bin/env bash
# Issue 17: prefill.sh [tests] [table] [ncu] (default all three; together ≈ 9-10 minutes, near a call's
# limit on a fresh machine: split them over two calls there):
#   tests  the Triton GPU tests (tests/gpu/test_triton_gpu.py, ≈ 5.5 min; TESTS_K: a -k filter)
#   table  the prefill benchmark and a profile (TUNINGS: more variants of our layers, prefill.py --tunings,
#          e.g. "bias_rows=1024;bias_rows=512"; BACKWARD_KERNELS, default 1, e.g. 1,2 adds the split design;
#          SEQLEN, default 2048,8192,16384; PROFILE=" " leaves the profile out; NORM=1: the layers with the grouped
#          norm before out_proj, as in the hybrid presets, into prefill-norm.json/.log)
#   record every op's inputs and outputs of one bf16 layer forward+backward into $OUT/ops.pt (RECORD_ARGS: more
#          options of benchmarks/op_replay.py, e.g. "--d-state 64 --tunings output_block_t=16"; not in the default
#          set); then here: TRITON_INTERPRET=1 python benchmarks/op_replay.py --replay ops.pt
#   ncu    each scan kernel's time and executed instructions by ncu (ours and the official, one step, d_state 64)
#   stalls ncu's warp-state (stall reasons), scheduler, occupancy and memory sections of STALL_KERNELS (default
#          our states and backward chunk kernels), one step, d_state 64 (not in the default set)
# --tune D: instead, the official module's full autotune on this GPU at d_state D (one or "64,128"; its
# candidate configs compiled 16 processes at a time first), added to benchmarks/peer_autotune_h200.json
# (copy the file back into the repo between calls); then the benchmark with those choices, if BENCH=1.
source benchmarks/gpu/common.sh
if [ "${1:-}" = "--tune" ]; then
  configs=benchmarks/peer_autotune_h200.json
  python3 benchmarks/prefill.py --tune --peer-configs "$configs" --d-state "${2:-64}" --seqlen 2048 --mimo-rank 0 \
    2>&1 | tail -n 20 | tee "$OUT/tune.log"
  cp "$configs" "$OUT/"
  [ "${BENCH:-0}" = 1 ] || exit
fi
if [ "${1:-}" = "--tune" ]; then
  python3 benchmarks/prefill.py --peer-configs "$configs" --seqlen 2048,8192,16384 --json "$OUT/prefill.json" \
    2>&1 | tail -n 12 | tee "$OUT/prefill.log"
  exit
fi
configs=benchmarks/peer_autotune_h200.json
[ -f "$configs" ] || configs=benchmarks/peer_autotune_h100.json
for part in ${*:-tests table ncu}; do
  case "$part" in
    tests)
      python3 -m pytest -q -rf --tb=short $PYTEST_PARALLEL tests/gpu/test_triton_gpu.py ${TESTS_K:+-k "$TESTS_K"} \
        > "$OUT/tests.log" 2>&1
      tail -n 25 "$OUT/tests.log" ;;
    table)
      # straight into the log (not through tail): a call cut off at its limit still brings back the rows so far
      name=prefill${NORM:+-norm}
      python3 benchmarks/prefill.py --peer-configs "$configs" --backward-kernels "${BACKWARD_KERNELS:-1}" \
        --seqlen "${SEQLEN:-2048,8192,16384}" ${TUNINGS:+--tunings "$TUNINGS"} --json "$OUT/$name.json" \
        ${NORM:+--outproj-norm} ${PROFILE:---profile} > "$OUT/$name.log" 2>&1
      tail -n 150 "$OUT/$name.log" ;;
    record)  # every op's inputs and outputs of one bf16 layer step, for benchmarks/op_replay.py --replay here
      python3 benchmarks/op_replay.py --record "$OUT/ops.pt" ${RECORD_ARGS:-} 2>&1 | tail -n 3 | tee "$OUT/record.log" ;;
    ncu)
      if command -v ncu >/dev/null; then
        ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
          -k 'regex:_chunk_bwd|_states_kernel|_output_fwd|siso_fwd|dqkv|rotary_bias' \
          python3 benchmarks/scan_ncu.py --peer-configs "$configs" 2>&1 | grep -E "^  [_a-z]|duration|inst_executed" \
          | tee "$OUT/ncu.log"
      else
        echo "ncu is not on this machine" | tee "$OUT/ncu.log"
      fi ;;
    stalls)  # why a kernel waits: warp states, scheduler, occupancy and memory sections of STALL_KERNELS
      if command -v ncu >/dev/null; then
        ncu --clock-control none --profile-from-start off --section WarpStateStats --section SchedulerStats \
          --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
          -k "regex:${STALL_KERNELS:-_states_kernel|_chunk_bwd}" python3 benchmarks/scan_ncu.py --peer-configs "$configs" \
          > "$OUT/stalls.log" 2>&1
        grep -E "^  [_a-z]|Stall|stall|Warp Cycles|Issued|Eligible|Occupancy|Registers|Throughput|Duration" \
          "$OUT/stalls.log" | head -n 120
      else
        echo "ncu is not on this machine" | tee "$OUT/stalls.log"
      fi ;;
    *) echo "unknown part $part (tests, table, ncu, stalls)"; exit 2 ;;
  esac
done
tidy_out "*.json" "*.log" "*.pt"  # at most 8 files come back: the set-up's logs go into logs.tgz
