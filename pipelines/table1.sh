#!/usr/bin/env bash
# Table 1 of the paper: Llama-13B teacher, Llama-7B student, WMT22 de<->en and cs<->en.
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/table1.sh       # ALMA files on disk
#   bash pipelines/table1.sh                                    # the same data from the Hub
#   NUM_GPUS=4 MICRO_BATCH_SIZE=2 bash pipelines/table1.sh      # fewer GPUs (batch stays 128)
#
# Steps (pipelines/common.sh: table_pipeline), each skipped when its output is complete, so a re-run
# after a failure continues where it stopped:
#   1. prepare_data.py: the paper's 52,574 training examples, WMT21 valid (en-de, cs-en), WMT22 test
#   2. SFT of the teacher and of the student, 3 epochs, batch 128, lr 2e-5, the best validation
#      checkpoint kept (best/)
#   3. forward, reverse, noevo, skew, selfevo KD from the SFT teacher into the student base model
#      (the final checkpoint: final/)
#   4. greedy generation on the 4 WMT22 directions for the 7 systems (teacher and student SFT too)
#   5. evaluate.py: BLEU, chrF, COMET (wmt22-comet-da), teacher similarity, paired bootstrap
#      against forward KD; the table in results/table1/table.md with the paper's dagger
#   6. figures/table1/{curves,fig4}.png
# Outputs under OUT (default the repository root): data/alma, runs/table1, hyps/table1,
# results/table1, figures/table1, logs/table1.
# Disk: each of the 7 runs keeps its latest checkpoint (~100 GB for the 7B student, ~180 GB for the
# 13B teacher), best/ and final/ (~13.5 GB each for 7B): about 1 TB; see pipelines/paper.sh.
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${EXP:=table1}"
: "${TEACHER_CACHE:=1}"   # one teacher pass for all KD runs (bench/README.md, "A stored teacher"); 0: live teacher
# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
use_experiment "$EXP"
DATA="$(abspath "${DATA:-$OUT/data/alma}")"

prepare_alma "$DATA"
table_pipeline "$DATA" "$DATA/test" "$TEACHER_MODEL" "$STUDENT_MODEL"
plot figures "curves,fig4" "$FIGURES/curves.png $FIGURES/fig4.png" --runs "$RUNS" --results "$RESULTS"

cat "$TABLE"
echo "table:   $TABLE"
echo "figures: $FIGURES/curves.png $FIGURES/fig4.png"
