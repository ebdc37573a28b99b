#!/usr/bin/env bash
# Figure 5 of the paper: skewing the teacher instead of the target (Eq. 10, skew_teacher:
# (1 - lambda) CE + lambda KL(p || beta' q + (1 - beta') p), beta' = 0.9) for lambda in
# {0.3, 0.5, 0.7, 1.0}, next to forward KD and self-evolution KD of Table 1.
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/fig5.sh
#   LAMBDAS="0.5 1.0" bash pipelines/fig5.sh
#
# Runs skew_teacher_lambda<L> in runs/fig5, distilled from the SFT teacher of Table 1
# (runs/table1/teacher_sft, trained first when absent); scored on EVAL_SPLIT in results/fig5;
# figures/fig5/fig5.png, with Table 1's forward and selfevo scores as reference lines when
# results/table1 has them (same test set).
# Disk: each of the 4 runs (default lists) keeps its latest checkpoint (~100 GB) plus best/ and final/
# (~13.5 GB each), ~125 GB a run; see pipelines/paper.sh.
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=fig5}"
: "${TEACHER_CACHE:=1}"   # one teacher pass for all KD runs (bench/README.md, "A stored teacher"); 0: live teacher
: "${LAMBDAS:=0.3 0.5 0.7 1.0}"
: "${EVAL_SPLIT:=test}"
: "${REFERENCE_TABLE:=table1}"    # whose forward/selfevo results are drawn as reference lines
# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"

prepare_alma "$DATA"
eval_set "$DATA" "$EVAL_SPLIT"
ensure_teacher_sft "$DATA" "$TEACHER_MODEL"

for value in $LAMBDAS; do
  sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "skew_teacher_lambda$value"   # kd/systems.py: --kd-ratio value
done

references=()
if [[ "$EVAL_SPLIT" == test ]]; then
  for system in forward selfevo; do
    file="$OUT/results/$REFERENCE_TABLE/$system.json"
    if [[ -f "$file" ]]; then references+=("$file"); fi
  done
fi
plot fig5 fig5 "$FIGURES/fig5.png" --results "$RESULTS" "${references[@]}"
echo "figure: $FIGURES/fig5.png"
