# Sourced by the GPU call scripts: the offline stack, $OUT, and a helper that brings a folder back.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
source .gpu/setup.sh > "$OUT/setup.log" 2>&1 || { echo "source .gpu/setup.sh failed (see $OUT/setup.log)"; exit 2; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
# pytest's -n for the GPU tests: their time goes mostly to Triton's compiles, one process at a time, so
# PYTEST_JOBS processes (default 8; pytest-xdist is in the image) share the GPU and the 16 cores; 1: one process.
# Their measured errors merge into one JSON (hybridlm.testing.write_results).
PYTEST_PARALLEL=""
if [ "${PYTEST_JOBS:-8}" != 1 ] && python3 -c "import xdist" 2>/dev/null; then PYTEST_PARALLEL="-n ${PYTEST_JOBS:-8}"; fi

bring_back() {  # bring_back NAME FOLDER: FOLDER as $OUT/NAME.tgz.part-* (15 MiB parts)
  tar czf - "$2" | split -b 15M - "$OUT/$1.tgz.part-"
}

tidy_out() {  # tidy_out KEEP...: every file of $OUT but those matching a KEEP pattern into $OUT/logs.tgz, since
  # a call brings back at most 8 files (2026-12-04 the run folder's archive was the one left behind)
  local name pattern pack=()
  for name in $(cd "$OUT" && ls -A); do
    [ "$name" = logs.tgz ] && continue
    for pattern in "$@"; do
      # shellcheck disable=SC2053
      [[ "$name" == $pattern ]] && continue 2
    done
    pack+=("$name")
  done
  [ "${#pack[@]}" -gt 0 ] || return 0
  # an earlier script of the same call may have left a logs.tgz: add to it (2026-12-05 a second tidy_out
  # replaced the first one's archive, and the recorded ops.pt with it)
  local merged out_dir
  merged=$(mktemp -d)
  out_dir=$(cd "$OUT" && pwd)
  [ -f "$out_dir/logs.tgz" ] && tar xzf "$out_dir/logs.tgz" -C "$merged"
  (cd "$out_dir" && mv "${pack[@]}" "$merged"/) &&
    (cd "$merged" && tar czf "$out_dir/logs.tgz" $(ls -A)) && rm -rf "$merged"
}
