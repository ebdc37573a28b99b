#!/usr/bin/env bash
# The systems beyond the paper against forward KD and Self-Evolution KD, in the quickstart's regime
# (the study's R1 at quickstart size: base models, the SFT teacher, every system trained to
# convergence and kept at its best validation checkpoint; README, "Beyond the paper"):
#   seqkd              sequence-level KD (Kim & Rush, 2016): SFT on the teacher's greedy translations
#   selfevo_gammaauto  Self-Evolution KD with Γ from the running median of d (--gamma auto)
#   jsd                GKD's generalized JSD (β = 0.5) on the references
#   jsd_onpolicy       the same, on the student's own samples for half of the batches (live teacher)
#   forward_lora, selfevo_lora   LoRA students (r = 8, alpha = 16) with forward and Self-Evolution KD
#
#   bash pipelines/beyond.sh                      # seed 1
#   SEEDS="1 2 3" bash pipelines/beyond.sh        # three seeds
#   QUICK=1 OUT=/tmp/b bash pipelines/beyond.sh   # a few steps: what the tests run
#
# It runs pipelines/quickstart.sh with these systems, so it shares the quickstart's outputs: after a
# quickstart only the new systems train, and results/quickstart/{table.md,summary.json,curves.png}
# then hold every system of the regime. The settings of the new methods: JSD_BETA, ON_POLICY_RATIO,
# LORA_R, LORA_ALPHA (pipelines/regimes.sh); the rest as the quickstart's.
set -euo pipefail

: "${SEEDS:=1}"
: "${BEYOND_SYSTEMS:=jsd_onpolicy selfevo_lora selfevo_gammaauto jsd forward_lora seqkd selfevo forward}"
if [[ -n "${DATA_DIR:-}" ]]; then
  echo "beyond.sh: DATA_DIR=$DATA_DIR: these systems run on the demo task's regime only; unset DATA_DIR" >&2
  exit 2
fi
QUICKSTART_SYSTEMS="$BEYOND_SYSTEMS" QUICKSTART_SEEDS="$SEEDS" exec bash "$(dirname "${BASH_SOURCE[0]}")/quickstart.sh"
