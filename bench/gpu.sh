#!/usr/bin/env bash
# Measurements (a) bare loop and (b) end to end with the device chosen automatically (CUDA when
# present), reporting items/s and, where nvidia-smi exists, GPU utilisation during each.
#
#   bench/gpu.sh [extra bench.pipeline arguments]      ITEMS=500 OUT=var/bench/gpu
#
# On a machine without a GPU it runs the same measurements on the CPU and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ITEMS=${ITEMS:-500}
OUT=${OUT:-var/bench/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MMBATCH_DEVICE=${MMBATCH_DEVICE:-auto}

device=$("$PY" -c "from models.device import pick_device; print(pick_device('$MMBATCH_DEVICE'))")
echo "device: $device"
SMI_PID=
if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null 2>&1; then
    # A GPU takes bigger encoder batches than the CPU defaults (the task batch stays the same).
    export MMBATCH_IMAGE_BATCH_SIZE=${MMBATCH_IMAGE_BATCH_SIZE:-32}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
        --format=csv,noheader,nounits -lms 250 > "$OUT/nvidia-smi.csv" &
    SMI_PID=$!
    trap '[[ -n $SMI_PID ]] && kill $SMI_PID 2>/dev/null || true' EXIT
else
    echo "no CUDA device (or no nvidia-smi): running on the CPU, no GPU utilisation to report"
fi

"$PY" -m bench.pipeline --items "$ITEMS" --only a,b --out "$OUT/pipeline.json" "$@"

if [[ -n $SMI_PID ]]; then
    kill "$SMI_PID" 2>/dev/null || true
    SMI_PID=
    "$PY" - "$OUT/pipeline.json" "$OUT/nvidia-smi.csv" <<'PY'
import csv, datetime as dt, json, sys
result = json.load(open(sys.argv[1]))
samples = []
for row in csv.reader(open(sys.argv[2])):
    try:
        stamp = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((stamp, float(row[1]), float(row[2])))
    except (ValueError, IndexError):
        continue
for name in ("a_bare", "b_end_to_end"):
    phase = result.get(name) or {}
    start, end = phase.get("started_at"), phase.get("ended_at")
    inside = [s for s in samples if start and end and start <= s[0] <= end]
    if inside:
        util = [s[1] for s in inside]
        print(f"{name}: {phase['items_per_s']} items/s, GPU utilisation mean "
              f"{sum(util) / len(util):.0f}% max {max(util):.0f}%, memory max "
              f"{max(s[2] for s in inside):.0f} MiB ({len(inside)} samples)")
    else:
        print(f"{name}: {phase.get('items_per_s')} items/s, no nvidia-smi samples in its window")
PY
fi
