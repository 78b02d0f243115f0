#!/usr/bin/env bash
# The commands of issue 13's GPU session, one device call each (10 minutes at most), run from the
# repository root on the GPU machine; everything they produce lands in $OUT (OUT=/tmp/out elsewhere).
#
# The GPU image has torch, accelerate and peft but not DeepSpeed, datasets or this repository's
# transformers; prepare on the CPU machine what travels (see benchmarks/README.md, "On a lent GPU"):
#
#   mkdir -p .git/info                               # a fresh clone may lack it; gpu-carry.sh writes there
#   bash ../shared/tools/gpu-carry.sh deepspeed      # .carry/whl   (5.8 MB)
#   bash ../shared/tools/gpu-carry.sh minilm         # .carry/minilm (46 MB)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .carry/py transformers==5.24.0 peft==0.21.2
#   mkdir -p .carry/q && tar -cJf .carry/q/glue.tar.xz -C ../shared/data glue   # 1 MB
#
#   bash benchmarks/h100.sh family   # carry .carry/minilm .carry/q .carry/py: tests without DeepSpeed + MiniLM grid
#   bash benchmarks/h100.sh zero-and-1.3b    # carry .carry/whl .carry/py: DeepSpeed GPU tests, OPT-1.3B speed/memory
#   bash benchmarks/h100.sh 6.7b-and-zero3   # carry .carry/whl .carry/py: OPT-6.7B, ZeRO-3 (+offload, a variant), 125m
#   bash benchmarks/h100.sh speed-rest       # carry .carry/whl .carry/py: what those two calls did not reach (resumes)
#
# Each call's files come back from $OUT: copy the runs files to benchmarks/results/ before the next call. The family
# grid's report: python benchmarks/family.py report --steps 1000 --probe-steps 100 --runs
#   benchmarks/results/family_minilm_h100_runs.jsonl --out benchmarks/results/family_minilm_h100
#   --ablation benchmarks/results/family_head_classifier_minilm_h100_runs.jsonl
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$SECONDS

environment() {
    python3 - <<'PY' | tee -a "$OUT/environment.txt"
import importlib, torch
print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "peft", "accelerate", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error)
PY
}

install() {  # install FOLDER...: the carried wheels into /tmp/site, ahead of the image's packages
    for folder in "$@"; do
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$folder"/*.whl || exit 1
    done
    export PYTHONPATH=/tmp/site:$PWD
}

left() { echo $(( $1 - (SECONDS - START) )); }
speed=(python3 benchmarks/speed_memory.py run --device cuda --bf16 --batch-size 8 --seq-len 512 --warmup 5 --steps 20
       --run-steps 200 --probe-steps 20 --repeats 1)

