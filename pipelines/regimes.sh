# shellcheck shell=bash
# The study's regimes (pipelines/study.sh) and the quickstart's (pipelines/quickstart.sh): the demo
# task with base models pretrained on its monolingual corpus, every system trained to convergence
# (generous --epochs, early stopping on the validation loss) and evaluated with its best validation
# checkpoint. Sourced after common.sh, never run on its own.
#
# A regime is a set of variables (regime_settings) and one function (run_regime) that builds:
#   $STUDY_DATA/<data>/            prepare_data.py --demo with --demo-monolingual (and R2's options)
#   $STUDY_DATA/<data>_models/     make_tiny_models.py: the teacher and the student (random init)
#   $RUNS/teacher_base, student_base   SFT on mono.jsonl: the "base models" (know the languages)
#   $RUNS/teacher                  the SFT teacher, from teacher_base, to convergence
#   $RUNS/<system>-s<seed>         every student system, from the student base (random init in R4)
#   $HYPS/..., $RESULTS/...        greedy translations of the test set, evaluate.py's scores
# Independent trainings run LANES at a time (one per core on a CPU).

# ---- the regimes (each varies one factor from R1) ----
#   R1  paper-like: teacher and student pretrained on the monolingual corpus, the student about
#       half the teacher's parameters, clean data, every system to convergence, best checkpoint
#   R2  R1 + --demo-ambiguity (several correct translations) + --demo-noise 0.1
#   R3  R1 with a small student, about a fifth of the teacher (today's quickstart student)
#   R4  R1 with a random-init student (no base model)
#   R5  R1 with a much stronger teacher: its SFT sees TEACHER_DATA_FACTOR (4) times the students'
#       training pairs (the students train on a subset of its data, the first TRAIN_PAIRS pairs of
#       each language pair); everything else R1's
# (R0, the first quickstart's regime, is in study.sh: it reuses common.sh's table_pipeline.)
#
# ---- the protocols (study/preregistration_protocols.md; PROTOCOL of run_regime) ----
#   converge  every system trained to convergence: early stopping on the validation loss (PATIENCE,
#             MIN_EPOCHS, up to EPOCHS), best validation-loss checkpoint (the study's first protocol)
#   paper     the paper's: SFT systems as converge (best validation checkpoint); KD systems a fixed
#             KD_EPOCHS epochs (per regime, from the student SFT's convergence: kd_epochs), final
#             checkpoint. The KD runs also translate VALID_DECODE_ROWS validation rows at each epoch
#             and keep their best validation BLEU in best/ (for the bleu protocol)
#   converge_bleu  every system to convergence as converge, but early stopping and the checkpoint by
#             the validation BLEU (VALID_DECODE_ROWS rows): the quickstart's protocol
#   bleu      selection by a translation metric (as fairseq's --best-checkpoint-metric bleu): SFT
#             systems to convergence with early stopping on the validation BLEU, best BLEU
#             checkpoint; KD systems the paper protocol's runs (the same KD_EPOCHS) at their best
#             validation BLEU checkpoint
# A run that another protocol of the same regime already trained with the same flags is linked,
# not trained again (paper's SFT runs are converge's, bleu's KD runs are paper's).

# regime_settings REGIME: the variables that differ between regimes.
regime_settings() {
  REGIME="$1"
  REGIME_DATA=clean                 # which prepared data set (R1, R3, R4 share one; R2, R5 their own)
  REGIME_DATA_FLAGS=""
  REGIME_TRAIN_PAIRS="$TRAIN_PAIRS"  # training pairs per language pair of the data set (the teacher's)
  REGIME_STUDENT_PAIRS=""            # set: the students train on the first N pairs of each language pair
  REGIME_STUDENT="$STUDENT_SIZE"    # layers hidden heads
  REGIME_STUDENT_INIT=base          # base: pretrained on mono.jsonl; random: make_tiny_models' init
  case "$REGIME" in
    R1) ;;
    R2) REGIME_DATA=noisy; REGIME_DATA_FLAGS="--demo-ambiguity $AMBIGUITY --demo-noise $NOISE" ;;
    R3) REGIME_STUDENT="$SMALL_STUDENT_SIZE" ;;
    R4) REGIME_STUDENT_INIT=random ;;
    R5) REGIME_DATA=rich; REGIME_TRAIN_PAIRS=$((TRAIN_PAIRS * TEACHER_DATA_FACTOR)); REGIME_STUDENT_PAIRS="$TRAIN_PAIRS" ;;
    *) die "regime $REGIME: choose R1, R2, R3, R4 or R5 (R0 is study.sh's)" ;;
  esac
}

