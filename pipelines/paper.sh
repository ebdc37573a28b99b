# shellcheck shell=bash
# The paper's settings (Sec. 4.1), in one place: sourced by every pipeline (table1/2, fig2-5 and the
# quickstart, which sets its toy-scale values first), never run on its own. It sources common.sh.
# Each setting is overridable from the environment; an entry script sets only what is its own
# (experiment name, sweep lists, another teacher) before sourcing this file.
#
# Disk: train_kd.py keeps each run's latest checkpoint (weights + AdamW state + schedule, all a resume
# needs; --save-total-limit 1) next to best/ and final/ (the model only). At the paper's scale in bf16
# under ZeRO-3 that is about 100 GB (checkpoint) + 2 x 13.5 GB (models) for a 7B student run and about
# 180 GB + 2 x 26 GB for the 13B teacher's SFT; Table 1's 7 runs leave about 1 TB. The checkpoint of a
# finished run (COMPLETED) is needed by nothing: `rm -r runs/<exp>/*/{step,epoch}_*` frees it.

# ---- models and hardware: 8 GPUs, DeepSpeed ZeRO-3 for training, DDP for generation ----
: "${TEACHER_MODEL:=huggyllama/llama-13b}"
: "${STUDENT_MODEL:=huggyllama/llama-7b}"
: "${OUT:=}"                                   # output root (empty: the repository root)
: "${DATA_DIR:=}"                              # ALMA-layout folder; empty: the Hugging Face Hub
: "${DATA:=}"                                  # prepared data folder (default OUT/data/alma)
: "${ACCELERATE_CONFIG:=accelerate_configs/deepspeed_zero3.yaml}"   # training
: "${GEN_ACCELERATE_CONFIG:=accelerate_configs/multi_gpu.yaml}"     # generation (a 13B model fits a GPU)
: "${NUM_GPUS:=8}"
: "${NUM_PROCESSES:=$NUM_GPUS}"
: "${TRAIN_EXTRA_ARGS:=--gradient-checkpointing}"   # more train_kd.py flags (word-split)

# ---- training: 3 epochs, batch 128, lr 2e-5, warmup 3 %, length 512, bf16 ----
: "${EPOCHS:=3}"
: "${BATCH_SIZE:=128}"
: "${MICRO_BATCH_SIZE:=4}"    # per GPU: 128 = 4 x 8 GPUs x 4 accumulation steps
: "${LR:=2e-5}"
: "${WARMUP_RATIO:=0.03}"
: "${MAX_LENGTH:=512}"
: "${MAX_STEPS:=}"            # empty: the epochs decide
: "${EVAL_STEPS:=}"           # empty: validate at each epoch end only
: "${SAVE_STEPS:=}"           # empty: train_kd.py's default
: "${BF16:=1}"
: "${SEED:=42}"

# ---- distillation (the symbols of the paper) ----
: "${KD_RATIO:=0.5}"          # lambda of Eq. 3 (forward, reverse, skew_teacher)
: "${TARGET_MIX:=0.5}"        # alpha of Eq. 4 (teacher share of the mixed target)
: "${BETA:=0.5}"              # beta of Eq. 6 (student share of the skewed distribution)
: "${GAMMA:=0.4}"             # Gamma of Eq. 8 (hard-token threshold)
: "${SKEW_BETA:=0.9}"         # beta' of Eq. 10

# ---- generation (greedy) and evaluation ----
: "${GEN_BATCH_SIZE:=16}"
: "${MAX_NEW_TOKENS:=256}"
: "${NUM_BEAMS:=1}"
: "${GEN_EXTRA_ARGS:=}"       # more generate.py flags, word-split
: "${COMET_MODEL:=Unbabel/wmt22-comet-da}"

# shellcheck source=pipelines/common.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
