#!/usr/bin/env bash
# Quickstart: the whole Table 1 pipeline at toy scale on a CPU, with nothing downloaded.
#
#   bash pipelines/quickstart.sh
#
# The embedded demo task (prepare_data.py --demo: synthetic de<->en and cs<->en), a tiny Llama
# teacher (4 layers x 256) and student (2 x 128) with a tokenizer trained here (make_tiny_models.py),
# then exactly Table 1's steps (pipelines/common.sh: table_pipeline): SFT of the teacher and of the
# student, the five KD methods (forward, reverse, noevo, skew, selfevo) from the SFT teacher into the
# student, greedy generation on the 4 test directions, BLEU/chrF (COMET when COMET_MODEL is set),
# teacher similarity and significance against forward KD, the table, and the figures (training
# curves, Fig. 4). It ends by printing the paths of the table and the figures.
#
# Toy-scale choices (each a setting below): ALMA's short prompt (TEMPLATE=alma; the paper's alpaca
# prompt triples the tokens); the teacher trains longer (TEACHER_MAX_STEPS) so that it clearly
# beats the student; a random student is no "base model" (the skewed losses barely move a student
# that puts no mass on the targets), so every student system starts from the same short SFT
# warm-up (STUDENT_WARMUP_STEPS); one thread per process (THREADS=1), plain python (LAUNCHER).
#
# Outputs (OUT defaults to the repository root): data/quickstart_demo, models/quickstart_tiny,
# runs/quickstart/<run>, hyps/quickstart/<system>, results/quickstart/{<system>.json,table.md},
# figures/quickstart/{curves,fig4}.png, logs/quickstart/<step>.log. A re-run skips every finished
# step; after changing a setting, use another OUT or EXP (or delete the outputs).
# Disk: about 60 MB in all (each of the 8 runs keeps best/, final/ and its latest checkpoint).
#
# Variants:
#   QUICK=1 bash pipelines/quickstart.sh                       # CI: a few steps, a few test rows
#   DATA_DIR=path/to/ALMA/human_written_data SUBSET=2000 bash pipelines/quickstart.sh   # real ALMA-layout data
#   COMET_MODEL=Unbabel/wmt22-comet-da bash pipelines/quickstart.sh       # with COMET (downloads it)
#   OUT=/tmp/qs MAX_STEPS=200 bash pipelines/quickstart.sh
set -euo pipefail

# ---- settings (each overridable from the environment) ----
: "${QUICK:=0}"                 # 1: the reduced CI mode
: "${EXP:=quickstart}"          # experiment name: runs/$EXP, results/$EXP, ...
: "${OUT:=}"                    # output root (empty: the repository root)
: "${DATA_DIR:=}"               # an ALMA-layout folder instead of the demo task
: "${SUBSET:=}"                 # with DATA_DIR: training pairs per language pair (default 2000)
: "${TEMPLATE:=alma}"           # prompt: ALMA's short one (3x fewer tokens than the paper's alpaca)
: "${TEST_LIMIT:=}"             # first N rows of each test direction (empty: all)
: "${COMET_MODEL:=none}"        # none: COMET skipped; a local checkpoint or hub name otherwise
: "${LAUNCHER:=python}"         # one CPU process: plain python saves accelerate launch's start-up
                                # (~10 s a step); LAUNCHER=accelerate goes through accelerate launch
: "${ACCELERATE_CONFIG:=accelerate_configs/cpu.yaml}"   # with LAUNCHER=accelerate
: "${GEN_ACCELERATE_CONFIG:=$ACCELERATE_CONFIG}"
: "${NUM_PROCESSES:=1}"
: "${BF16:=0}"
: "${SEED:=42}"
if [[ "$QUICK" == 1 ]]; then
  : "${DEMO_TRAIN_PAIRS:=300}" "${DEMO_EVAL_PAIRS:=8}"
  : "${MAX_STEPS:=4}" "${TEACHER_MAX_STEPS:=4}" "${STUDENT_WARMUP_STEPS:=2}"
  : "${BATCH_SIZE:=8}" "${MICRO_BATCH_SIZE:=8}" "${EVAL_STEPS:=2}"
  : "${MAX_NEW_TOKENS:=24}" "${VOCAB_SIZE:=600}" "${TRAIN_EXTRA_ARGS:=--logging-steps 1}"
  : "${TEACHER_SIZE:=2 64 2}" "${STUDENT_SIZE:=1 32 2}"   # layers hidden heads
  : "${SUBSET:=200}"
  if [[ -n "$DATA_DIR" ]]; then : "${TEST_LIMIT:=8}"; fi
