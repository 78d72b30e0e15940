#!/usr/bin/env bash
# Phase 1 -> phase 2 -> evaluation, chained the way the README examples are.
# Set the variables (or export them) and run: bash scripts/chain.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-cifar10}        # cifar10 | cifar100 | digits
MODEL=${MODEL:-resnet18}           # resnet18 | mlp_skinny | mlp_wide | cnn_small
PHASE1_LOADER=${PHASE1_LOADER:-A}  # C clean, A adversarial, F clean for 50 epochs then adversarial
PHASE2_LOADER=${PHASE2_LOADER:-C}
STANDARD_EPOCHS=${STANDARD_EPOCHS:-101}
FROM_EPOCH=${FROM_EPOCH:-20}       # phase-1 checkpoint that phase 2 starts from
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
EPS=${EPS:-4.0}                    # in 1/255
SEED=${SEED:-0}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-./runs/${DATASET}_${MODEL}_${PHASE1_LOADER}${PHASE2_LOADER}_seed${SEED}}
EXTRA=${EXTRA:-}                   # e.g. "--n_test 1000"

common="--dataset $DATASET --model $MODEL --eps $EPS --random_seed $SEED $EXTRA"

$PYTHON run_exp.py $common --standard_epochs "$STANDARD_EPOCHS" --linear_epochs 0 \
  --loaders "${PHASE1_LOADER}C" --save_models --constant_save --skip_second_test \
  --save_path "$OUT/phase_1"

$PYTHON run_exp.py $common --base_model_path "$OUT/phase_1/parameters_checkpoint_${FROM_EPOCH}.pkl" \
  --loaders "C${PHASE2_LOADER}" --linear_epochs "$LINEAR_EPOCHS" --second_lr 0.01 --centering \
  --save_models --save_path "$OUT/phase_2_centered"

$PYTHON eval_and_make_adv.py $common --model_path "$OUT/phase_2_centered/parameters_final.pkl" \
  --linear --centering --save_examples --bonus_dir test_results

$PYTHON calculate_kernel.py --dataset "$DATASET" --model "$MODEL" --random_seed "$SEED" \
  --model_path "$OUT/phase_1/parameters_checkpoint_${FROM_EPOCH}.pkl" --dataset_size 500 --class_index 0