# the systems beyond the paper (README, "Beyond the paper"): GKD's β (0.5: the symmetric JSD), the
# share of on-policy batches, the LoRA rank and scale (alpha = 2r, peft's common choice)
: "${JSD_BETA:=0.5}" "${ON_POLICY_RATIO:=0.5}" "${LORA_R:=8}" "${LORA_ALPHA:=16}"
# R5's teacher sees this many times the students' training pairs
: "${TEACHER_DATA_FACTOR:=4}"
# the translation metric of the bleu protocol (and of the paper protocol's KD runs): the validation
# rows translated at each validation (the first of each direction, in equal shares)
: "${VALID_DECODE_ROWS:=100}"

# run_lanes FUNCTION JOB...: FUNCTION JOB for every JOB (a word-split string), LANES at a time;
# the next job starts as soon as one finishes. Stops the pipeline after the running jobs when any
# failed (each failure already printed its step and log).
run_lanes() {
  local fn="$1" job running=0 failed=0 width="$LANES"
  shift
  if [[ "$DRY_RUN" == 1 ]]; then width=1; fi   # a plan reads in order
  for job in "$@"; do
    if ((running >= width)); then
      wait -n || failed=1
      running=$((running - 1))
    fi
    # shellcheck disable=SC2086  # a job is the function's word-split arguments
    ("$fn" $job) &
    running=$((running + 1))
  done
  while ((running > 0)); do
    wait -n || failed=1
    running=$((running - 1))
  done
  [[ $failed -eq 0 ]] || die "a job of $fn failed (see above); a re-run continues where it stopped"
}

# converge_flags: train_kd.py flags of a run trained to convergence and kept at its best checkpoint:
# stopped after PATIENCE epochs without a better validation loss, but never before MIN_EPOCHS (from a
# base model selfevo's validation loss first rises for several epochs: the first quickstart of this
# design stopped it at epoch 5 of 30 with its best loss at epoch 1).
converge_flags() {
  echo "--early-stopping-patience $PATIENCE --early-stopping-min-epochs $MIN_EPOCHS --save-total-limit 1"
}

# train_base NAME MODEL: SFT of MODEL on the monolingual corpus (language modelling of sentences).
train_base() {
  local name="$1" model="$2"
  EPOCHS="$BASE_EPOCHS" BATCH_SIZE="$BASE_BATCH_SIZE" MICRO_BATCH_SIZE="$BASE_BATCH_SIZE" LR="$BASE_LR" \
    EVAL_STEPS="" MAX_STEPS="$BASE_MAX_STEPS" \
    train "$name" sft "$model" "" "$DATA/mono.jsonl" "$DATA/mono_valid.jsonl" --save-total-limit 1
}

# protocol_flags METHOD: the train_kd.py flags of a run of METHOD under PROTOCOL (see the head).
protocol_flags() {
  local decode="--valid-decode-rows $VALID_DECODE_ROWS --valid-max-new-tokens $MAX_NEW_TOKENS"
  decode+=" --valid-decode-batch-size $GEN_BATCH_SIZE"
  case "$PROTOCOL:$1" in
    converge:* | paper:sft) converge_flags ;;
    bleu:sft | converge_bleu:*) echo "$(converge_flags) --best-metric bleu $decode" ;;
    paper:* | bleu:*) echo "--epochs ${KD_EPOCHS:?KD_EPOCHS not set (pipeline bug)} --best-metric bleu $decode --save-total-limit 1" ;;
    *) die "PROTOCOL=$PROTOCOL: choose converge, converge_bleu, paper or bleu" ;;
  esac
}

