# shellcheck shell=bash
# Shared machinery of the pipelines: sourced by pipelines/paper.sh (the paper's settings), which the
# pipelines source; never run on its own.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
#
# Layout under OUT (default: the repository root; data/ runs/ hyps/ results/ figures/ logs/ are
# git-ignored there), for an experiment EXP (table1, quickstart, ...):
#   $OUT/data/...              prepared data (prepare_data.py)
#   $OUT/runs/$EXP/<run>/      training runs (train_kd.py): final/ best/ COMPLETED metrics.jsonl
#   $OUT/hyps/$EXP/<system>/   hypotheses (generate.py), one <src>-<tgt>.jsonl per direction
#   $OUT/results/$EXP/<system>.json, table.md   scores (evaluate.py)
#   $OUT/figures/$EXP/*.png    figures (plot_results.py)
#   $OUT/logs/$EXP/<step>.log  one log per step
#
# Every step goes through `step`, which skips it when its output is already complete, so a pipeline
# re-run after a failure continues where it stopped, and which stops the pipeline at the first
# failure with the step's name and its log.
#
# Settings read here (each overridable from the environment; the paper's values are set by
# pipelines/paper.sh, which sources this file):
#   DRY_RUN (1: print each step and its estimate, run nothing: kd/estimate.py), OUT, PYTHON, ACCELERATE_CONFIG (an accelerate YAML, or none for accelerate's default),
#   GEN_ACCELERATE_CONFIG (the same for generate.py), NUM_PROCESSES (empty: the config's),
#   LAUNCHER (accelerate, or python to run train_kd.py/generate.py in one plain process);
#   training: EPOCHS BATCH_SIZE MICRO_BATCH_SIZE LR WARMUP_RATIO MAX_LENGTH MAX_STEPS EVAL_STEPS
#   SAVE_STEPS BF16 SEED KD_RATIO TARGET_MIX BETA GAMMA SKEW_BETA TRAIN_EXTRA_ARGS KD_STUDENT_INIT;
#   the stored teacher: TEACHER_CACHE (1: every KD run reads the teacher's distributions from a cache
#   built once per teacher and train file by cache_teacher.py; 0, the default here: the live teacher;
#   table1/fig2/fig3/fig5 set 1) TEACHER_CACHE_TOP_K TEACHER_CACHE_DTYPE;
#   generation: GEN_BATCH_SIZE MAX_NEW_TOKENS NUM_BEAMS GEN_EXTRA_ARGS;
#   evaluation: COMET_MODEL (a hub name, a local path, or none).

# Run from the repository root so the scripts are found; relative paths given by the user are
# resolved against the folder the pipeline was started from first.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START_DIR="$(pwd)"

# abspath PATH: PATH made absolute against the folder the pipeline was started from.
abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    "") printf '\n' ;;
    *) printf '%s\n' "$START_DIR/$1" ;;
  esac
}

: "${OUT:=$REPO_ROOT}"
OUT="$(abspath "$OUT")"
: "${PYTHON:=python}"
: "${ACCELERATE_CONFIG:=}"
: "${NUM_PROCESSES:=}"
: "${LAUNCHER:=accelerate}"   # accelerate: `accelerate launch`; python: plain python, one process
: "${GEN_ACCELERATE_CONFIG:=$ACCELERATE_CONFIG}"   # generation may run under another config (DDP)
if [[ "$ACCELERATE_CONFIG" != none ]]; then ACCELERATE_CONFIG="$(abspath "$ACCELERATE_CONFIG")"; fi
if [[ "$GEN_ACCELERATE_CONFIG" != none ]]; then GEN_ACCELERATE_CONFIG="$(abspath "$GEN_ACCELERATE_CONFIG")"; fi

# The checkpoint each kind of run is evaluated with: the SFT runs keep the best validation
# checkpoint (the paper), the KD runs report the final one.
: "${SFT_CHECKPOINT:=best}"
: "${KD_CHECKPOINT:=final}"
# The model the KD runs start from: the student base model (base, as the paper's Table 1) or the
# student SFT checkpoint (sft).
: "${KD_STUDENT_INIT:=base}"

