#!/usr/bin/env bash
# Figure 3 of the paper: progressive beta (moving linearly over training, e.g. 0.5 -> 0.0) against a
# static beta = 0.5, for self-evolution KD.
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/fig3.sh
#   SCHEDULES="0.5:0.5 0.5:0.0" bash pipelines/fig3.sh
#
# SCHEDULES holds START:END pairs (START = END: static beta). Runs selfevo_beta<START> (static) and
# selfevo_beta<START>-<END> (progressive, train_kd.py --beta START --beta-end END) in runs/fig3,
# distilled from the SFT teacher of Table 1 (runs/table1/teacher_sft, trained first when absent);
# scored on EVAL_SPLIT (test: WMT22; valid: WMT21) in results/fig3; figures/fig3/fig3.png and the
# training curves (the hard-token fraction under each schedule) in figures/fig3/curves.png.
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=fig3}"
: "${SCHEDULES:=0.5:0.5 0.5:0.0 0.5:0.25 0.7:0.0 0.9:0.5}"
: "${EVAL_SPLIT:=test}"
: "${TEACHER_MODEL:=huggyllama/llama-13b}"
: "${STUDENT_MODEL:=huggyllama/llama-7b}"
: "${OUT:=}"
: "${DATA_DIR:=}"
: "${DATA:=}"
: "${ACCELERATE_CONFIG:=accelerate_configs/deepspeed_zero3.yaml}"
: "${GEN_ACCELERATE_CONFIG:=accelerate_configs/multi_gpu.yaml}"
: "${NUM_GPUS:=8}"
: "${NUM_PROCESSES:=$NUM_GPUS}"
: "${EPOCHS:=3}" "${BATCH_SIZE:=128}" "${MICRO_BATCH_SIZE:=4}" "${LR:=2e-5}" "${WARMUP_RATIO:=0.03}"
: "${MAX_LENGTH:=512}" "${BF16:=1}"
: "${TRAIN_EXTRA_ARGS:=--gradient-checkpointing}"   # more train_kd.py flags (word-split)
: "${TARGET_MIX:=0.5}" "${GAMMA:=0.4}"
: "${COMET_MODEL:=Unbabel/wmt22-comet-da}"

# shellcheck source=pipelines/common.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"

prepare_alma "$DATA"
eval_set "$DATA" "$EVAL_SPLIT"
ensure_teacher_sft "$DATA" "$TEACHER_MODEL"

for schedule in $SCHEDULES; do
  start="${schedule%%:*}"
  end="${schedule#*:}"
  [[ -n "$start" && -n "$end" && "$schedule" == *:* ]] || die "SCHEDULES: '$schedule' is not START:END"
  if [[ "$start" == "$end" ]]; then
    sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_beta$start" selfevo \
      --target-mix "$TARGET_MIX" --gamma "$GAMMA" --beta "$start"
  else
    sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_beta$start-$end" selfevo \
      --target-mix "$TARGET_MIX" --gamma "$GAMMA" --beta "$start" --beta-end "$end"
  fi
done

plot fig3 "fig3,curves" "$FIGURES/fig3.png $FIGURES/curves.png" --runs "$RUNS" --results "$RESULTS"
echo "figures: $FIGURES/fig3.png $FIGURES/curves.png"