case "${1:-}" in
  family)
    echo "image:" >> "$OUT/environment.txt"; environment
    install .carry/py; echo "carried:" >> "$OUT/environment.txt"; environment
    mkdir -p .carry/data && tar -xJf .carry/q/glue.tar.xz -C .carry/data
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not zero" \
        > "$OUT/gpu_tests.log" 2>&1 &
    # family_minilm_h100_runs.jsonl holds the baselines and the library's methods with the papers' head (BERT's
    # pooler bias in it, the default until 2026-11-24); the library's methods now run with today's default head,
    # the classifier alone (the baselines do not depend on it), in their own file.
    runs="$OUT/family_head_classifier_minilm_h100_runs.jsonl"
    cp benchmarks/results/family_head_classifier_minilm_h100_runs.jsonl "$runs" 2>/dev/null  # resume
    study=(env BEFT_STUDY_MODEL=.carry/minilm BEFT_STUDY_DATA=.carry/data/glue python3 benchmarks/family.py run
           --steps 1000 --probe-steps 100 --seeds 0 1 2 --runs "$runs" --workers 14
           --config-option 'head_modules=["classifier"]')
    # Issue 10's selections and their baselines first, on every seed; then the single types.
    "${study[@]}" --stop-after "$(left 330)" --methods bitfit v auto_qkv 'auto_family_0.02%' 'auto_family_0.1%' \
        >> "$OUT/family.log" 2>&1
    "${study[@]}" --stop-after "$(left 470)" --methods q k v attn_out mlp_in mlp_out ln q_scale_in q_scale_out \
        k_scale_in k_scale_out v_scale_in v_scale_out attn_out_scale_in attn_out_scale_out mlp_in_scale_in \
        mlp_in_scale_out mlp_out_scale_in mlp_out_scale_out >> "$OUT/family.log" 2>&1
    wait
    tail -3 "$OUT/gpu_tests.log"; wc -l "$runs"
    ;;
  zero-and-1.3b)  # the DeepSpeed GPU tests, then OPT-1.3B's rows
    install .carry/whl .carry/py; environment
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k zero > "$OUT/gpu_tests_zero.log" 2>&1
    tail -3 "$OUT/gpu_tests_zero.log"
    "${speed[@]}" --sizes 1.3b --stop-after "$(left 440)" --worker-timeout 100 --methods forward full v_bf16 \
        beft_run fixed_v_run lora peft_beft probe bitfit v bare_full bare_v \
        --runs "$OUT/speed_memory_h100_1.3b_runs.jsonl" 2>&1 | tail -40
    ;;
  6.7b-and-zero3)  # OPT-6.7B's rows, its DeepSpeed rows and one tuned ZeRO-3 variant, then OPT-125m
    install .carry/whl .carry/py; environment
    "${speed[@]}" --sizes 6.7b --stop-after "$(left 330)" --worker-timeout 150 --methods forward v_bf16 ds_zero3 \
        ds_zero3_offload beft_run fixed_v_run lora peft_beft probe bitfit full \
        --runs "$OUT/speed_memory_h100_6.7b_runs.jsonl" 2>&1 | tail -30
    "${speed[@]}" --sizes 6.7b --stop-after "$(left 410)" --worker-timeout 100 --methods ds_zero3 \
        --ds-config benchmarks/ds_variants/zero3_prefetch.json \
        --runs "$OUT/speed_memory_h100_6.7b_runs.jsonl" 2>&1 | tail -5
    "${speed[@]}" --sizes 125m --stop-after "$(left 520)" --worker-timeout 60 --methods forward full v_bf16 \
        beft_run fixed_v_run lora peft_beft probe bitfit v \
        --runs "$OUT/speed_memory_h100_125m_runs.jsonl" 2>&1 | tail -20
    ;;
  speed-rest)  # the rows the first session's device time did not reach, resuming the committed runs files
    install .carry/whl .carry/py; environment
    for size in 125m 1.3b 6.7b; do
        cp "benchmarks/results/speed_memory_h100_${size}_runs.jsonl" "$OUT/" 2>/dev/null
    done
    "${speed[@]}" --sizes 6.7b --stop-after "$(left 240)" --worker-timeout 150 --methods lora peft_beft probe bitfit \
        full --runs "$OUT/speed_memory_h100_6.7b_runs.jsonl" 2>&1 | tail -8
    "${speed[@]}" --sizes 1.3b --stop-after "$(left 360)" --worker-timeout 100 --methods ds_zero3 ds_zero3_offload \
        --runs "$OUT/speed_memory_h100_1.3b_runs.jsonl" 2>&1 | tail -4
    "${speed[@]}" --sizes 125m --stop-after "$(left 480)" --worker-timeout 60 --methods forward full v_bf16 \
        beft_run fixed_v_run lora peft_beft probe bitfit v --runs "$OUT/speed_memory_h100_125m_runs.jsonl" 2>&1 | tail -8
    ;;
  *)
    echo "usage: bash benchmarks/h100.sh family | zero-and-1.3b | 6.7b-and-zero3 | speed-rest" >&2; exit 2 ;;
esac
