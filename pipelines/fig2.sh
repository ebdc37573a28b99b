#!/usr/bin/env bash
# Figure 2 of the paper: self-evolution KD against its hyperparameters, scored on the validation set
# (WMT21 en-de and cs-en, as the paper): (a) the threshold Gamma, (b) a fixed top-K fraction of hard
# tokens instead of a threshold, (c) beta, the student's share of the skewed distribution.
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/fig2.sh
#   GAMMAS="0.2 0.4 0.6" TOPKS="" BETAS="0.3 0.5 0.7" EPOCHS=1 bash pipelines/fig2.sh   # a smaller sweep
#
# Every run distils the SFT teacher of Table 1 (runs/table1/teacher_sft, trained here first when
# absent) into the student base model; runs selfevo_gamma<G>, selfevo_topk<K>, selfevo_beta<B> in
# runs/fig2, hypotheses on the validation set in hyps/fig2, scores in results/fig2, the figure in
# figures/fig2/fig2.png. Each step is skipped when its output is complete.
# Disk: each of the 20 runs (default lists) keeps its latest checkpoint (~100 GB) plus best/ and final/
# (~13.5 GB each), ~125 GB a run; see pipelines/paper.sh.
# BETA and GAMMA, the values the other two sweeps hold fixed, are the paper's (pipelines/paper.sh):
# shellcheck disable=SC2153
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=fig2}"
: "${TEACHER_CACHE:=1}"   # one teacher pass for all KD runs (bench/README.md, "A stored teacher"); 0: live teacher
: "${GAMMAS:=0.1 0.2 0.3 0.4 0.5 0.6}"        # Fig. 2a
: "${TOPKS:=0.1 0.2 0.3 0.4 0.5}"             # Fig. 2b (fraction of the batch's tokens)
: "${BETAS:=0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9}"   # Fig. 2c
: "${EVAL_SPLIT:=valid}"                      # the paper tunes on the validation set
# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"

prepare_alma "$DATA"
eval_set "$DATA" "$EVAL_SPLIT"
ensure_teacher_sft "$DATA" "$TEACHER_MODEL"

# the sweep points of kd/systems.py: selfevo with one of Γ, top-K or β set to the value
for value in $GAMMAS; do
  sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_gamma$value"
done
for value in $TOPKS; do
  sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_topk$value"
done
for value in $BETAS; do
  sweep_run "$DATA" "$EVAL_DIR" "$STUDENT_MODEL" "selfevo_beta$value"
done

plot fig2 "fig2,curves" "$FIGURES/fig2.png $FIGURES/curves.png" --runs "$RUNS" --results "$RESULTS"
echo "figures: $FIGURES/fig2.png $FIGURES/curves.png"
