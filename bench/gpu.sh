#!/usr/bin/env bash
# The GPU figures of README "Speed", in one pass on a CUDA machine (bench/README.md):
# the CUDA tests, the step bench at the default and the paper size with both ways of
# forming per-sample convolution gradients (one launch per sample, one grouped launch),
# and short runs of the paper profile's sizes, from which `sweep --dry-run` estimates the
# whole paper grid on this GPU.
#   bench/gpu.sh OUT_DIR DUKE_DIR        (each step time-boxed; a failed step is logged)
set -u
out=${1:?OUT_DIR}; duke=${2:?DUKE_DIR}; py=${PYTHON:-python3}; runs=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$out"
step() { echo "== $*"; local t0=$SECONDS; "$@"; echo "== rc $? after $((SECONDS - t0)) s"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__)"
step timeout 120 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_device.py \
    tests/test_ghost.py -k "cuda or gpu or device or per_sample_conv" -rs
for size in "default 128 8" "paper 224 10"; do
    set -- $size
    step timeout 150 $py bench/dp_step.py --device cuda --conv-paths loop grouped --rounds 5 \
        --image-size "$2" --batch-size "$3" --out "$out/$1"
done
# the paper profile's run sizes (224², width 16, depth 4, batch 10, native_conv), 4 epochs
for model in unet nested_unet; do
    for method in non_dp dp_sgd; do
        sigma=(); [ $method = dp_sgd ] && sigma=(--noise-multiplier 1.0)
        step timeout 90 $py -m dpstudy train --model $model --method $method "${sigma[@]}" \
            --image-size 224 224 --base-width 16 --depth 4 --batch-size 10 --epochs 4 \
            --grad-sample-mode native_conv --device cuda --data "$duke" --runs-dir "$runs" --quiet
    done
done
$py - "$runs" > "$out/epochs.csv" <<'EOF'
import sys
import pandas as pd
from dpstudy.store import RunStore
store = RunStore(sys.argv[1])
metas = {r: store.read_meta(r) for r in store.run_ids()}
rows = [{"run_id": r, "device": m.get("device"), "duration_s": m.get("duration_s"),
         "epoch_seconds": list(store.read_history(r)["epoch_seconds"].round(3))}
        for r, m in metas.items()]
print(pd.DataFrame(rows).to_csv(index=False), end="")
EOF
cat "$out/epochs.csv"
step $py -m dpstudy sweep --profile paper --data "$duke" --runs-dir "$runs" --dry-run \
    > /dev/null 2> "$out/paper_estimate.txt"
cat "$out/paper_estimate.txt"