# The distillation rows of the paper's Table 1 (kd/systems.py: the one table of systems)
read -r -a TABLE1_KD_SYSTEMS <<<"$("$PYTHON" "$REPO_ROOT/kd/systems.py" list table1)"
# The pipeline settings that the systems' flags read (KD_RATIO, BETA, ...), passed to kd/systems.py
read -r -a SYSTEM_SETTINGS <<<"$("$PYTHON" "$REPO_ROOT/kd/systems.py" settings)"

# The stored teacher (cache_teacher.py; bench/README.md, "A stored teacher"): K and the storage precision.
: "${TEACHER_CACHE:=0}"
: "${TEACHER_CACHE_TOP_K:=128}"
: "${TEACHER_CACHE_DTYPE:=fp16}"

# ---------------------------------------------------------------------------------------------
# Messages and the step runner
# ---------------------------------------------------------------------------------------------

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

die() {
  printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
  exit 1
}

# step NAME LOG [CHECK...] -- COMMAND...
#   Runs COMMAND with its output in the file LOG, unless CHECK (a command and its arguments, run
#   as is; e.g. `test -f runs/x/COMPLETED`) succeeds: then the step says "skipped". A step without
#   CHECK always runs. After COMMAND succeeds, CHECK must succeed too (the output is complete).
#   A failure stops the whole pipeline with the step's name, the log's path and its last lines.
step() {
  local name="$1" log="$2"
  shift 2
  local check=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    check+=("$1")
    shift
  done
  [[ $# -gt 0 ]] || die "step $name: no '--' before the command (pipeline bug)"
  shift
  [[ $# -gt 0 ]] || die "step $name: empty command (pipeline bug)"
  if [[ ${#check[@]} -gt 0 ]] && "${check[@]}"; then
    say "step $name: skipped (output complete)"
    return 0
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    if dry_run_planned "$log"; then say "step $name: planned above"; return 0; fi
    printf '%s\n' "$log" >>"$DRY_RUN_LOGS"
    dry_run_step "$name" "$@"
    return 0
  fi
  mkdir -p "$(dirname "$log")"
  say "step $name: running (log: $log)"
  local start=$SECONDS status=0
  {
    printf '# step %s, started %s\n# cwd: %s\n# command:' "$name" "$(date)" "$(pwd)"
    printf ' %q' "$@"
    printf '\n'
  } >"$log"
  "$@" >>"$log" 2>&1 || status=$?
  if [[ $status -ne 0 ]]; then
    printf '[%s] FAILED: step %s (exit %s) after %ss; log: %s\n--- last lines of the log ---\n' \
      "$(date +%H:%M:%S)" "$name" "$status" "$((SECONDS - start))" "$log" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  if [[ ${#check[@]} -gt 0 ]] && ! "${check[@]}"; then
    printf '[%s] FAILED: step %s finished but its output is incomplete; log: %s\n' \
      "$(date +%H:%M:%S)" "$name" "$log" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  say "step $name: done in $((SECONDS - start))s"
}

# DRY_RUN=1: every step prints the command it would run; at the end kd/estimate.py prints the memory
# per GPU and GPU-hours of each training step, and their total. Nothing runs, nothing is written.
: "${DRY_RUN:=0}"
dry_run_step() {
  local name="$1"
  shift
  if [[ "$1" == launch ]]; then launch_command "${@:2}"; else LAUNCH_COMMAND=("$@"); fi
  say "step $name: would run"
  printf '   '
  printf ' %q' "${LAUNCH_COMMAND[@]}"
  printf '\n'
  # one write per line: the lanes (subshells) append at the same time
  local line
  line="$(printf '%s\t' "$name"; printf ' %q' "${LAUNCH_COMMAND[@]}")"
  printf '%s\n' "$line" >>"$DRY_RUN_PLAN"
}
# A step whose output an earlier step of the plan makes (the same log) is planned once: a later pass
# or protocol finds it complete in a real run (dry_run_planned LOG; a file, as lanes are subshells).
dry_run_planned() { grep -Fxq -- "$1" "$DRY_RUN_LOGS"; }
if [[ "$DRY_RUN" == 1 ]]; then
  DRY_RUN_PLAN="$(mktemp)" DRY_RUN_LOGS="$(mktemp)"
  trap '"$PYTHON" "$REPO_ROOT/kd/estimate.py" "$DRY_RUN_PLAN"; rm -f "$DRY_RUN_PLAN" "$DRY_RUN_LOGS"' EXIT
  # The pipelines end by printing their table, which a dry run never makes.
  cat() {
    if [[ $# -eq 1 && ! -e "$1" ]]; then say "(dry run) would print $1"; else command cat "$@"; fi
  }
fi

# ---------------------------------------------------------------------------------------------
# Completeness checks (used as the CHECK of a step)
# ---------------------------------------------------------------------------------------------

# count_rows FILE: the number of non-empty lines.
count_rows() { grep -c . "$1" 2>/dev/null || true; }

# hyps_complete HYPS_DIR INPUT: every input file (INPUT: a folder of them, or one file) has its
# hypothesis file with as many rows.
hyps_complete() {
  local hyps_dir="$1" input_dir="$2" input found=0 inputs=()
  inputs=("$input_dir"/*.jsonl)
  if [[ -f "$input_dir" ]]; then inputs=("$input_dir"); fi
  for input in "${inputs[@]}"; do
    [[ -f "$input" ]] || continue
    found=1
    local hyp
    hyp="$hyps_dir/$(basename "$input")"
    [[ -f "$hyp" ]] || return 1
    [[ "$(count_rows "$hyp")" -ge "$(count_rows "$input")" ]] || return 1
  done
  [[ $found -eq 1 ]]
}

# up_to_date TARGET INPUT...: TARGET exists and no INPUT is newer than it.
up_to_date() {
  local target="$1" input
  shift
  [[ -e "$target" ]] || return 1
  for input in "$@"; do
    [[ -e "$input" ]] || return 1
    [[ "$input" -nt "$target" ]] && return 1
  done
  return 0
}

# all_exist PATH...: every PATH exists.
all_exist() {
  local path
  for path in "$@"; do [[ -e "$path" ]] || return 1; done
}

# tiny_models DATA MODELS "TEACHER_SIZE" "STUDENT_SIZE" VOCAB_SIZE SEED: make_tiny_models.py, a
# random-init teacher and student ("LAYERS HIDDEN HEADS" each) sharing a tokenizer trained on DATA's
# training set, in MODELS/teacher and MODELS/student; skipped when both exist.
tiny_models() {
  local data="$1" models="$2" teacher_size="$3" student_size="$4" vocab_size="$5" init_seed="$6"
  local t_layers t_hidden t_heads s_layers s_hidden s_heads
  read -r t_layers t_hidden t_heads <<<"$teacher_size"
  read -r s_layers s_hidden s_heads <<<"$student_size"
  step "tiny models ($(basename "$models"))" "$LOGS/tiny_models_$(basename "$models").log" \
    all_exist "$models/teacher/config.json" "$models/student/config.json" -- \
    "$PYTHON" make_tiny_models.py --data "$data" --out "$models" --vocab-size "$vocab_size" --seed "$init_seed" \
    --teacher-layers "$t_layers" --teacher-hidden "$t_hidden" --teacher-heads "$t_heads" \
    --student-layers "$s_layers" --student-hidden "$s_hidden" --student-heads "$s_heads"
}

# ---------------------------------------------------------------------------------------------
# The experiment's folders
# ---------------------------------------------------------------------------------------------

# use_experiment EXP: sets RUNS HYPS RESULTS FIGURES LOGS for experiment EXP and creates them.
use_experiment() {
  EXP="$1"
  RUNS="$OUT/runs/$EXP"
  HYPS="$OUT/hyps/$EXP"
  RESULTS="$OUT/results/$EXP"
  FIGURES="$OUT/figures/$EXP"
  LOGS="$OUT/logs/$EXP"
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$RUNS" "$HYPS" "$RESULTS" "$FIGURES" "$LOGS"
  cd "$REPO_ROOT" || die "cannot enter $REPO_ROOT"
}

# launch CONFIG SCRIPT ARGS...: accelerate launch with the config file CONFIG (none: no file) and
# NUM_PROCESSES processes (the config's number when empty); with LAUNCHER=python, `python SCRIPT
# ARGS` (one process: saves the launcher's start-up on a small CPU run).
launch() {
  launch_command "$@"
  "${LAUNCH_COMMAND[@]}"
}

# launch_command CONFIG SCRIPT ARGS...: sets LAUNCH_COMMAND, the command `launch` runs.
launch_command() {
  local config="$1" args=()
  shift
  case "$LAUNCHER" in
    python) LAUNCH_COMMAND=("$PYTHON" "$@"); return ;;
    accelerate) ;;
    *) die "LAUNCHER=$LAUNCHER: choose accelerate or python" ;;
  esac
  if [[ -n "$config" && "$config" != none ]]; then args+=(--config_file "$config"); fi
  if [[ -n "$NUM_PROCESSES" ]]; then args+=(--num_processes "$NUM_PROCESSES"); fi
  LAUNCH_COMMAND=("$PYTHON" -m accelerate.commands.launch "${args[@]}" "$@")
}

# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

# prepare_alma DATA: the paper's instruction data in DATA, from DATA_DIR (ALMA layout on disk), or
# from the Hugging Face Hub when DATA_DIR is empty. SUBSET (pairs per language pair) when set.
prepare_alma() {
  local data="$1" args=()
  if [[ -n "${DATA_DIR:-}" ]]; then
    args+=(--data-dir "$(abspath "$DATA_DIR")")
  else
    args+=(--hub)
  fi
  args+=(--pairs "${PAIRS:-de-en,cs-en}" --template "${TEMPLATE:-alpaca}" --seed "$SEED")
  if [[ -n "${SUBSET:-}" ]]; then args+=(--subset "$SUBSET"); fi
  step "prepare data" "$LOGS/prepare_data.log" all_exist "$data/train.jsonl" "$data/valid.jsonl" "$data/stats.json" -- \
    "$PYTHON" prepare_data.py "${args[@]}" --out "$data"
}

# split_valid DATA: DATA/valid.jsonl (several directions in one file) split into
# DATA/valid_by_direction/<src>-<tgt>.jsonl, so that generate.py and evaluate.py score it like a
# test folder (Fig. 2 is measured on the validation set).
split_valid() {
  local data="$1"
  step "split valid" "$LOGS/split_valid.log" up_to_date "$data/valid_by_direction/.done" "$data/valid.jsonl" -- \
    "$PYTHON" - "$data/valid.jsonl" "$data/valid_by_direction" <<'EOF'
import json, os, sys
source, folder = sys.argv[1], sys.argv[2]
os.makedirs(folder, exist_ok=True)
rows = {}
with open(source, encoding="utf-8") as handle:
    for line in handle:
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["direction"], []).append(line if line.endswith("\n") else line + "\n")
for direction, lines in rows.items():
    path = os.path.join(folder, direction + ".jsonl")
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    os.replace(path + ".partial", path)
    print(direction, len(lines))
open(os.path.join(folder, ".done"), "w").close()
EOF
}

# eval_set DATA SPLIT: sets EVAL_DIR, the folder of per-direction files that the figures are scored
# on: DATA/test (WMT22) for SPLIT=test, DATA/valid_by_direction (WMT21) for SPLIT=valid.
eval_set() {
  local data="$1" split="$2"
  # shellcheck disable=SC2034  # EVAL_DIR is read by the figure pipelines
  case "$split" in
    test) EVAL_DIR="$data/test" ;;
    valid)
      split_valid "$data"
      EVAL_DIR="$data/valid_by_direction"
      ;;
    *) die "EVAL_SPLIT=$split: choose test or valid" ;;
  esac
}

# limit_test SOURCE_DIR LIMIT DEST_DIR: the first LIMIT rows of each file of SOURCE_DIR in DEST_DIR
# (quick runs score a slice of every direction; the full test sets take hours on a CPU).
limit_test() {
  local source="$1" limit="$2" dest="$3"
  step "test slice ($limit rows)" "$LOGS/test_slice.log" test -f "$dest/.done" -- \
    write_test_slice "$source" "$limit" "$dest"
}

write_test_slice() {
  local source="$1" limit="$2" dest="$3" file name
  mkdir -p "$dest"
  for file in "$source"/*.jsonl; do
    name="$(basename "$file")"
    head -n "$limit" "$file" >"$dest/$name.partial"
    mv "$dest/$name.partial" "$dest/$name"
    echo "$name: $(count_rows "$dest/$name") rows"
  done
  touch "$dest/.done"
}

# train NAME METHOD STUDENT TEACHER TRAIN_FILE VALID_FILE [train_kd.py flags...]
#   $RUNS/NAME, skipped when $RUNS/NAME/COMPLETED exists. TEACHER may be "" (sft).
#   The method's own hyperparameters (--beta, --gamma, ...) go in the extra flags.
train() {
  local name="$1" method="$2" student="$3" teacher="$4" train_file="$5" valid_file="$6"
  shift 6
  local args=(--method "$method" --student "$student" --train-file "$train_file"
    --output-dir "$RUNS/$name" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE"
    --micro-batch-size "$MICRO_BATCH_SIZE" --lr "$LR" --warmup-ratio "$WARMUP_RATIO"
    --max-length "$MAX_LENGTH" --seed "$SEED" --resume-from-checkpoint latest)
  # on-policy runs score the student's own samples, which no cache holds: they keep the live teacher
  if [[ -n "$teacher" && "$TEACHER_CACHE" == 1 && " $* " != *" --on-policy-ratio "* ]]; then
    if [[ ! -f "$RUNS/$name/COMPLETED" ]]; then teacher_cache "$teacher" "$train_file"; fi
    args+=(--teacher-cache "$(teacher_cache_dir "$teacher" "$train_file")")
  elif [[ -n "$teacher" ]]; then
    args+=(--teacher "$teacher")
  fi
  if [[ -n "$valid_file" ]]; then args+=(--valid-file "$valid_file"); fi
  if [[ -n "$MAX_STEPS" ]]; then args+=(--max-steps "$MAX_STEPS"); fi
  if [[ -n "$EVAL_STEPS" ]]; then args+=(--eval-steps "$EVAL_STEPS"); fi
  if [[ -n "$SAVE_STEPS" ]]; then args+=(--save-steps "$SAVE_STEPS"); fi
  if [[ "$BF16" == 1 ]]; then args+=(--bf16); fi
  local extra=()
  # shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
  extra=($TRAIN_EXTRA_ARGS)
  # --resume-from-checkpoint latest: a run that crashed after a checkpoint continues from it (fresh otherwise)
  step "train $name" "$LOGS/train_$name.log" test -f "$RUNS/$name/COMPLETED" -- \
    launch "$ACCELERATE_CONFIG" train_kd.py "${args[@]}" "$@" "${extra[@]}"
}

# teacher_cache_dir TEACHER TRAIN_FILE: the cache folder of a teacher, train file, K, precision and
#   max length, $OUT/teacher_cache/<teacher folder name>-<checksum of those>.
teacher_cache_dir() {
  local key
  key="$(printf '%s\n' "$1" "$2" "$TEACHER_CACHE_TOP_K" "$TEACHER_CACHE_DTYPE" "$MAX_LENGTH" | cksum | cut -d' ' -f1)"
  printf '%s\n' "$OUT/teacher_cache/$(basename "$(dirname "$1")")-$(basename "$1")-k$TEACHER_CACHE_TOP_K-$key"
}

# teacher_cache TEACHER TRAIN_FILE: build the teacher's cache once (skipped when its manifest.json is
#   there: every later KD run of the table or sweep reuses it); a killed build resumes its shards.
#   Runs under GEN_ACCELERATE_CONFIG (each process holds the whole teacher, as in generation).
teacher_cache() {
  local teacher="$1" train_file="$2" dir extra=()
  dir="$(teacher_cache_dir "$teacher" "$train_file")"
  if [[ "$DRY_RUN" == 1 ]]; then  # a dry run writes no manifest: plan each cache once
    case " ${PLANNED_CACHES:-} " in *" $dir "*) return 0 ;; esac
    PLANNED_CACHES="${PLANNED_CACHES:-} $dir"
  fi
  if [[ "$BF16" == 1 ]]; then extra+=(--teacher-dtype bf16); fi
  step "cache teacher $(basename "$dir")" "$LOGS/cache_teacher_$(basename "$dir").log" test -f "$dir/manifest.json" -- \
    launch "$GEN_ACCELERATE_CONFIG" cache_teacher.py --teacher "$teacher" --train-file "$train_file" --out "$dir" \
    --top-k "$TEACHER_CACHE_TOP_K" --dtype "$TEACHER_CACHE_DTYPE" --max-length "$MAX_LENGTH" "${extra[@]}"
}

# system_spec SYSTEM: "method flags..." of a system, its train_kd.py method and flags with the
# pipeline's settings filled in (kd/systems.py: the paper's systems, the ablations, sweep points
# such as selfevo_gamma1.0, the systems beyond the paper, and <system>_lora). An unknown system or a
# setting that is not set stops the pipeline.
system_spec() {
  local name settings=()
  for name in "${SYSTEM_SETTINGS[@]}"; do settings+=("$name=${!name:-}"); done
  env "${settings[@]}" "$PYTHON" "$REPO_ROOT/kd/systems.py" spec "$1" || die "system $1: see the line above"
}

# generate SYSTEM MODEL INPUT_DIR: $HYPS/SYSTEM/<direction>.jsonl, skipped when every
# direction's file is there with all its rows.
generate() {
  local system="$1" model="$2" input="$3"
  local extra=()
  # shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
  extra=($GEN_EXTRA_ARGS)
  if [[ "$BF16" == 1 ]]; then extra+=(--bf16); fi
  step "generate $system" "$LOGS/generate_$system.log" hyps_complete "$HYPS/$system" "$input" -- \
    launch "$GEN_ACCELERATE_CONFIG" generate.py --model "$model" --input "$input" --output "$HYPS/$system" \
    --batch-size "$GEN_BATCH_SIZE" --max-new-tokens "$MAX_NEW_TOKENS" --num-beams "$NUM_BEAMS" "${extra[@]}"
}

# seqkd_data TEACHER_SYSTEM TEACHER_MODEL TRAIN_FILE: sequence-level KD (Kim & Rush, 2016): the
# teacher's translations of the training sources ($HYPS/<TEACHER_SYSTEM>_train/, generate.py with
# the pipeline's decoding settings) and the training file with them as references
# ($HYPS/<TEACHER_SYSTEM>_train/seqkd/train.jsonl, make_seqkd_data.py). Sets SEQKD_TRAIN_FILE.
# At the paper's scale this is the teacher translating 52,574 training sources once.
seqkd_data() {
  local teacher="$1" model="$2" train_file="$3" hyps
  hyps="$HYPS/${teacher}_train"
  generate "${teacher}_train" "$model" "$train_file"
  SEQKD_TRAIN_FILE="$hyps/seqkd/train.jsonl"
  step "seqkd data" "$LOGS/seqkd_data.log" up_to_date "$SEQKD_TRAIN_FILE" "$hyps/$(basename "$train_file")" -- \
    "$PYTHON" make_seqkd_data.py --train-file "$train_file" --hyps "$hyps/$(basename "$train_file")" \
    --out "$SEQKD_TRAIN_FILE"
}

# evaluate SYSTEM REFS_DIR [TEACHER_SYSTEM [BASELINE_SYSTEM]]: $RESULTS/SYSTEM.json (BLEU, chrF,
# COMET, teacher similarity, significance against the baseline), skipped when it is newer than
# the hypotheses it scores.
evaluate() {
  local system="$1" refs="$2" teacher="${3:-}" baseline="${4:-}"
  local args=(--hyps "$HYPS/$system" --refs "$refs" --system "$system" --comet-model "$COMET_MODEL"
    --out "$RESULTS/$system.json")
  local inputs=("$HYPS/$system"/*.jsonl)
  if [[ -n "$teacher" && "$teacher" != "$system" ]]; then
    args+=(--teacher-hyps "$HYPS/$teacher")
    inputs+=("$HYPS/$teacher"/*.jsonl)
  fi
  if [[ -n "$baseline" && "$baseline" != "$system" ]]; then
    args+=(--baseline "$HYPS/$baseline")
    inputs+=("$HYPS/$baseline"/*.jsonl)
  fi
  step "evaluate $system" "$LOGS/evaluate_$system.log" up_to_date "$RESULTS/$system.json" "${inputs[@]}" -- \
    "$PYTHON" evaluate.py "${args[@]}"
}

# make_table TABLE BASELINE RESULT_JSON...: the markdown table of the systems, in the given order,
# with the paper's dagger against BASELINE.
make_table() {
  local table="$1" baseline="$2"
  shift 2
  step "table $(basename "$table")" "$LOGS/table_$(basename "$table" .md).log" up_to_date "$table" "$@" -- \
    "$PYTHON" evaluate.py table "$@" --baseline "$baseline" --out "$table"
}

# plot NAME WHICH FIGURES PLOT_RESULTS_ARGS...: `plot_results.py --which WHICH --out $FIGURES ARGS`,
#   skipped when every file of FIGURES (space-separated paths) is newer than every input it reads
#   (the metrics.jsonl and results JSON files in or under the paths of ARGS).
plot() {
  local name="$1" which="$2" figures="$3"
  shift 3
  step "plot $name" "$LOGS/plot_$name.log" plots_up_to_date "$figures" "$@" -- \
    "$PYTHON" plot_results.py --which "$which" --out "$FIGURES" "$@"
}

# plots_up_to_date "FIGURE..." PLOT_RESULTS_ARGS...: every figure exists and is newer than every
# metrics.jsonl or *.json file named by, in, or one level under the paths among the arguments.
plots_up_to_date() {
  local figures=() inputs=() arg figure
  read -r -a figures <<<"$1"
  shift
  for arg in "$@"; do
    if [[ -f "$arg" ]]; then
      inputs+=("$arg")
    elif [[ -d "$arg" ]]; then
      inputs+=("$arg"/metrics.jsonl "$arg"/*/metrics.jsonl "$arg"/*.json)
    fi
  done
  for figure in "${figures[@]}"; do
    [[ -f "$figure" ]] || return 1
    for arg in "${inputs[@]}"; do
      if [[ -e "$arg" && "$arg" -nt "$figure" ]]; then return 1; fi
    done
  done
}

# ensure_teacher_sft DATA TEACHER_BASE: the SFT teacher of Table 1 ($OUT/runs/$TEACHER_SFT_EXP/teacher_sft,
# trained here from TEACHER_BASE when it is not there yet), for the figures that distil from it.
# Sets TEACHER_SFT_MODEL (its best validation checkpoint).
: "${TEACHER_SFT_EXP:=table1}"
ensure_teacher_sft() {
  local data="$1" teacher_base="$2" runs="$RUNS"
  RUNS="$OUT/runs/$TEACHER_SFT_EXP"
  train teacher_sft sft "$teacher_base" "" "$data/train.jsonl" "$data/valid.jsonl"
  RUNS="$runs"
  TEACHER_SFT_MODEL="$OUT/runs/$TEACHER_SFT_EXP/teacher_sft/$SFT_CHECKPOINT"
}

# sweep_run DATA EVAL_DIR STUDENT_BASE SYSTEM: one KD run of SYSTEM (a sweep point of kd/systems.py,
# e.g. selfevo_gamma0.1) from the SFT teacher (TEACHER_SFT_MODEL, set by ensure_teacher_sft) into
# STUDENT_BASE, generated on EVAL_DIR and evaluated there (the figures' sweeps).
sweep_run() {
  local data="$1" eval_dir="$2" student_base="$3" name="$4" spec=()
  system_spec "$name" >/dev/null
  read -r -a spec <<<"$(system_spec "$name")"
  train "$name" "${spec[0]}" "$student_base" "$TEACHER_SFT_MODEL" "$data/train.jsonl" "$data/valid.jsonl" "${spec[@]:1}"
  generate "$name" "$RUNS/$name/$KD_CHECKPOINT" "$eval_dir"
  evaluate "$name" "$eval_dir"
}

# ---------------------------------------------------------------------------------------------
# The Table 1 machinery (Table 1, Table 2, Fig. 4 and the quickstart)
# ---------------------------------------------------------------------------------------------

# table_pipeline DATA TEST_DIR TEACHER_MODEL STUDENT_MODEL (base models: hub names or folders):
#   1. SFT of the teacher and of the student (best validation checkpoint kept),
#   2. the five KD methods from the SFT teacher into the student base model, and sequence-level
#      KD (seqkd: SFT of the student base model on the teacher's translations of the training set),
#   3. generation on every test direction for the eight systems,
#   4. evaluation (teacher similarity against the teacher's hypotheses, significance against
#      forward KD), and the table $RESULTS/table.md.
# STUDENT_SFT_RUN: an existing student SFT run to reuse (Table 2 reuses Table 1's).
# TEACHER_MAX_STEPS: the teacher SFT's --max-steps when it differs from MAX_STEPS (toy scale).
# STUDENT_WARMUP_STEPS (toy scale): first SFT the student base model for that many steps, and start
# the student SFT and the KD runs from the result (runs/$EXP/student_base).
# Sets SYSTEMS (the table's rows) and TABLE.
table_pipeline() {
  local data="$1" test_dir="$2" teacher_base="$3" student_base="$4"
  local train_file="$data/train.jsonl" valid_file="$data/valid.jsonl"

  say "== $EXP: SFT of the teacher ($teacher_base) and the student ($student_base)"
  MAX_STEPS="${TEACHER_MAX_STEPS:-$MAX_STEPS}" train teacher_sft sft "$teacher_base" "" "$train_file" "$valid_file"
  local teacher_model="$RUNS/teacher_sft/$SFT_CHECKPOINT"
  if [[ -n "${STUDENT_WARMUP_STEPS:-}" ]]; then
    # Toy scale only: a randomly initialised student is no "base model". The skewed losses give a
    # student that puts almost no mass on the targets almost no gradient (q-hat >= (1-beta) y-tilde
    # caps the loss), where Llama-7B already speaks the language. A short SFT warm-up gives every
    # student system (SFT and the five KD methods) the same pretrained starting point.
    say "== $EXP: student warm-up ($STUDENT_WARMUP_STEPS SFT steps): the student base model of every student system"
    MAX_STEPS="$STUDENT_WARMUP_STEPS" train student_base sft "$student_base" "" "$train_file" "$valid_file"
    student_base="$RUNS/student_base/final"
  fi
  local student_sft_run="${STUDENT_SFT_RUN:-}"
  if [[ -n "$student_sft_run" ]]; then
    student_sft_run="$(abspath "$student_sft_run")"
    [[ -f "$student_sft_run/COMPLETED" ]] || die "STUDENT_SFT_RUN=$student_sft_run: no COMPLETED marker there"
    say "reusing the student SFT run $student_sft_run"
  else
    train student_sft sft "$student_base" "" "$train_file" "$valid_file"
    student_sft_run="$RUNS/student_sft"
  fi

  local kd_student="$student_base"
  case "$KD_STUDENT_INIT" in
    base) ;;
    sft) kd_student="$student_sft_run/$SFT_CHECKPOINT" ;;
    *) die "KD_STUDENT_INIT=$KD_STUDENT_INIT: choose base or sft" ;;
  esac
  say "== $EXP: the five KD methods, teacher $teacher_model -> student $kd_student"
  local system spec=()
  for system in "${TABLE1_KD_SYSTEMS[@]}"; do
    read -r -a spec <<<"$(system_spec "$system")"
    train "$system" "${spec[0]}" "$kd_student" "$teacher_model" "$train_file" "$valid_file" "${spec[@]:1}"
  done
  say "== $EXP: sequence-level KD (the teacher translates the training set; SFT of $kd_student on it)"
  seqkd_data teacher "$teacher_model" "$train_file"
  train seqkd sft "$kd_student" "" "$SEQKD_TRAIN_FILE" "$valid_file"

  say "== $EXP: generation on $(basename "$test_dir") ($(find "$test_dir" -name '*.jsonl' 2>/dev/null | wc -l) directions)"
  generate teacher "$teacher_model" "$test_dir"
  generate student_sft "$student_sft_run/$SFT_CHECKPOINT" "$test_dir"
  for system in "${TABLE1_KD_SYSTEMS[@]}"; do
    generate "$system" "$RUNS/$system/$KD_CHECKPOINT" "$test_dir"
  done
  generate seqkd "$RUNS/seqkd/$KD_CHECKPOINT" "$test_dir"

  say "== $EXP: evaluation (COMET: $COMET_MODEL), significance against forward KD"
  SYSTEMS=(teacher student_sft "${TABLE1_KD_SYSTEMS[@]}" seqkd)
  local results=()
  for system in "${SYSTEMS[@]}"; do
    evaluate "$system" "$test_dir" teacher forward
    results+=("$RESULTS/$system.json")
  done
  TABLE="$RESULTS/table.md"
  make_table "$TABLE" forward "${results[@]}"
}