# protocol_checkpoint METHOD: the checkpoint a run of METHOD is evaluated with under PROTOCOL.
protocol_checkpoint() {
  case "$PROTOCOL:$1" in
    paper:sft | converge:* | converge_bleu:* | bleu:*) echo best ;;
    paper:*) echo final ;;
  esac
}

# protocol_source METHOD: the experiment whose run of METHOD this protocol reuses (the same flags), if any.
protocol_source() {
  case "$PROTOCOL:$1" in
    paper:sft) echo "${STUDY_EXP}_$REGIME" ;;
    bleu:sft | converge:* | converge_bleu:*) ;;
    bleu:*) echo "${STUDY_EXP}_${REGIME}_paper" ;;
  esac
}

# student_job SYSTEM SEED [unscored]: train, translate and score one student system under PROTOCOL
# (unscored: not scored yet: a system that trains alongside the teacher is scored after it, against
# its translations).
student_job() {
  local system="$1" seed="$2" run spec=()
  run="$system-s$seed"
  read -r -a spec <<<"$(system_spec "$system")"
  local method="${spec[0]}" teacher="$TEACHER_MODEL_DIR" train_file="$STUDENT_TRAIN_FILE"
  [[ "$method" == sft ]] && teacher=""
  if [[ "${system%_lora}" == seqkd ]]; then  # sequence-level KD: SFT on the teacher's translations (run_regime)
    train_file="${SEQKD_TRAIN_FILE:?seqkd: no teacher-translated training file (pipeline bug)}"
  fi
  local flags=() source
  read -r -a flags <<<"$(protocol_flags "$method")"
  source="$(protocol_source "$method")"
  if [[ -n "$source" && ! -e "$RUNS/$run" ]]; then   # trained with the same flags by another protocol
    if [[ -f "$OUT/runs/$source/$run/COMPLETED" && "$DRY_RUN" != 1 ]]; then ln -s "$OUT/runs/$source/$run" "$RUNS/$run"
    elif [[ "$DRY_RUN" == 1 ]] && { [[ -f "$OUT/runs/$source/$run/COMPLETED" ]] || dry_run_planned "$OUT/logs/$source/train_$run.log"; }; then
      say "step train $run: would reuse $OUT/runs/$source/$run"
      printf '%s\n' "$LOGS/train_$run.log" >>"$DRY_RUN_LOGS"   # its train step below: planned (the link)
    fi
  fi
  SEED="$seed" train "$run" "$method" "$STUDENT_INIT_MODEL" "$teacher" "$train_file" "$DATA/valid.jsonl" \
    "${spec[@]:1}" "${flags[@]}"
  generate "$run" "$RUNS/$run/$(protocol_checkpoint "$method")" "$TEST_DIR"
  [[ "${3:-}" == unscored ]] || evaluate "$run" "$TEST_DIR" teacher
}

# teacher_job: the SFT teacher from its base model, its translations and scores.
teacher_job() {
  local flags=()
  read -r -a flags <<<"$(converge_flags)"
  EPOCHS="$TEACHER_EPOCHS" train teacher sft "$RUNS/teacher_base/final" "" "$DATA/train.jsonl" "$DATA/valid.jsonl" \
    "${flags[@]}"
  generate teacher "$RUNS/teacher/best" "$TEST_DIR"
  evaluate teacher "$TEST_DIR"
}

# regime_data: the regime's prepared data; sets DATA and TEST_DIR.
regime_data() {
  DATA="$STUDY_DATA/$REGIME_DATA"
  TEST_DIR="$DATA/test"
  local flags=()
  # shellcheck disable=SC2206  # word-split flags
  flags=($REGIME_DATA_FLAGS)
  step "prepare data ($REGIME_DATA)" "$LOGS/prepare_data.log" all_exist "$DATA/stats.json" "$DATA/mono.jsonl" -- \
    "$PYTHON" prepare_data.py --demo --out "$DATA" --demo-train-pairs "$REGIME_TRAIN_PAIRS" \
    --demo-eval-pairs "$EVAL_PAIRS" --demo-monolingual "$MONO_SENTENCES" --template "$TEMPLATE" --seed "$DATA_SEED" \
    "${flags[@]}"
  STUDENT_TRAIN_FILE="$DATA/train.jsonl"
  if [[ -n "$REGIME_STUDENT_PAIRS" ]]; then
    STUDENT_TRAIN_FILE="$DATA/train_students.jsonl"
    step "students' training subset ($REGIME_STUDENT_PAIRS pairs)" "$LOGS/student_subset.log" \
      up_to_date "$STUDENT_TRAIN_FILE" "$DATA/train.jsonl" -- \
      write_pair_subset "$DATA/train.jsonl" "$REGIME_STUDENT_PAIRS" "$STUDENT_TRAIN_FILE"
  fi
}

