#!/usr/bin/env bash
# GPU check (issue 4): the paper's full schedule on bottle, then inference throughput.
# Usage: bash benchmarks/gpu.sh MVTEC_ROOT [OUT_DIR]
# On an H200 (results/gpu.md) the fit took 6.5 min while last.pt was written every epoch (now at most
# every 30 s: 200 s of training steps), test about 20 s, speed.py 2.2 min (4 compilations).
# Needs the project's venv (make .venv/.installed), or PY=python3 with adtr importable.
# CUDA is picked without any flag. Writes gpu_fit.json, gpu_speed.{json,md} and the logs to OUT_DIR.
set -euo pipefail
ROOT=${1:?usage: gpu.sh MVTEC_ROOT [OUT_DIR]}
OUT=${2:-benchmarks/results}
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-500}  # the paper's schedule; smaller only to try the script out
RUN=$(mktemp -d)/gpu_bottle
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
start=$(date +%s.%N)
# The paper's schedule: AdamW lr 1e-4, batch 16, 500 epochs, x0.1 after 400 (4/5), final epoch.
$PY -m adtr.cli fit "$ROOT/bottle" --out "$RUN" --optimizer adamw --schedule step --lr 1e-4 --batch-size 16 \
    --epochs "$EPOCHS" --select last --precision auto 2>&1 | tee "$OUT/gpu_fit.log"
fit_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")
$PY -m adtr.cli test "$RUN" --data "$ROOT/bottle" --out "$RUN/test" 2>&1 | tee -a "$OUT/gpu_fit.log"
$PY - "$RUN" "$OUT" "$fit_s" "$EPOCHS" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from adtr.checkpoint import load_checkpoint
run, out, fit_s, epochs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
metrics = json.load(open(f"{run}/test/metrics.json"))["metrics"]
model = load_checkpoint(Path(run) / "model.pt")
row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "epochs": epochs,
       "epochs_trained": len(model["history"]), "fit_wall_seconds": fit_s,
       "fit_seconds_features_and_training": model["fit_seconds"],
       **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
json.dump(row, open(f"{out}/gpu_fit.json", "w"), indent=2)
print(row)
PYEOF
# Eager and torch.compile rows; onnxruntime there has no CUDA provider, so its rows would
# time the CPU. If compiling fails or overruns, the eager rows are measured on their own.
if ! timeout 300 $PY benchmarks/speed.py --run "$RUN" --batches 1 64 --name gpu_speed --out "$OUT" --skip onnx \
        2>&1 | tee "$OUT/gpu_speed.log"; then
    echo "speed.py with torch.compile failed or overran; eager rows only" | tee -a "$OUT/gpu_speed.log"
    $PY benchmarks/speed.py --run "$RUN" --batches 1 64 --name gpu_speed --out "$OUT" --skip onnx compiled \
        2>&1 | tee -a "$OUT/gpu_speed.log"
fi
