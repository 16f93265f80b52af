#!/usr/bin/env bash
# Issue 19: the paper-protocol state-tracking sweep for $1 seconds of this call (default 570),
# models $2 (default mamba3,official). Resumes from runs/studies/state-tracking-paper when it is
# there (carried, or left by an earlier call on a warm machine). COMPILE: the step's mode
# (paper.compile; e.g. cuda-graph: measure first with `state_tracking.sh measure`). JOBS: side by side.
# TASKS: the tasks, a TOML list (default the study's, parity), e.g. TASKS='["arith"]' (3-layer models).
# LRS, WIDTHS: only these of the sweep's lrs / widths, TOML lists (default all), e.g. LRS='[1e-4, 1.93e-4, 5.18e-3, 1e-2]'
# (the runs keep their ids in the whole sweep, so their records join an earlier call's).
# RUNS: only the runs whose ids match these shell patterns, a TOML list, e.g. with TASKS='["parity", "arith"]':
# RUNS='["paper-*-arith-d32-*", "paper-real-mixer-parity-*-lr0.0001"]' (one call's mix of tasks and models).
# `state_tracking.sh checked SECONDS [MODELS]`: the cuda-graph GPU test first, then the sweep with cuda-graph
# if it passed, else eager.
# `state_tracking.sh measure [MODES] [COUNTS]`: instead, the GPU test of the compiled steps against eager
# (TEST=0 skips it), then steps/s side by side (default cuda-graph at 1,8,16; eager measured on the H200
# 2026-12-03: 64.0 steps/s alone, 15.9 a run at 16), ≈ 4 min. E.g. `TEST=0 state_tracking.sh measure
# "none default" 1,16`: Inductor's step (≈ 30 kernel calls against ≈ 180 eager, counted on the CPU) side by side.
# MPS (default 1; MPS=0 to run without): the runs under an MPS server of this call (benchmarks/gpu/mps.sh), so that
# their kernels share the SMs instead of taking turns (H200, 2026-12-04: 8 control runs 70.6-76.8 steps/s a run
# without, 82.8-107.6 under it, and 84-94 with 16 processes on the GPU; docs/results.md §1).
# $OUT keeps study.log, mps.txt and the run folder's parts; every other log goes into logs.tgz.
source benchmarks/gpu/common.sh
source benchmarks/gpu/mps.sh
export MPS=${MPS:-1}
start_mps
cuda_graph_test() {  # the GPU test of the compiled steps (cuda-graph) against eager, to $OUT/tests.log
  python3 -m pytest -q -p no:warnings tests/gpu/test_state_tracking_gpu.py -k "cuda-graph" 2>&1 | tail -n 15 \
    | tee "$OUT/tests.log"
}
if [ "${1:-}" = "measure" ]; then
  [ "${TEST:-1}" = 1 ] && cuda_graph_test  # TEST=0: steps/s only
  for mode in ${2:-cuda-graph}; do
    python3 -m hybridlm.studies.state_tracking_paper --side-by-side "${3:-1,8,16}" --seconds 45 \
      --set "paper.compile=\"$mode\"" --out "/tmp/sbs-$mode" 2>&1 | tail -n 40 | tee -a "$OUT/side-by-side.log"
  done
  stop_mps
  tidy_out tests.log side-by-side.log mps.txt
  exit
fi
if [ "${1:-}" = "checked" ]; then  # `checked SECONDS [MODELS]`: the cuda-graph GPU test, then the sweep in that
  # mode if it passed (else eager), for what is left of SECONDS (the test's own time included)
  start=$SECONDS
  cuda_graph_test
  if grep -q " passed" "$OUT/tests.log" && ! grep -q "failed\|error" "$OUT/tests.log"; then export COMPILE=cuda-graph
  else export COMPILE=none; fi
  echo "step mode: $COMPILE" | tee -a "$OUT/tests.log"
  set -- $(( ${2:-570} - (SECONDS - start) )) "${3:-mamba3,official}"
fi
seconds=${1:-570}; models=${2:-mamba3,official}
minutes=$(python3 -c "print(round(($seconds - 45) / 60, 2))")  # room to pack the folder
nvidia-smi dmon -s u -d 15 > "$OUT/dmon.txt" 2>&1 &
# Triton's cache inside the run folder, packed and carried with it: the official control's autotune
# choices (TRITON_CACHE_AUTOTUNING, set by the study) then survive the machine (2026-12-04: 8 control
# runs spent ~460 of 480 s waiting on their first autotune beside 8 busy runs).
export TRITON_CACHE_DIR=$PWD/runs/studies/state-tracking-paper/.triton-cache  # never a cache of the user's: pruned below
# `timeout`: whatever the study does past its deadline, the folder below is still packed and brought
# back (2026-12-04 a call ran into its 10-minute limit and lost the runs); the log goes to $OUT as it
# is written, not through a buffering `tail`.
timeout -k 5 $(( seconds - 35 )) python3 -m hybridlm study state-tracking --set protocol=paper \
  --out runs/studies/state-tracking-paper --only "$models" --jobs "${JOBS:-16}" --max-minutes "$minutes" \
  ${COMPILE:+--set "paper.compile=\"$COMPILE\""} ${TASKS:+--set "paper.tasks=$TASKS"} \
  ${LRS:+--set "paper.lr_subset=$LRS"} ${WIDTHS:+--set "paper.widths=$WIDTHS"} ${RUNS:+--set "paper.only_runs=$RUNS"} > "$OUT/study.log" 2>&1
echo "study exit status $?"; tail -n 40 "$OUT/study.log"
kill %1 2>/dev/null
find runs/studies/state-tracking-paper -name checkpoint.pt -size +0 | wc -l > "$OUT/checkpoints.txt"
# only the autotune choices travel back (the compiled kernels were 148 MB after 16 runs)
find "$TRITON_CACHE_DIR" -type f ! -name "*.autotune.json" -delete 2>/dev/null
bring_back st-paper runs/studies/state-tracking-paper
stop_mps
tidy_out study.log mps.txt tests.log side-by-side.log "st-paper.tgz.part-*"
ls -la "$OUT"