else
  : "${DEMO_TRAIN_PAIRS:=4000}" "${DEMO_EVAL_PAIRS:=100}"
  # The teacher trains longer than the students, so that distillation has something to pass on;
  # every student system starts from the same warmed-up student (common.sh: STUDENT_WARMUP_STEPS).
  : "${MAX_STEPS:=150}" "${TEACHER_MAX_STEPS:=400}" "${STUDENT_WARMUP_STEPS:=150}"
  : "${BATCH_SIZE:=32}" "${MICRO_BATCH_SIZE:=32}" "${EVAL_STEPS:=50}"
  : "${MAX_NEW_TOKENS:=64}" "${VOCAB_SIZE:=2000}" "${TRAIN_EXTRA_ARGS:=--logging-steps 5}"
  : "${TEACHER_SIZE:=4 256 4}" "${STUDENT_SIZE:=2 128 2}"
  : "${SUBSET:=2000}"
  if [[ -n "$DATA_DIR" ]]; then : "${TEST_LIMIT:=100}"; fi
fi
: "${EPOCHS:=100}"              # MAX_STEPS ends the runs first
: "${LR:=1e-3}"                 # from-scratch tiny models learn with a large rate
: "${WARMUP_RATIO:=0.03}"
: "${MAX_LENGTH:=256}"
: "${SAVE_STEPS:=0}"             # no step_N checkpoints: best/ and final/ are enough here
: "${GEN_BATCH_SIZE:=32}"
: "${THREADS:=1}"               # torch threads per process (OMP_NUM_THREADS): tiny matrices gain
                                # little from a second thread, and oversubscribed OpenMP threads on a
                                # busy machine run 10x slower (measured); empty: torch's default
if [[ -n "$THREADS" ]]; then export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"; fi
export TOKENIZERS_PARALLELISM=false

# shellcheck source=pipelines/paper.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"   # the paper's settings where none is set above
use_experiment "$EXP"
QUICKSTART_START=$SECONDS

# ---- data and tiny models ----
if [[ -n "$DATA_DIR" ]]; then
  DATA="$OUT/data/${EXP}_alma"
  prepare_alma "$DATA"
else
  DATA="$OUT/data/${EXP}_demo"
  step "prepare demo data" "$LOGS/prepare_data.log" all_exist "$DATA/train.jsonl" "$DATA/valid.jsonl" "$DATA/stats.json" -- \
    "$PYTHON" prepare_data.py --demo --out "$DATA" --demo-train-pairs "$DEMO_TRAIN_PAIRS" \
    --demo-eval-pairs "$DEMO_EVAL_PAIRS" --template "$TEMPLATE" --seed "$SEED"
fi
TEST_DIR="$DATA/test"
if [[ -n "$TEST_LIMIT" ]]; then
  limit_test "$DATA/test" "$TEST_LIMIT" "$DATA/test_first$TEST_LIMIT"
  TEST_DIR="$DATA/test_first$TEST_LIMIT"
fi

MODELS="$OUT/models/${EXP}_tiny"
read -r T_LAYERS T_HIDDEN T_HEADS <<<"$TEACHER_SIZE"
read -r S_LAYERS S_HIDDEN S_HEADS <<<"$STUDENT_SIZE"
step "tiny models" "$LOGS/tiny_models.log" all_exist "$MODELS/teacher/config.json" "$MODELS/student/config.json" -- \
  "$PYTHON" make_tiny_models.py --data "$DATA" --out "$MODELS" --vocab-size "$VOCAB_SIZE" --seed "$SEED" \
  --teacher-layers "$T_LAYERS" --teacher-hidden "$T_HIDDEN" --teacher-heads "$T_HEADS" \
  --student-layers "$S_LAYERS" --student-hidden "$S_HIDDEN" --student-heads "$S_HEADS"

# ---- Table 1 at toy scale ----
table_pipeline "$DATA" "$TEST_DIR" "$MODELS/teacher" "$MODELS/student"

# ---- figures: training curves of every run, teacher similarity ----
plot figures "curves,fig4" "$FIGURES/curves.png $FIGURES/fig4.png" --runs "$RUNS" --results "$RESULTS"

say "quickstart finished in $((SECONDS - QUICKSTART_START))s"
echo
cat "$TABLE"
echo
echo "table:   $TABLE"
echo "figures: $FIGURES/curves.png"
echo "         $FIGURES/fig4.png"
