#!/usr/bin/env bash
# GPU check (issue 4): the paper's full schedule on bottle, then inference throughput.
# Usage: bash benchmarks/gpu.sh MVTEC_ROOT [OUT_DIR]   (about 8 minutes on one recent GPU)
# Needs the project's venv (make .venv/.installed). CUDA is picked without any flag.
set -euo pipefail
ROOT=${1:?usage: gpu.sh MVTEC_ROOT [OUT_DIR]}
OUT=${2:-benchmarks/results}
PY=${PY:-.venv/bin/python}
RUN=$(mktemp -d)/gpu_bottle
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
start=$(date +%s)
# The paper's schedule: AdamW lr 1e-4, batch 16, 500 epochs, x0.1 after 400, final epoch.
$PY -m adtr.cli fit "$ROOT/bottle" --out "$RUN" --schedule step --lr 1e-4 --batch-size 16 --epochs 500 \
    --select last --precision auto
fit_s=$(( $(date +%s) - start ))
$PY -m adtr.cli test "$RUN" --data "$ROOT/bottle" --out "$RUN/test"
$PY benchmarks/speed.py --run "$RUN" --batches 1 64 --name gpu_speed --out "$OUT"
$PY - "$RUN" "$OUT" "$fit_s" <<'PYEOF'
import json, sys
run, out, fit_s = sys.argv[1], sys.argv[2], int(sys.argv[3])
metrics = json.load(open(f"{run}/test/metrics.json"))["metrics"]
row = {"fit_wall_seconds_500_epochs": fit_s, **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
json.dump(row, open(f"{out}/gpu_fit.json", "w"), indent=2)
print(row)
PYEOF
