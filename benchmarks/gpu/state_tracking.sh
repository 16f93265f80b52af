#!/usr/bin/env bash
# Issue 19: the paper-protocol state-tracking sweep for $1 seconds of this call (default 570),
# models $2 (default mamba3,official). Resumes from runs/studies/state-tracking-paper when it is
# there (carried, or left by an earlier call on a warm machine).
source benchmarks/gpu/common.sh
seconds=${1:-570}; models=${2:-mamba3,official}
minutes=$(python3 -c "print(round(($seconds - 45) / 60, 2))")  # room to pack the folder
nvidia-smi dmon -s u -d 15 > "$OUT/dmon.txt" 2>&1 &
python3 -m hybridlm study state-tracking --set protocol=paper --out runs/studies/state-tracking-paper \
  --only "$models" --jobs 16 --max-minutes "$minutes" 2>&1 | tail -n 60 | tee "$OUT/study.log"
kill %1 2>/dev/null
find runs/studies/state-tracking-paper -name checkpoint.pt -size +0 | wc -l > "$OUT/checkpoints.txt"
bring_back st-paper runs/studies/state-tracking-paper
ls -la "$OUT"