# write_pair_subset TRAIN N OUT: the rows of TRAIN whose pair (the number in their id, shared by
# the two directions of a pair) is among the first N of its language pair, in TRAIN's order.
write_pair_subset() {
  "$PYTHON" - "$@" <<'EOF'
import json, os, re, sys
source, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kept = [line for line in open(source, encoding="utf-8")
        if line.strip() and int(re.search(r"(\d+)$", json.loads(line)["id"]).group(1)) < n]
with open(out + ".partial", "w", encoding="utf-8") as handle:
    handle.writelines(kept)
os.replace(out + ".partial", out)
print(f"{out}: {len(kept)} rows")
EOF
}

# regime_models "LAYERS HIDDEN HEADS": a random-init teacher and a student of that size with the
# data's tokenizer; sets MODELS. The tokenizer is trained on train.jsonl, deterministically, so
# every student size of one data set gets the same one (tests/test_study.py checks it).
regime_models() {
  MODELS="$STUDY_DATA/${REGIME_DATA}_models_${1// /x}"
  tiny_models "$DATA" "$MODELS" "$TEACHER_SIZE" "$1" "$VOCAB_SIZE" "$MODEL_SEED"
}

# shared_job KIND: a job of the data set's shared experiment: the teacher's base model, the
# standard student's base model, or the SFT teacher (after its base).
shared_job() {
  case "$1" in
    teacher_base) train_base teacher_base "$MODELS/teacher" ;;
    student_base) train_base student_base "$MODELS/student" ;;
    teacher) teacher_job ;;
  esac
}

# regime_job KIND ARGS...: one job of run_regime's lanes, in its own experiment (each lane is a
# subshell, so setting RUNS, LOGS, ... there leaves the other lanes alone):
#   shared teacher_base|student_base|teacher   the data set's shared experiment
#   own_base                                   R3's small student's base model (the regime's experiment)
#   student SYSTEM SEED [unscored]             a student system (the regime's experiment)
regime_job() {
  local kind="$1"
  shift
  case "$kind" in
    shared) use_experiment "$SHARED_EXP"; MODELS="$SHARED_MODELS"; shared_job "$@" ;;
    own_base) use_experiment "$REGIME_EXP"; train_base student_base "$REGIME_MODELS/student" ;;
    student) use_experiment "$REGIME_EXP"; student_job "$@" ;;
    *) die "regime_job $kind: unknown (pipeline bug)" ;;
  esac
}

# needs_teacher SYSTEM: the system learns from the teacher (every KD method, and seqkd from its
# translations); student SFT does not, so it trains while the teacher does.
needs_teacher() {
  [[ "${1%_lora}" == seqkd || "$(system_spec "$1" | cut -d' ' -f1)" != sft ]]
}

