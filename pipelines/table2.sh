#!/usr/bin/env bash
# Table 2 of the paper: Table 1 repeated with a Llama-30B teacher (same Llama-7B student).
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/table2.sh
#   TEACHER_MODEL=/models/llama-30b NUM_GPUS=8 bash pipelines/table2.sh
#
# The same machinery as table1.sh (pipelines/common.sh: table_pipeline): teacher SFT, student SFT,
# the five KD methods from the SFT 30B teacher, generation, evaluation, the table
# (results/table2/table.md) and figures/table2/{curves,fig4}.png. The student SFT row does not
# depend on the teacher: when Table 1's student SFT run is complete (runs/table1/student_sft) it is
# reused instead of trained again (REUSE_STUDENT_SFT=0 trains it anew here).
# The 30B teacher needs ZeRO-3 across the GPUs for its SFT; distillation shards it with ZeRO-3
# inference next to the 7B student (train_kd.py's teacher DeepSpeed plugin).
# Disk: as table1.sh with a 30B teacher (its SFT run: a ~420 GB checkpoint + 2 x 60 GB models):
# about 1.3 TB, less when the student SFT run of Table 1 is reused; see pipelines/paper.sh.
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=table2}"
: "${TEACHER_MODEL:=huggyllama/llama-30b}"
: "${STUDENT_MODEL:=huggyllama/llama-7b}"
: "${REUSE_STUDENT_SFT:=1}"
: "${GEN_ACCELERATE_CONFIG:=accelerate_configs/deepspeed_zero3.yaml}"  # 30B in bf16 is 60 GB: shard it
: "${MICRO_BATCH_SIZE:=2}"                      # the 30B teacher next to the student: less per GPU

# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"
if [[ "$REUSE_STUDENT_SFT" == 1 && -z "${STUDENT_SFT_RUN:-}" && -f "$OUT/runs/table1/student_sft/COMPLETED" ]]; then
  STUDENT_SFT_RUN="$OUT/runs/table1/student_sft"
fi

prepare_alma "$DATA"
table_pipeline "$DATA" "$DATA/test" "$TEACHER_MODEL" "$STUDENT_MODEL"
plot figures "curves,fig4" "$FIGURES/curves.png $FIGURES/fig4.png" --runs "$RUNS" --results "$RESULTS"

cat "$TABLE"
echo "table:   $TABLE"
echo "figures: $FIGURES/curves.png $FIGURES/fig4.png"
