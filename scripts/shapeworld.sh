#!/usr/bin/env bash
# The shape-world experiment end to end (issue 5), on one GPU, with the project's own code paths:
#   1+2. scripts/shapeworld_vqgan.py and scripts/shapeworld_base.py, side by side (the VQGAN and the base InternVL)
#   3.   convert_checkpoint.py: the base + the VQGAN -> an ARMOR checkpoint, as a user converts InternVL2.5
#   4.   scripts/shapeworld_data.py, wohg_data.py tokenize, train_wohg.py --stage all (configs/shapeworld_wohg.yaml)
#   5.   benchmarks/shapeworld_eval.py: the table and the grid of drawings
#   6.   scripts/shapeworld_export.py: stage 3 -> armor-shapeworld/, the repository's default model
#
#   bash scripts/shapeworld.sh              # everything under runs/shapeworld/; logs and timings there too
#   SHAPEWORLD_SMOKE=1 bash scripts/shapeworld.sh   # CPU, tiny models and data, a few steps: checks the pipeline
#                                                   # (under runs/shapeworld-smoke/, exported to /tmp)
#
# Resumable: a finished step leaves runs/shapeworld/done/<step> and is skipped; an interrupted one runs again and
# continues from its own checkpoint (the VQGAN, base and WoHG trainers resume). A step that stopped on its time
# budget counts as finished, so that later steps always build on the model the earlier ones reported.
# Each step's wall time goes to runs/shapeworld/steps.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/shapeworld
VQGAN_ARGS=(--time-budget-s 170)
BASE_ARGS=(--steps 1000 --time-budget-s 240 --vision-hidden-size 128 --vision-heads 2 --vision-intermediate-size 512
    --intermediate-size 512)  # small enough that the exported model keeps the repository under ~60 MB
DATA_ARGS=()
# Image sampling: the best setting of benchmarks/shapeworld_sampling.py on validation prompts (README, Shape world).
CONVERT_ARGS=(--adapter-layers 4 --image-top-k 8 --image-temperature 0.5 --guidance-scale 1.5)
WOHG_ARGS=()
EVAL_ARGS=()
EXPORT_TO=armor-shapeworld
if [[ -n "${SHAPEWORLD_SMOKE:-}" ]]; then
    RUNS=runs/shapeworld-smoke
    VQGAN_ARGS=(--smoke)
    BASE_ARGS=(--smoke)
    DATA_ARGS=(--ti2t 8 --t2t 8 --t2i 16 --t2ti 8 --ti2ti 8 --parts 2)
    CONVERT_ARGS=(--adapter-layers 2)  # the smoke base has 2 layers
    WOHG_ARGS=(--max-steps 2 --per-device-train-batch-size 4 --dataloader-num-workers 0 --data "$RUNS"/data/{ti2t,t2t,t2i,t2ti,ti2ti})
    EVAL_ARGS=(--count 2 --batch-size 16 --device cpu)
    EXPORT_TO=/tmp/armor-shapeworld-smoke
fi
mkdir -p "$RUNS/done"
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run once, log to $RUNS/NAME.log, time it
    local name=$1
    shift
    if [[ -e "$RUNS/done/$name" ]]; then
        echo "== $name: done before"
        return
    fi
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$RUNS/$name.log" 2>&1 || { echo "== $name failed; see $RUNS/$name.log"; tail -20 "$RUNS/$name.log"; exit 1; }
    printf '%s\t%d\t%s\n' "$name" $((SECONDS - start)) "$*" >>"$RUNS/steps.tsv"
    touch "$RUNS/done/$name"
    echo "== $name: $((SECONDS - start)) s"
}

# 1 + 2: the VQGAN trains on the GPU while the base model's input pipeline keeps the CPUs busy; then the WoHG data.
step vqgan python scripts/shapeworld_vqgan.py --output-dir "$RUNS/vqgan" "${VQGAN_ARGS[@]}" &
vqgan=$!
step base python scripts/shapeworld_base.py --output-dir "$RUNS/base" "${BASE_ARGS[@]}"
wait $vqgan
step data python scripts/shapeworld_data.py --output-dir "$RUNS/data" "${DATA_ARGS[@]}"

# 3: the conversion a user runs on a released InternVL2.5
step convert python convert_checkpoint.py --internvl "$RUNS/base/internvl" --vqgan "$RUNS/vqgan/vqgan" \
    --image-size 256 --adapter-init copy-top --output "$RUNS/armor" --overwrite "${CONVERT_ARGS[@]}"

# 4: WoHG
step tokenize python wohg_data.py tokenize --data "$RUNS/data/t2i" "$RUNS/data/t2ti" "$RUNS/data/ti2ti" \
    --model "$RUNS/armor" --batch-size 256 --num-workers 14
step wohg python train_wohg.py --stage all --config configs/shapeworld_wohg.yaml --model "$RUNS/armor" \
    --output-dir "$RUNS/wohg" "${WOHG_ARGS[@]}"

# 5 + 6
step eval python benchmarks/shapeworld_eval.py --base "$RUNS/base/internvl" \
    --stages "$RUNS/wohg/stage1" "$RUNS/wohg/stage2" "$RUNS/wohg/stage3" --out "$RUNS/eval" "${EVAL_ARGS[@]}"
step export python scripts/shapeworld_export.py "$RUNS/wohg/stage3" --output "$EXPORT_TO" --overwrite
cat "$RUNS/eval/shapeworld_eval.md"