# run_regime REGIME: the whole regime for the systems of the array SYSTEMS and the seeds SEEDS.
#   Shared by the regimes of one data set (experiment ${STUDY_EXP}_<data>): the base models and
#   the SFT teacher. Per regime (experiment ${STUDY_EXP}_<regime>): the student systems, links to
#   the teacher's run, hypotheses and scores, and R3's small student base.
#   Three rounds of LANES-wide lanes: the base models; the teacher with the systems that need no
#   teacher beside it; the other systems (their order in SYSTEMS is the order they start in: put
#   the slowest first so that no lane idles at the end).
run_regime() {
  regime_settings "$1"
  PROTOCOL="${2:-converge}"
  local system
  for system in "${SYSTEMS[@]}"; do system_spec "$system" >/dev/null; done   # an unknown name stops here
  SHARED_EXP="${STUDY_EXP}_$REGIME_DATA" REGIME_EXP="${STUDY_EXP}_$REGIME"
  # each protocol of a study regime in its own experiment (a single-protocol pipeline, the quickstart,
  # sets REGIME_EXP_PER_PROTOCOL=0)
  if [[ "$PROTOCOL" != converge && "${REGIME_EXP_PER_PROTOCOL:-1}" == 1 ]]; then REGIME_EXP+="_$PROTOCOL"; fi
  if [[ "$PROTOCOL" == paper || "$PROTOCOL" == bleu ]]; then
    KD_EPOCHS="$(kd_epochs "$REGIME")"
    say "== $REGIME, protocol $PROTOCOL: KD runs of $KD_EPOCHS epochs"
  fi
  use_experiment "$SHARED_EXP"
  regime_data
  regime_models "$STUDENT_SIZE"
  SHARED_MODELS="$MODELS"
  local shared_runs="$RUNS" shared_hyps="$HYPS" shared_results="$RESULTS"
  TEACHER_MODEL_DIR="$shared_runs/teacher/best"
  local base_jobs=("shared teacher_base")
  if [[ "$REGIME_STUDENT_INIT" == random ]]; then
    STUDENT_INIT_MODEL="$MODELS/student"
  elif [[ "$REGIME_STUDENT" == "$STUDENT_SIZE" ]]; then
    base_jobs+=("shared student_base")
    STUDENT_INIT_MODEL="$shared_runs/student_base/final"
  else
    use_experiment "$REGIME_EXP"
    regime_models "$REGIME_STUDENT"
    REGIME_MODELS="$MODELS"
    base_jobs+=(own_base)
    STUDENT_INIT_MODEL="$RUNS/student_base/final"
  fi
  say "== $REGIME: base models and the SFT teacher ($shared_runs)"
  run_lanes regime_job "${base_jobs[@]}"
  local untaught=() taught=() seed
  for seed in $SEEDS; do
    for system in "${SYSTEMS[@]}"; do
      if needs_teacher "$system"; then taught+=("student $system $seed"); else untaught+=("student $system $seed unscored"); fi
    done
  done
  run_lanes regime_job "shared teacher" "${untaught[@]}"

  use_experiment "$SHARED_EXP"
  # once per data set: the shared teacher translates its training set (for the seqkd system, also
  # when study.sh runs it as one of R1's extra systems), and, with TEACHER_CACHE=1, stores its
  # distributions over it (built here, before the lanes that read it)
  if [[ " ${SYSTEMS[*]} ${R1_EXTRA_SYSTEMS:-} " == *" seqkd "* || " ${SYSTEMS[*]} " == *" seqkd_lora "* ]]; then
    seqkd_data teacher "$TEACHER_MODEL_DIR" "$STUDENT_TRAIN_FILE"
  fi
  if [[ "$TEACHER_CACHE" == 1 ]]; then teacher_cache "$TEACHER_MODEL_DIR" "$STUDENT_TRAIN_FILE"; fi

  use_experiment "$REGIME_EXP"
  # the teacher's run and translations by link, its scores by copy (evaluate.py and the summary read
  # them here); kept as they are on a re-run, so that nothing looks newer than it is
  if [[ "$DRY_RUN" != 1 ]]; then   # a dry run writes nothing
    [[ -e "$RUNS/teacher" ]] || ln -s "$shared_runs/teacher" "$RUNS/teacher"
    [[ -e "$HYPS/teacher" ]] || ln -s "$shared_hyps/teacher" "$HYPS/teacher"
    [[ "$RESULTS/teacher.json" -nt "$shared_results/teacher.json" ]] || cp -p "$shared_results/teacher.json" "$RESULTS/"
  fi
  say "== $REGIME: ${#SYSTEMS[@]} systems x seeds ($SEEDS), $LANES at a time, from $STUDENT_INIT_MODEL"
  # first the scores of the systems that trained beside the teacher (their training and translation
  # are skipped as complete), then the others
  local untaught_scores=("${untaught[@]/% unscored/}")
  run_lanes regime_job "${untaught_scores[@]}" "${taught[@]}"
}

