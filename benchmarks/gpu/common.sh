# Sourced by the GPU call scripts: the offline stack, $OUT, and a helper that brings a folder back.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
source .gpu/setup.sh > "$OUT/setup.log" 2>&1 || { echo "source .gpu/setup.sh failed (see $OUT/setup.log)"; exit 2; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1

bring_back() {  # bring_back NAME FOLDER: FOLDER as $OUT/NAME.tgz.part-* (15 MiB parts)
  tar czf - "$2" | split -b 15M - "$OUT/$1.tgz.part-"
}
