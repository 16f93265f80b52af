# Sourced by GPU call scripts. With MPS=1, start_mps starts an MPS server for this call. Without one, the
# processes of one GPU take turns in time slices of the whole card: 16 tiny state-tracking runs side by
# side made 254 steps/s in all where one alone made 64. Under MPS their kernels can share the SMs at
# once. The pipe and log folders are private, so only this call's processes connect. The card's settings
# (compute mode included) stay as they are. The server stops when the calling script exits. If it cannot
# serve a CUDA context, the call runs without it and says so in $OUT/mps.txt.
MPS_HOME=${MPS_HOME:-/tmp/hybridlm-mps}
# a default in ${…:-…} would lose its inner quotes (the 2026-12-04 call's check failed on that)
DEFAULT_MPS_CHECK='python3 -c "import torch; torch.ones(1, device=\"cuda\").sum().item()"'
MPS_CHECK=${MPS_CHECK:-$DEFAULT_MPS_CHECK}

stop_mps() {
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || return 0
  # quit waits for the server's clients: bounded, so a stuck client cannot hold the call to its limit
  echo quit | timeout 20 nvidia-cuda-mps-control > /dev/null 2>&1
  cp -r "$CUDA_MPS_LOG_DIRECTORY" "$OUT/mps-log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

start_mps() {
  [ "${MPS:-0}" = 1 ] || return 0
  if ! command -v nvidia-cuda-mps-control > /dev/null; then
    echo "MPS=1: nvidia-cuda-mps-control is not on PATH; running without MPS" | tee -a "$OUT/mps.txt"
    return 0
  fi
  export CUDA_MPS_PIPE_DIRECTORY=$MPS_HOME/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_HOME/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && eval "$MPS_CHECK" > "$OUT/mps-check.log" 2>&1; then
    trap stop_mps EXIT
    echo "MPS=1: MPS server up (pipe $CUDA_MPS_PIPE_DIRECTORY)" | tee -a "$OUT/mps.txt"
  else
    stop_mps
    echo "MPS=1: the MPS server did not serve a CUDA context (see mps-check.log); running without MPS" \
      | tee -a "$OUT/mps.txt"
  fi
}
