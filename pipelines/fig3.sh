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
# Disk: each of the 5 runs (default lists) keeps its latest checkpoint (~100 GB) plus best/ and final/
# (~13.5 GB each), ~125 GB a run; see pipelines/paper.sh.
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=fig3}"
: "${TEACHER_CACHE:=1}"   # one teacher pass for all KD runs (bench/README.md, "A stored teacher"); 0: live teacher
: "${SCHEDULES:=0.5:0.5 0.5:0.0 0.5:0.25 0.7:0.0 0.9:0.5}"
: "${EVAL_SPLIT:=test}"
# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"

prepare_alma "$DATA"
eval_set "$DATA" "$EVAL_SPLIT"
ensure_teacher_sft "$DATA" "$TEACHER_MODEL"

for schedule in $SCHEDULES; do
  start="${schedule%%:*}"
  end="${schedule#*:}"
  [[ -n "$start" && -n "$end" && "$schedule" == *:* ]] || die "SCHEDULES: '$schedule' is not START:END"
  # kd/systems.py: selfevo_beta<start> (constant β), selfevo_beta<start>-<end> (--beta-end)
  if [[ "$start" == "$end" ]]; then
    sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_beta$start"
  else
    sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_beta$start-$end"
  fi
done

plot fig3 "fig3,curves" "$FIGURES/fig3.png $FIGURES/curves.png" --runs "$RUNS" --results "$RESULTS"
echo "figures: $FIGURES/fig3.png $FIGURES/curves.png"