# kd_epochs REGIME: the paper protocol's KD epochs of a regime (pre-registered rule): KD_EPOCHS_<REGIME>
# when set, else the median over seeds of the epoch at which the student SFT reached its best
# validation loss under the converge protocol, rounded up ($STUDY_RESULTS/<REGIME>/summary.json).
kd_epochs() {
  local fixed="KD_EPOCHS_$1"
  if [[ -n "${!fixed:-}" ]]; then echo "${!fixed}"; return; fi
  "$PYTHON" - "$STUDY_RESULTS/$1/summary.json" <<'EOF' || die "kd_epochs $1: run the converge protocol of $1 first (its student SFT fixes the KD epochs)"
import json, math, statistics, sys
epochs = json.load(open(sys.argv[1]))["systems"]["student_sft"]["best_epoch"]["values"]
print(math.ceil(statistics.median(epochs)))
EOF
}

# summarize REGIME [NAME]: $STUDY_RESULTS/NAME/{summary.json,table.md,curves.png} (NAME: <regime>, or
# <regime>_<protocol> for a protocol other than converge) and the settings it ran with (settings_json).
# Uses RUNS HYPS RESULTS TEST_DIR of the regime that just ran.
summarize() {
  local regime="$1" dest="$STUDY_RESULTS/$1"
  if [[ -n "${2:-}" ]]; then
    dest="$STUDY_RESULTS/$2"
  elif [[ "${PROTOCOL:-converge}" != converge ]]; then
    dest+="_$PROTOCOL"
  fi
  step "summarize $regime" "$LOGS/summarize.log" up_to_date "$dest/table.md" "$RESULTS"/*.json -- \
    write_summary "$regime" "$dest"
}

write_summary() {
  local regime="$1" dest="$2"
  mkdir -p "$dest"
  settings_json >"$dest/settings.json.partial" && mv "$dest/settings.json.partial" "$dest/settings.json"
  # the KD systems' scored checkpoint (KD_CHECKPOINT_SCORED: set by a regime with its own protocol, R0)
  "$PYTHON" summarize_study.py --regime "$regime" --runs "$RUNS" --hyps "$HYPS" --results "$RESULTS" \
    --refs "$TEST_DIR" --out "$dest" --settings "$dest/settings.json" --checkpoint "$CHECKPOINT" \
    --kd-checkpoint "${KD_CHECKPOINT_SCORED:-$(protocol_checkpoint kd)}"
}

# settings_json: the settings of the regime that just ran, for its summary (the variables named below).
settings_json() {
  local name first=1
  printf '{'
  for name in REGIME SEEDS TRAIN_PAIRS EVAL_PAIRS MONO_SENTENCES VOCAB_SIZE TEACHER_SIZE STUDENT_SIZE \
    SMALL_STUDENT_SIZE BASE_EPOCHS EPOCHS TEACHER_EPOCHS PATIENCE MIN_EPOCHS BATCH_SIZE BASE_BATCH_SIZE LR BASE_LR \
    WARMUP_RATIO KD_RATIO TARGET_MIX BETA GAMMA TOP_K AMBIGUITY NOISE TEMPLATE DATA_SEED MODEL_SEED \
    MAX_NEW_TOKENS PROTOCOL KD_EPOCHS VALID_DECODE_ROWS TEACHER_DATA_FACTOR R0_TRAIN_PAIRS R0_TEACHER_STEPS R0_WARMUP_STEPS R0_KD_STEPS R0_TEACHER_SIZE \
    R0_STUDENT_SIZE R0_BATCH_SIZE QUICK; do
    [[ $first -eq 1 ]] || printf ', '
    first=0
    printf '"%s": "%s"' "$name" "${!name:-}"
  done
  printf ', "wall_seconds_so_far": %s}\n' "$((SECONDS - ${STUDY_START:-0}))"
}

