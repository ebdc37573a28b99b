"""Train a student translator by supervised fine-tuning or by one of the paper's distillation methods.

One hand-written accelerate loop (no HF Trainer) trains every system of the paper: the SFT teacher
and student baselines (`--method sft`) and every distillation method of the registry in
kd/methods.py (the paper's forward, reverse, noevo, skew, selfevo, skew_teacher and the methods
beyond it), and a tuning-free Γ (--gamma auto). The same script runs on one CPU, on 8 GPUs with DDP
and on 8 GPUs with DeepSpeed ZeRO-3; only the accelerate config changes.

    # CPU quick run (tiny models from make_tiny_models.py, seconds per step)
    python prepare_data.py --demo --out data/demo
    python make_tiny_models.py --data data/demo --out models/tiny
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 1 train_kd.py \\
        --method selfevo --student models/tiny/student --teacher models/tiny/teacher \\
        --train-file data/demo/train.jsonl --valid-file data/demo/valid.jsonl \\
        --output-dir runs/demo-selfevo --batch-size 16 --micro-batch-size 8 --lr 1e-3 --max-steps 100

    # 8 GPUs, DDP: the SFT teacher (Llama 13B needs DeepSpeed; a 7B student fits with DDP + bf16)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_kd.py \\
        --method sft --student huggyllama/llama-7b \\
        --train-file data/alma/train.jsonl --valid-file data/alma/valid.jsonl \\
        --output-dir runs/sft-student-7b --bf16 --gradient-checkpointing --micro-batch-size 4

    # 8 GPUs, DeepSpeed ZeRO-3: Self-Evolution KD from an SFT 13B teacher into a 7B student
    # (the paper's setup: 3 epochs, batch 128, lr 2e-5, warmup 0.03, max length 512)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_kd.py \\
        --method selfevo --student runs/sft-student-7b/best --teacher runs/sft-teacher-13b/best \\
        --train-file data/alma/train.jsonl --valid-file data/alma/valid.jsonl \\
        --output-dir runs/selfevo-13b-7b --bf16 --gradient-checkpointing --micro-batch-size 4 \\
        --epochs 3 --batch-size 128 --lr 2e-5 --warmup-ratio 0.03 --max-length 512

    # a stored teacher (cache_teacher.py: one teacher pass for every KD run of a sweep) in place of --teacher
    python cache_teacher.py --teacher runs/sft-teacher-13b/best --train-file data/alma/train.jsonl \\
        --out cache/teacher-13b-k128 --top-k 128 --dtype fp16 --teacher-dtype bf16
    accelerate launch ... train_kd.py --method selfevo --teacher-cache cache/teacher-13b-k128 <other arguments>

    # continue a stopped run exactly where it stopped
    accelerate launch ... train_kd.py <same arguments> --resume-from-checkpoint latest

What one optimizer step does
  * The effective batch (--batch-size examples) is split over processes and micro-batches:
    gradient accumulation = batch-size / (micro-batch-size x processes), checked for divisibility.
    The last incomplete batch of an epoch is dropped (a different remainder each epoch).
  * Student forward (train mode) and, for KD methods, teacher forward (eval, no_grad, frozen) on the
    same micro-batch, or with --teacher-cache the teacher's stored log-probabilities of the micro-batch's
    examples (kd/teacher_cache.py; no teacher is loaded). The lm_head runs only at response positions (the positions whose shifted
    label is counted): no [B, T, V] logits over the prompt.
      - "hidden" path (single device, DDP, DeepSpeed ZeRO-1/2): the prepared model's forward with
        logits_to_keep=1 and output_hidden_states=True (hidden_states[-1] is after the final norm
        in transformers' Llama); the final hidden states at response positions go to
        kd.losses.compute_loss_from_hidden with the lm_head weight, which never builds the full
        student logits. The teacher gives hidden states + its lm_head weight likewise.
      - "logits" path (DeepSpeed ZeRO-3, FSDP: parameters are partitioned outside forward, so the
        lm_head weight cannot be used directly): forward with logits_to_keep = the sequence
        positions that hold a response token in some row of the micro-batch; the [B, K, V] logits
        (K = response span, not the prompt) go to kd.losses.compute_loss (chunked). Extra memory:
        B x K x V student logits and their gradient.
    The log says which path runs.
  * Exact token weighting: each micro-batch's loss is a SUM over its response tokens, divided by
    the number of response tokens of the whole effective batch (all micro-batches, all processes);
    the division of accelerator.backward by the accumulation steps and DDP's mean over processes
    are undone, so 1x8, 8x1, 2x4 micro-batching and 1 or N processes give the same gradient.
  * A NaN/inf loss or gradient norm skips the optimizer step with a warning (the learning-rate
    schedule still advances); --max-bad-steps in a row stop the run, leaving the last good
    checkpoint as it was. (Under DeepSpeed the engine steps inside backward, so there the bad
    steps are counted and stop the run, and skipping is DeepSpeed's own fp16 overflow check.)

Outputs in --output-dir (every file and folder appears complete or not at all: kd/io.py)
  config.json        the fully resolved configuration; "changed_args" lists the arguments a resume
                     with --allow-changed-args changed, and the step from which they apply
  metrics.jsonl      {"type": "train", step, epoch, loss, lr, grad_norm, tokens, tokens_per_s, steps_in_window,
                     beta, hard_fraction, mean_difficulty, hard_fraction/<dir>, mean_difficulty/<dir>} per
                     --logging-steps window (loss, tokens, tokens/s and the stats over the window's
                     steps_in_window good steps; mean_difficulty only for the methods that build ỹ,
                     kd.losses.TARGET_MIX_METHODS; gamma, the Γ of the row's last step, with --gamma auto);
                     mean_difficulty_hard: the mean d of the hard tokens, where the skewed loss acts;
                     taid_t: the t of the row's last step, with --method taid (kd/taid.py);
                     {"type": "valid", step, epoch, valid_loss, valid_loss/<dir>} and, when the validation
                     rows are translated (--best-metric bleu|chrf, --valid-decode-rows), valid_bleu,
                     valid_chrf (averages over the directions), valid_bleu/<dir>, valid_chrf/<dir>,
                     decoded_rows, decode_seconds
  step_{n}/ epoch_{n}/  accelerator.save_state (student, optimizer, scheduler, RNG; the teacher is never
                     saved) and trainer_state.json (with the running Γ of --gamma auto), written last: only the newest --save-total-limit
                     complete ones are kept (default 1, all a resume needs; 0 keeps all). At the paper's
                     scale one checkpoint of a 7B student (weights + AdamW state) is about 100 GB.
  best/  final/      save_pretrained model + tokenizer (best validation score by --best-metric: the
                     loss, or the BLEU / chrF of greedy translations of the validation rows / end of training)
  all_results.json   method, hyperparameters, final/best valid loss, steps, tokens, train_seconds (time
                     in optimizer steps, without validation and saving), tokens/s
  COMPLETED          written last

Resuming (--resume-from-checkpoint latest) continues the run the checkpoint belongs to: an argument
that changes the training (the method and its hyperparameters, lr and schedule, epochs/max steps,
seed, data files, models; every argument but kd.train_args.NOT_TRAINING_ARGS) that differs from the
checkpoint's is an error naming it (old -> new), unless --allow-changed-args is given: then the new
values apply from the checkpoint's step on, and config.json records them. metrics.jsonl after a
kill and a resume holds the rows of the uninterrupted run (timing fields aside).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

import torch

from kd.compat import attention_mask_for, deepspeed_kwargs_handlers, quiet_cpu_runs
from kd.data import (IGNORE_INDEX, TrainCollator, TranslationDataset, encode_prompt, length_grouped_order,  # noqa: F401
                     read_rows, shifted_targets)
from kd.decoding import HFGenerator, decode_rounds, first_line
from kd.gamma import AutoGamma
from kd.io import (WriteError, describe_os_error, fail, fail_with, jsonl_text, read_appended_jsonl, read_json,
                   replacing_folder, write_json, write_jsonl, write_text)
from kd.lora import add_adapters, merged_state_dict, target_problem, trainable_parameters
from kd.metrics import corpus_bleu, corpus_chrf
from kd.losses import KD_METHODS, REGISTRY, TARGET_MIX_METHODS, compute_loss, compute_loss_from_hidden, shared_vocab_size
from kd.models import load_model, load_tokenizer, tokenizer_mismatch
from kd.onpolicy import is_on_policy, sample_micro_batch, sampling_seed
from kd.taid import TaidSchedule
from kd.teacher_cache import TeacherCache, run_fingerprint
from kd.train_args import CONFIG_ERROR, NOT_TRAINING_ARGS, REPORTED_ARGS, check_args  # noqa: F401
from kd.train_args import parse_args as _parse_args

CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
# the per-direction sums of a logging window: tokens, hard tokens, sum of d, tokens with a d, sum of d
# over the hard tokens
STAT_COLUMNS = 5
# the methods with hard tokens (the skewed loss acts there): skew (every token) and the selecting ones
HARD_TOKEN_METHODS = tuple(m for m in TARGET_MIX_METHODS if REGISTRY[m].hard != "none")
# The collapse of the skewed loss (study/README.md, "Protocols and R5"): over the last COLLAPSE_WINDOWS logging windows
# the training loss fell while the mean d of all tokens and that of the hard tokens rose by at least
# COLLAPSE_RISE (relative; the hard tokens' in all but one of the window-to-window steps). 20 %: in R5
# the collapsed runs rose 22-37 %; healthy runs rise too for a while (the quickstart's skew 12 %, R5's
# β = 0.9 9 %), which the first rule (5 % on the hard tokens alone) took for a collapse.
COLLAPSE_WINDOWS, COLLAPSE_RISE = 5, 0.20
TRAINER_STATE = "trainer_state.json"
# Arguments that cannot change within a run, not even with --allow-changed-args, and why.
FIXED_ON_RESUME = {
    "batch_size": "the checkpoint's place in its epoch is counted in its batches",
    "train_examples": "the checkpoint's place in its epoch is counted in its batches",
    "lora_r": "the adapters' shapes depend on it",
    "lora_target_modules": "the adapters sit on those modules",
}


def parse_args(argv=None):
    """The command line (kd/train_args.py), with this docstring as --help's text."""
    return _parse_args(argv, description=__doc__)


# =============================================================================================
# The run and its state
# =============================================================================================

@dataclass
class Run:
    """What setup() builds once and every step reads: arguments, accelerator, data, models, optimizer."""
    args: Any
    loss_config: Any
    output_dir: Path
    accelerator: Any = None
    grad_accum: int = 1
    is_deepspeed: bool = False
    zero_stage: Optional[int] = None
    lean_student: bool = True          # the loss from hidden states + lm_head weight (else from logits)
    lean_teacher: bool = True
    tokenizer: Any = None
    vocab_size: int = 0                # shared by student, teacher (and a stored teacher)
    train_set: Any = None
    valid_set: Any = None
    decode_rows: list = field(default_factory=list)  # the validation rows translated at each validation
    directions: list = field(default_factory=list)
    teacher_cache: Any = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    epochs: int = 0
    run_args: dict = field(default_factory=dict)   # the training arguments, compared on resume
    resume_path: Optional[Path] = None
    resume_state: Optional[dict] = None            # the checkpoint's trainer_state.json
    changes: dict = field(default_factory=dict)    # {name: (old, new)} applied by --allow-changed-args
    changed_history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)     # config.json
    model: Any = None                  # the prepared student (DDP / DeepSpeed engine)
    student: Any = None                # the unwrapped student
    teacher: Any = None
    student_weight: Any = None         # lm_head weights of the lean paths (None: the logits path)
    teacher_weight: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    train_dataloader: Any = None
    sampler: Any = None
    trainable: int = 0
    total_parameters: int = 0


class LogWindow:
    """The sums of one logging window: loss x tokens, tokens, good steps, seconds, the on-policy share,
    and per direction the stats [D, 5] (tokens, hard tokens, sum of d, tokens with a d, sum of d over the
    hard tokens)."""

    def __init__(self, n_directions):
        self.loss, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0.0
        self.stats = torch.zeros(n_directions, STAT_COLUMNS)
        self.on_policy, self.micro_batches = 0, 0

    def state_dict(self):
        return {"loss": self.loss, "tokens": self.tokens, "steps": self.steps, "seconds": self.seconds,
                "stats": self.stats.tolist(), "on_policy": self.on_policy, "micro_batches": self.micro_batches}

    def load_state_dict(self, state):
        self.loss, self.tokens, self.steps, self.seconds = state["loss"], state["tokens"], state["steps"], state["seconds"]
        self.stats = torch.tensor(state["stats"], dtype=torch.float32)
        if self.stats.shape[1] < STAT_COLUMNS:  # an older checkpoint: no sum of d over the hard tokens (NaN)
            self.stats = torch.cat([self.stats, torch.full((len(self.stats), STAT_COLUMNS - self.stats.shape[1]),
                                                           math.nan)], dim=1)
        self.on_policy, self.micro_batches = state.get("on_policy", 0), state.get("micro_batches", 0)


@dataclass
class TrainerState:
    """Everything a resume needs besides what accelerator.save_state keeps (student, optimizer, scheduler,
    RNG): state_dict() is the checkpoint's trainer_state.json, load_state_dict() reads it back."""
    global_step: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0              # time in optimizer steps (without validation and saving)
    best_valid_loss: Optional[float] = None  # the lowest validation loss so far
    best_score: Optional[float] = None       # the best validation score by --best-metric (loss: = best_valid_loss)
    best_step: Optional[int] = None          # the step of best/, by --best-metric
    validations_without_improvement: int = 0
    window: Optional[LogWindow] = None
    auto_gamma: Optional[AutoGamma] = None  # the running Γ of --gamma auto
    taid: Optional[TaidSchedule] = None      # the moving t of --method taid
    windows: list = field(default_factory=list)  # the last logged windows (step, loss, d, d of the hard tokens)
    collapse_warning: Optional[str] = None       # said once, when the collapse's signature shows
    # not saved: derived at resume, or about the steps since it
    last_valid: Optional[float] = None      # the last validation loss
    last_score: Optional[float] = None      # the last validation score by --best-metric
    last_valid_step: Optional[int] = None
    stopped_early: bool = False
    bad_steps: list = field(default_factory=list)

    def state_dict(self, run):
        args = run.args
        return {"global_step": self.global_step, "epoch": self.global_step / run.steps_per_epoch,
                "batch_size": args.batch_size, "seed": args.seed, "train_examples": len(run.train_set),
                "args": run.run_args, "changed_args": run.changed_history,
                "best_valid_loss": self.best_valid_loss, "best_score": self.best_score, "best_step": self.best_step,
                "validations_without_improvement": self.validations_without_improvement,
                "train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
                "window": self.window.state_dict(),
                "auto_gamma": self.auto_gamma.state_dict() if self.auto_gamma else None,
                "taid": self.taid.state_dict() if self.taid else None,
                "windows": self.windows, "collapse_warning": self.collapse_warning}

    def load_state_dict(self, state):
        self.global_step, self.train_tokens, self.train_seconds = (state["global_step"], state["train_tokens"],
                                                                   state["train_seconds"])
        self.best_valid_loss, self.best_step = state["best_valid_loss"], state["best_step"]
        # a checkpoint of an older train_kd.py selected by the validation loss only
        self.best_score = state["best_score"] if "best_score" in state else state["best_valid_loss"]
        self.validations_without_improvement = state.get("validations_without_improvement", 0)
        if state.get("window") is not None:  # else a checkpoint of an older train_kd.py: the first window is short
            self.window.load_state_dict(state["window"])
        if self.auto_gamma and state.get("auto_gamma"):  # else (resumed into --gamma auto) Γ starts afresh
            self.auto_gamma.load_state_dict(state["auto_gamma"])
        if self.taid and state.get("taid"):
            self.taid.load_state_dict(state["taid"])
        self.windows, self.collapse_warning = state.get("windows", []), state.get("collapse_warning")


# =============================================================================================
# Helpers (small, pure where possible; the tests call some of them directly)
# =============================================================================================

def beta_at(step, total_steps, beta, beta_end=None):
    """β for optimizer step `step` (0-based) of `total_steps`: constant, or linear from beta to beta_end."""
    if beta_end is None or total_steps <= 1:
        return float(beta)
    fraction = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return float(beta + (beta_end - beta) * fraction)


def accumulation_steps(batch_size, micro_batch_size, num_processes):
    """Gradient accumulation steps; the effective batch must split evenly."""
    per_step = micro_batch_size * num_processes
    if batch_size % per_step:
        fail(f"--batch-size {batch_size}", f"not divisible by --micro-batch-size {micro_batch_size} x "
             f"{num_processes} process(es) = {per_step}",
             "choose sizes so that batch = micro x processes x accumulation", code=CONFIG_ERROR)
    return batch_size // per_step


def is_finite(value):
    return value is not None and math.isfinite(float(value))


def finite_or_none(value):
    return float(value) if value is not None and math.isfinite(float(value)) else None


def list_checkpoints(output_dir):
    """Complete checkpoints of a run, oldest first: [(global_step, path)] (complete = has trainer_state.json)."""
    found = []
    for path in Path(output_dir).glob("*_*"):
        match = CHECKPOINT_NAME.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            state = read_json(path / TRAINER_STATE)
            found.append((state["global_step"], match.group(1) == "epoch", path))
    return [(step, path) for step, _, path in sorted(found, key=lambda item: (item[0], item[1]))]


def resolve_checkpoint(resume, output_dir):
    """The checkpoint folder to resume from, or None ('latest' with no checkpoint yet)."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not CHECKPOINT_NAME.match(path.name) or not (path / TRAINER_STATE).is_file():
        fail(f"--resume-from-checkpoint {resume}", "not a complete step_N or epoch_N folder written by train_kd.py",
             "pass latest or such a folder", code=CONFIG_ERROR)
    return path


def training_args(args, train_examples):
    """The arguments that change what is trained (compared on resume), and the number of usable examples."""
    return {**{k: v for k, v in vars(args).items() if k not in NOT_TRAINING_ARGS}, "train_examples": train_examples}


def changed_args(saved, current):
    """{name: (checkpoint's value, this run's)} of every training argument that differs."""
    return {name: (saved.get(name), value) for name, value in current.items()
            if name in saved and saved[name] != value}


def check_resume(state, current, resume_path, allow_changed):
    """The changes of a resume against its checkpoint: an error unless allowed (never for FIXED_ON_RESUME)."""
    # Checkpoints of an older train_kd.py hold only these three.
    saved = state.get("args") or {key: state.get(key) for key in ("batch_size", "seed", "train_examples")}
    changes = changed_args(saved, current)
    listed = "; ".join(f"--{name.replace('_', '-')} {old} -> {new}" for name, (old, new) in changes.items())
    fixed = [name for name in changes if name in FIXED_ON_RESUME]
    if fixed:
        fail(f"--resume-from-checkpoint {resume_path}", f"saved with other arguments: {listed}",
             f"{', '.join(fixed)} cannot change within a run ("
             + "; ".join(dict.fromkeys(FIXED_ON_RESUME[name] for name in fixed)) + "); resume with the "
             "checkpoint's values of them, or start a new run", code=CONFIG_ERROR)
    if changes and not allow_changed:
        fail(f"--resume-from-checkpoint {resume_path}", f"saved with other arguments: {listed}",
             "resume with the checkpoint's values, or pass --allow-changed-args to apply the new ones from its "
             f"step {state['global_step']} on (config.json records them)", code=CONFIG_ERROR)
    return changes


def reapply_optimizer_args(optimizer, lr_scheduler, args):
    """After loading a checkpoint saved with another --lr, --weight-decay or --adam-epsilon
    (--allow-changed-args): the new values from this step on. The schedule's shape (--lr-scheduler,
    --warmup-ratio, total steps) is already the new one: the checkpoint restores only its base rates."""
    decays = (args.weight_decay, 0.0)  # the parameter groups of setup_optimizer(): with and without weight decay
    lr_scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for group, decay, factor in zip(optimizer.param_groups, decays, lr_scheduler.lr_lambdas):
        group.update(initial_lr=args.lr, weight_decay=decay, eps=args.adam_epsilon,
                     lr=args.lr * factor(lr_scheduler.last_epoch))
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def model_vocab_size(name_or_path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).vocab_size


def deepspeed_plugins(args):
    """accelerate DeepSpeed plugins under `accelerate launch` with a DeepSpeed config, else None: the
    student's from the accelerate YAML, and for a teacher a ZeRO-3 inference config (partitioned
    weights, no optimizer)."""
    from accelerate import DeepSpeedPlugin

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    student_plugin = DeepSpeedPlugin()  # the config file of the accelerate YAML
    if student_plugin.is_auto("gradient_clipping"):
        student_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    plugins = {"student": student_plugin}
    if args.teacher:
        plugins["teacher"] = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "offload_param": {"device": "none"},
            },
        })
    return plugins


class EpochSampler(torch.utils.data.Sampler):
    """A seeded random order per epoch (seed + epoch), optionally grouped by length; the same on every process."""

    def __init__(self, lengths, seed, group_size=None):
        self.lengths, self.seed, self.group_size, self.epoch = list(lengths), seed, group_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if self.group_size:
            return iter(length_grouped_order(self.lengths, self.group_size, self.seed + self.epoch))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())

    def __len__(self):
        return len(self.lengths)


class MicroBatchCollator:
    """One loader batch = one process's share of an optimizer step, as a list of padded micro-batches."""

    def __init__(self, pad_token_id, micro_batch_size):
        self.collate, self.micro_batch_size = TrainCollator(pad_token_id), micro_batch_size

    def __call__(self, examples):
        size = self.micro_batch_size
        return [self.collate(examples[i:i + size]) for i in range(0, len(examples), size)]


def decode_subset(rows, n):
    """The validation rows translated at each validation: all of them (n None), or n, the first ones of
    each direction in equal shares (directions in file order; the first n mod D directions one more)."""
    if n is None:
        return list(rows)
    by_direction = {}
    for row in rows:
        by_direction.setdefault(row["direction"], []).append(row)
    share, extra = divmod(n, len(by_direction))
    return [row for i, direction_rows in enumerate(by_direction.values())
            for row in direction_rows[:share + (i < extra)]]


def stop_after_write_error(error, what, output_dir, incomplete=None):
    """Stop after `what` could not be written: why, in words, and where a resume would continue.
    `incomplete`: a folder the failed write left half-written, removed (it only takes space)."""
    if isinstance(error, OSError):
        reason = describe_os_error(error)
    else:  # torch's writer reports a full disk as a RuntimeError ("[enforce fail at inline_container.cc ...")
        free = shutil.disk_usage(output_dir).free
        reason = (f"the disk is full ({free // 2**20} MiB free)" if free < 64 * 2**20
                  else (str(error).strip().splitlines() or [type(error).__name__])[0])
    if incomplete is not None:
        shutil.rmtree(incomplete, ignore_errors=True)
    checkpoints = list_checkpoints(output_dir)
    resume = (f"--resume-from-checkpoint latest will continue from {checkpoints[-1][1]} (step {checkpoints[-1][0]}), "
              "the newest complete checkpoint" if checkpoints else
              "no complete checkpoint yet: --resume-from-checkpoint latest will start from the beginning")
    fail(what, f"could not be written: {reason}", f"free some space, then {resume}")


# =============================================================================================
# Setup: input checks, accelerator, data, models, optimizer (every bad input stops in words, early)
# =============================================================================================

def check_inputs(run):
    """The checks that need no model: the command line, the data files, the output folder.
    Returns the rows of the train and valid files, or None when the run had completed."""
    args, output_dir = run.args, run.output_dir
    train_rows = read_rows(args.train_file, "--train-file")
    valid_rows = read_rows(args.valid_file, "--valid-file") if args.valid_file else []
    if (output_dir / "COMPLETED").is_file() and args.resume_from_checkpoint == "latest":
        print(f"{output_dir}: run already completed; nothing to do")
        return None
    if args.resume_from_checkpoint is None and output_dir.is_dir() and (
            list_checkpoints(output_dir) or (output_dir / "final").exists()):
        fail(f"--output-dir {output_dir}", "already holds a run",
             "pass --resume-from-checkpoint latest to continue it, or choose another --output-dir", code=CONFIG_ERROR)
    run.resume_path = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    return train_rows, valid_rows


def fsdp_without_its_devices():
    """An FSDP launch config (accelerate_configs/fsdp.yaml) on a machine without GPUs: accelerate runs
    FSDP on accelerator devices only, and would stop (no available devices) or run plain DDP instead."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()


def setup_accelerator(run):
    """The Accelerator (student and teacher DeepSpeed plugins under DeepSpeed), the accumulation steps
    and which loss path runs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration, set_seed

    args = run.args
    if fsdp_without_its_devices():
        fail("accelerate launch with an FSDP config (accelerate_configs/fsdp.yaml)", "needs GPUs: accelerate runs FSDP on accelerator devices only, and on this machine it would stop or "
             "run plain DDP instead", "on a CPU use accelerate_configs/deepspeed_zero3.yaml (ZeRO-3 over 2+ "
             "processes) or accelerate_configs/cpu.yaml (DDP)", code=CONFIG_ERROR)
    plugins = deepspeed_plugins(args)
    accelerator = Accelerator(
        # accelerate's torchrun launcher (any --num_processes > 1) does not pass use_cpu on: on a machine
        # without GPUs ask for CPU DDP (gloo) here. DeepSpeed runs its own CPU path and must not get cpu=True.
        cpu=not torch.cuda.is_available() and plugins is None,
        mixed_precision="bf16" if args.bf16 else None,
        deepspeed_plugins=plugins,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        kwargs_handlers=deepspeed_kwargs_handlers(plugins is not None),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(run.output_dir),
                                            logging_dir=str(run.output_dir / "tensorboard")),
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            accelerator.distributed_type != DistributedType.FSDP:  # never run something else silently
        fail("accelerate launch", f"asked for FSDP, accelerate set up {accelerator.distributed_type}",
             "run FSDP on GPUs, or use deepspeed_zero3.yaml", code=CONFIG_ERROR)
    run.accelerator = accelerator
    run.grad_accum = accumulation_steps(args.batch_size, args.micro_batch_size, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = run.grad_accum
    run.is_deepspeed = is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    run.zero_stage = accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed else None
    # The lean path needs the real lm_head weight outside forward; ZeRO-3 and FSDP partition it.
    run.lean_student = not (run.zero_stage == 3 or accelerator.distributed_type == DistributedType.FSDP)
    run.lean_teacher = not is_deepspeed and accelerator.distributed_type != DistributedType.FSDP
    set_seed(args.seed)


def setup_data(run, train_rows, valid_rows):
    """Tokenizer (the teacher's must match), the shared vocabulary, the datasets, a stored teacher, the
    number of steps, the resume check against the checkpoint, and the data loader."""
    args = run.args
    tokenizer = load_tokenizer(args.student)
    vocab_size = model_vocab_size(args.student)
    if args.teacher:
        reason = tokenizer_mismatch(tokenizer, load_tokenizer(args.teacher))
        if reason:
            fail(f"--teacher {args.teacher}", f"its tokenizer does not match the student's: {reason}",
                 "distil from a teacher with the student's tokenizer", code=CONFIG_ERROR)
        try:
            vocab_size = shared_vocab_size(vocab_size, model_vocab_size(args.teacher))
        except ValueError as error:
            fail(f"--teacher {args.teacher}", str(error), "pass a teacher of the student's family", code=CONFIG_ERROR)
    if len(tokenizer) > vocab_size:
        fail(f"--student {args.student}", f"tokenizer has {len(tokenizer)} tokens, more than the (shared) model "
             f"vocabulary {vocab_size}", "pass a model whose embeddings cover its tokenizer", code=CONFIG_ERROR)
    try:
        run.train_set = TranslationDataset(train_rows, tokenizer, args.max_length,
                                           source_name=f"--train-file {args.train_file}")
        run.valid_set = (TranslationDataset(valid_rows, tokenizer, args.max_length,
                                            source_name=f"--valid-file {args.valid_file}") if valid_rows else None)
    except ValueError as error:
        fail_with(error, code=CONFIG_ERROR)
    if args.teacher_cache:  # checked against this run's data, tokenizer, template and max length
        run.teacher_cache = TeacherCache(args.teacher_cache, run_fingerprint(args.train_file, tokenizer,
                                                                             args.max_length, len(run.train_set)))
        try:
            vocab_size = shared_vocab_size(vocab_size, run.teacher_cache.vocab)
        except ValueError as error:
            fail(f"--teacher-cache {args.teacher_cache}", str(error), "pass a cache of a teacher of the student's "
                 "family", code=CONFIG_ERROR)
        if run.teacher_cache.sampling and not REGISTRY[args.method].linear_in_p:
            fail(f"--teacher-cache {args.teacher_cache} with --method {args.method}", f"the cache holds "
                 f"{run.teacher_cache.sampling} sampled tokens per position (its manifest: sampling "
                 f"{run.teacher_cache.sampling}): unbiased only for the losses linear in p ("
                 f"{', '.join(m for m, entry in REGISTRY.items() if entry.linear_in_p)}), and this one is not (its bias "
                 "and noise: bench/README.md, 'A stored teacher')", "pass --teacher, or a top-K cache "
                 "(cache_teacher.py --top-k)", code=CONFIG_ERROR)
    if args.best_metric != "loss" or args.valid_decode_rows is not None:
        run.decode_rows = decode_subset(valid_rows, args.valid_decode_rows)
    run.tokenizer, run.vocab_size, run.directions = tokenizer, vocab_size, run.train_set.directions
    run.steps_per_epoch = len(run.train_set) // args.batch_size
    if run.steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size}", f"more than the {len(run.train_set)} usable examples of --train-file "
             f"{args.train_file}", "pass a smaller --batch-size or more data", code=CONFIG_ERROR)
    run.total_steps = args.epochs * run.steps_per_epoch
    if args.max_steps > 0:
        run.total_steps = min(run.total_steps, args.max_steps)
    run.epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    run.run_args = training_args(args, len(run.train_set))
    if run.resume_path is not None:
        run.resume_state = read_json(run.resume_path / TRAINER_STATE)
        run.changes = check_resume(run.resume_state, run.run_args, run.resume_path, args.allow_changed_args)
        run.changed_history = run.resume_state.get("changed_args", [])
        if run.changes:
            step = run.resume_state["global_step"]
            run.changed_history = run.changed_history + [{"step": step, "changes": {
                k: list(v) for k, v in run.changes.items()}}]
            for name, (old, new) in run.changes.items():
                run.accelerator.print(f"--allow-changed-args: --{name.replace('_', '-')} {old} -> {new} "
                                      f"from step {step} on")
    run.sampler = EpochSampler(run.train_set.lengths(), args.seed,
                               args.micro_batch_size if args.group_by_length else None)
    run.train_dataloader = torch.utils.data.DataLoader(
        run.train_set, batch_size=args.micro_batch_size * run.grad_accum, sampler=run.sampler, drop_last=True,
        collate_fn=MicroBatchCollator(tokenizer.pad_token_id, args.micro_batch_size), num_workers=args.num_workers,
        # its own generator: a DataLoader without one draws its workers' base seed from the global RNG at
        # every iter(), so a resumed epoch would shift the stream that dropout and on-policy sampling use
        generator=torch.Generator().manual_seed(args.seed))


def write_config(run):
    """config.json: the fully resolved configuration, written before any model loads."""
    args, accelerator, cache = run.args, run.accelerator, run.teacher_cache
    run.config = {
        **vars(args),
        "teacher_dtype": args.teacher_dtype or ("bf16" if args.bf16 else "fp32"),
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": run.grad_accum,
        "distributed_type": str(accelerator.distributed_type),
        "zero_stage": run.zero_stage,
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if accelerator.distributed_type == "FSDP" else None,
        "mixed_precision": accelerator.mixed_precision,
        "student_loss_path": "hidden" if run.lean_student else "logits",
        "teacher_loss_path": ("cache" if cache else None) if not args.teacher else (
            "hidden" if run.lean_teacher else "logits"),
        "teacher_cache_manifest": None if cache is None else {
            k: cache.manifest[k] for k in ("teacher", "teacher_sha256", "top_k", "dtype", "vocab_size")},
        "vocab_size": run.vocab_size,
        "train_examples": len(run.train_set),
        "valid_examples": len(run.valid_set) if run.valid_set else 0,
        "dropped_too_long": run.train_set.dropped_too_long,
        "directions": run.directions,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "changed_args": run.changed_history,
    }
    if accelerator.is_main_process:
        try:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            stop_after_write_error(error, f"--output-dir {run.output_dir}", run.output_dir.parent)
        write_json(run.output_dir / "config.json", run.config)
    accelerator.print(json.dumps(run.config, indent=2))
    accelerator.print(f"loss path: student {run.config['student_loss_path']}, teacher {run.config['teacher_loss_path']} "
                      f"({run.config['distributed_type']}, ZeRO stage {run.zero_stage})")
    if run.train_set.dropped_too_long:
        accelerator.print(f"dropped {run.train_set.dropped_too_long} training examples longer than "
                          f"--max-length {args.max_length}")


def setup_models(run):
    """The student (with LoRA adapters), the frozen teacher, AdamW and the schedule, all prepared."""
    from transformers import get_scheduler

    args, accelerator = run.args, run.accelerator
    # a LoRA student's frozen base weights need no fp32 master copy: bf16 under --bf16
    model = load_model(args.student, dtype="bf16" if args.lora_r and args.bf16 else "fp32")
    if args.lora_r:
        try:
            model = add_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        except ValueError as error:  # e.g. a target module the model does not have
            fail(f"--lora-target-modules {' '.join(args.lora_target_modules)}", str(error).splitlines()[0],
                 "name modules of the student (e.g. q_proj v_proj), or all-linear", code=CONFIG_ERROR)
    run.trainable, run.total_parameters = trainable_parameters(model)
    accelerator.print(f"student: {run.trainable:,} trainable parameters of {run.total_parameters:,}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher, dtype=run.config["teacher_dtype"])
        teacher.eval().requires_grad_(False)

    no_decay = ("bias", "norm")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    parameter_groups = [  # reapply_optimizer_args relies on this order: with weight decay, then without
        {"params": [p for n, p in trained if not any(k in n.lower() for k in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in trained if any(k in n.lower() for k in no_decay)],
         "weight_decay": 0.0},
    ]
    # a LoRA student has no trainable norm or bias: DeepSpeed refuses an empty parameter group
    parameter_groups = [group for group in parameter_groups if group["params"]]
    optimizer = torch.optim.AdamW(parameter_groups, lr=args.lr, eps=args.adam_epsilon)
    # The scheduler is stepped once per optimizer step by the loop (not prepared: accelerate would
    # step it once per process) and checkpointed through register_for_checkpointing.
    run.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=math.ceil(args.warmup_ratio * run.total_steps),
                                     num_training_steps=run.total_steps)
    run.model, run.optimizer, run.train_dataloader = accelerator.prepare(model, optimizer, run.train_dataloader)
    accelerator.register_for_checkpointing(run.lr_scheduler)
    if teacher is not None:
        if run.is_deepspeed:  # the teacher as the second DeepSpeed plugin's engine
            accelerator.state.select_deepspeed_plugin("teacher")
            teacher = accelerator.prepare(teacher)
            accelerator.state.select_deepspeed_plugin("student")
            # prepare() left the teacher's config here; get_state_dict reads the ZeRO stage from it.
            accelerator.deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
            # save_state saves every prepared model: keep the teacher out of the checkpoints.
            accelerator._models = [m for m in accelerator._models if m is not teacher]
        else:
            teacher = teacher.to(accelerator.device)
        teacher.eval()
    run.teacher = teacher
    run.student = accelerator.unwrap_model(run.model)
    run.student_weight = run.student.get_output_embeddings().weight if run.lean_student else None
    run.teacher_weight = teacher.get_output_embeddings().weight if teacher is not None and run.lean_teacher else None


def check_lora_targets(args):
    """--lora-target-modules against the student's module names, from its config alone (a skeleton on
    the meta device: no weights are read), before anything is written."""
    if not args.lora_r:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.student)
    # the model class itself, not from_config: under DeepSpeed ZeRO-3 from_config partitions the parameters
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM._model_mapping[type(config)](config)
    problem = target_problem([name for name, _ in skeleton.named_modules()], args.lora_target_modules)
    if problem:
        fail(f"--lora-target-modules {' '.join(args.lora_target_modules)}", problem,
             "name linear layers of the student (e.g. q_proj v_proj), or all-linear", code=CONFIG_ERROR)


def setup(args):
    """The run, ready to train; None when it had completed (--resume-from-checkpoint latest). A
    configuration error stops with exit status 2 and leaves nothing behind: the checks run before
    config.json is written, and one found later (a model that does not load as asked) removes what this
    run wrote."""
    run = Run(args, check_args(args), Path(args.output_dir))
    rows = check_inputs(run)
    if rows is None:
        return None
    setup_accelerator(run)
    setup_data(run, *rows)
    check_lora_targets(args)
    fresh = not run.output_dir.exists()
    write_config(run)
    try:
        setup_models(run)
    except SystemExit as stop:
        if getattr(stop, "code", None) == CONFIG_ERROR and run.resume_path is None and run.accelerator.is_main_process:
            (run.output_dir / "config.json").unlink(missing_ok=True)
            if fresh and not any(run.output_dir.iterdir()):
                run.output_dir.rmdir()
        raise
    return run


def initialise_optimizer_state(optimizer):
    """Give every parameter its optimizer state (AdamW's moments and step) by one step with zero
    gradients at learning rate 0, which changes no weight; the checkpoint's values then replace it."""
    if optimizer.state:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for parameter in group["params"]:
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)


def start_or_resume(run):
    """The trainer state: from the checkpoint (the student, optimizer, scheduler and RNG too), or fresh.
    metrics.jsonl keeps exactly the rows up to the checkpoint's step."""
    args, accelerator, output_dir = run.args, run.accelerator, run.output_dir
    state = TrainerState(window=LogWindow(len(run.directions)),
                         auto_gamma=AutoGamma(args.gamma_quantile, args.gamma_momentum) if args.gamma == "auto" else None,
                         taid=TaidSchedule.of(run.loss_config) if REGISTRY[args.method].moving_t else None)
    if run.resume_path is not None:
        accelerator.print(f"resuming from {run.resume_path}")
        if accelerator.distributed_type == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 1:
            # accelerate's FSDP1 loader reads a sharded optimizer checkpoint into the optimizer's own state
            # dict, which is empty before a first step: without this the moments restart from zero
            initialise_optimizer_state(run.optimizer.optimizer)
        accelerator.load_state(str(run.resume_path))
        if run.changes:
            reapply_optimizer_args(run.optimizer, run.lr_scheduler, args)
        state.load_state_dict(run.resume_state)
        metrics_file = output_dir / "metrics.jsonl"
        kept, _ = read_appended_jsonl(metrics_file, required=("type", "step"))
        kept = [row for row in kept if row["step"] <= state.global_step]  # rows written after the checkpoint go
        validated = [row for row in kept if row["type"] == "valid" and row["step"] == state.global_step]
        if validated:  # this step's validation ran before the checkpoint: not again at the end
            state.last_valid, state.last_valid_step = validated[-1]["valid_loss"], state.global_step
            state.last_score = validated[-1].get(f"valid_{args.best_metric}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and metrics_file.is_file():
            write_jsonl(metrics_file, kept)
        accelerator.wait_for_everyone()
    else:
        if args.resume_from_checkpoint == "latest":
            accelerator.print(f"--resume-from-checkpoint latest: no checkpoint in {output_dir} yet; starting from scratch")
        if accelerator.is_main_process:  # rows of an earlier attempt that never reached a checkpoint
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    # a run resumed from the checkpoint written where it decided to stop early stops again at once
    state.stopped_early = should_stop_early(run, state)
    if args.report_to != "none":
        accelerator.init_trackers("train_kd", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                      for k, v in run.config.items()})
    return state


# =============================================================================================
# One optimizer step
# =============================================================================================

def student_rows(model, batch, counted, keep, weight=None):
    """Student at the response positions: (hidden [N, H], weight) on the lean path (weight = its lm_head
    weight), else (logits [N, V], None)."""
    mask = attention_mask_for(model, batch["attention_mask"])
    if weight is not None:
        out = model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=1,
                    output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][counted].to(weight.dtype), weight
    out = model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep, use_cache=False)
    return out.logits[counted[:, keep]], None


def teacher_inputs(teacher, batch, counted, keep, weight=None):
    """Teacher at the response positions: hidden + its lm_head weight (lean path: weight given) or
    logits [N, V'] (rows as counted)."""
    mask = attention_mask_for(teacher, batch["attention_mask"])
    with torch.no_grad():
        if weight is not None:
            out = teacher(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=1,
                          output_hidden_states=True, use_cache=False)
            return {"teacher_hidden": out.hidden_states[-1][counted], "teacher_weight": weight}
        out = teacher(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep, use_cache=False)
        return {"teacher_logits": out.logits[counted[:, keep]]}


def micro_batch_loss(run, batch, step_config, on_policy=False):
    """Summed loss over the micro-batch's response tokens, per-direction stat sums [D, 5], and d of
    each counted token (for --gamma auto). `step_config`: the LossConfig of this step (β, Γ, t)."""
    targets = shifted_targets(batch["labels"])
    counted = targets != IGNORE_INDEX
    keep = counted.any(0).nonzero().squeeze(1)  # the lm_head runs at response positions only
    token_directions = batch["direction"][:, None].expand_as(targets)[counted]
    rows, weight = student_rows(run.model, batch, counted, keep, run.student_weight)
    teacher_kwargs = {}
    if run.teacher is not None:
        with run.accelerator.autocast():
            teacher_kwargs = teacher_inputs(run.teacher, batch, counted, keep, run.teacher_weight)
    elif run.teacher_cache is not None:  # stored log-probabilities enter the losses as the teacher's logits
        teacher_kwargs = {"teacher_logits": run.teacher_cache.log_probs(batch["index"], counted.sum(1), rows.device)}
    if on_policy:  # the divergence alone on the student's own sample (kd/onpolicy.py)
        step_config = dataclasses.replace(step_config, kd_ratio=1.0)
    if weight is not None:
        loss_sum, stats = compute_loss_from_hidden(step_config, rows, weight, targets[counted],
                                                   **teacher_kwargs, token_stats=True)
    else:
        loss_sum, stats = compute_loss(step_config, rows, teacher_kwargs.get("teacher_logits"), targets[counted],
                                       token_stats=True)
    # per direction: tokens, hard tokens, sum of difficulty, tokens with a difficulty
    difficulty = stats["token_difficulty"].float()
    has_difficulty = ~torch.isnan(difficulty)
    known_difficulty = torch.where(has_difficulty, difficulty, torch.zeros_like(difficulty))
    hard = stats["token_hard"].float()
    columns = torch.stack([torch.ones_like(difficulty), hard, known_difficulty, has_difficulty.float(),
                           known_difficulty * hard], dim=1)
    sums = torch.zeros(len(run.directions), STAT_COLUMNS, device=columns.device).index_add_(0, token_directions,
                                                                                            columns)
    return loss_sum, sums, difficulty


@dataclass
class StepResult:
    loss: float                # mean over the step's response tokens (all processes)
    tokens: int
    grad_norm: Optional[float]
    lr: float                  # the learning rate the step used
    beta: float
    gamma: float
    taid_t: Optional[float]    # t of --method taid this step used
    stat_sums: Any             # [D, 5] of this process
    on_policy: list            # per micro-batch: sampled by the student
    seconds: float
    good: bool                 # finite loss and gradient norm: the optimizer stepped


def optimizer_step(run, state, group):
    """One optimizer step on one process's share `group` of the effective batch (a list of micro-batches)."""
    args, accelerator = run.args, run.accelerator
    step_start = time.perf_counter()
    beta = beta_at(state.global_step, run.total_steps, args.beta, args.beta_end)
    gamma = state.auto_gamma.value if state.auto_gamma else run.loss_config.gamma  # one Γ for every micro-batch
    taid_t = state.taid.value if state.taid else None                              # one t for every micro-batch
    step_config = dataclasses.replace(run.loss_config, beta=beta, gamma=gamma, taid_t=taid_t)
    # on-policy micro-batches: the student's own responses, sampled before any forward pass of the
    # step so that the token count below counts them (kd/onpolicy.py)
    on_policy = [is_on_policy(args.seed, state.global_step, index, args.on_policy_ratio) for index in range(len(group))]
    group = [sample_micro_batch(run.student, micro_batch, pad_token_id=run.tokenizer.pad_token_id,
                                eos_token_id=run.tokenizer.eos_token_id, max_new_tokens=args.on_policy_max_new_tokens,
                                max_length=args.max_length, temperature=args.on_policy_temperature,
                                synced_gpus=run.zero_stage == 3,
                                seed=sampling_seed(args.seed, state.global_step, index, accelerator.process_index))
             if sampled else micro_batch for index, (micro_batch, sampled) in enumerate(zip(group, on_policy))]
    local_tokens = sum(int((shifted_targets(mb["labels"]) != IGNORE_INDEX).sum()) for mb in group)
    step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    # Exact token weighting: each micro-batch's loss is a sum over its tokens; undo accelerate's
    # 1/accumulation and DDP's mean over processes, and divide by the tokens of the whole effective batch.
    scale = accelerator.num_processes * run.grad_accum / step_tokens
    loss_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    stat_sums = torch.zeros(len(run.directions), STAT_COLUMNS, device=accelerator.device)
    step_difficulties = []
    for micro_batch, sampled in zip(group, on_policy):
        with accelerator.accumulate(run.model):
            loss_sum, sums, difficulty = micro_batch_loss(run, micro_batch, step_config, sampled)
            accelerator.backward(loss_sum * scale)
            loss_total += loss_sum.detach().double()
            stat_sums += sums
            if state.auto_gamma:
                step_difficulties.append(difficulty)
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else None
    step_loss = float(accelerator.reduce(loss_total, "sum")) / step_tokens
    good = is_finite(step_loss) and (grad_norm is None or is_finite(grad_norm))
    if good:
        run.optimizer.step()
    else:  # the schedule still advances; --max-bad-steps in a row stop the run (record_step)
        warnings.warn(f"step {state.global_step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; "
                      "skipping the optimizer step")
    if state.auto_gamma:  # Γ of the next step from d of every token of this one, all processes (kd/gamma.py)
        local = torch.cat(step_difficulties)
        state.auto_gamma.update(accelerator.gather(accelerator.pad_across_processes(local, pad_index=math.nan)))
    if state.taid and good:  # t of the next step from this step's loss, the same on every process (kd/taid.py)
        state.taid.update(step_loss, state.global_step + 1, run.total_steps)
    lr = run.lr_scheduler.get_last_lr()[0]
    run.lr_scheduler.step()
    run.optimizer.zero_grad()
    state.global_step += 1
    return StepResult(step_loss, step_tokens, grad_norm, lr, beta, gamma, taid_t, stat_sums, on_policy,
                      time.perf_counter() - step_start, good)


# =============================================================================================
# Logging, validation, checkpoints (every write stops in words)
# =============================================================================================

def train_row(window, step, steps_per_epoch, lr, grad_norm, beta, method, directions):
    """The metrics.jsonl row of a logging window (see the module docstring for the fields)."""
    row = {"type": "train", "step": step, "epoch": step / steps_per_epoch,
           "loss": window.loss / window.tokens, "lr": lr, "grad_norm": grad_norm,
           "tokens": window.tokens, "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
           "steps_in_window": window.steps}
    if method in KD_METHODS:
        stats = window.stats
        row["beta"] = beta
        row["hard_fraction"] = float(stats[:, 1].sum() / stats[:, 0].sum())
        if method in TARGET_MIX_METHODS:
            row["mean_difficulty"] = float(stats[:, 2].sum() / stats[:, 3].sum())
            if method in HARD_TOKEN_METHODS:  # where the skewed loss acts (None: no hard token in the window)
                hard_tokens = float(stats[:, 1].sum())
                row["mean_difficulty_hard"] = float(stats[:, 4].sum()) / hard_tokens if hard_tokens else None
        for i, direction in enumerate(directions):
            if stats[i, 0] > 0:
                row[f"hard_fraction/{direction}"] = float(stats[i, 1] / stats[i, 0])
                if method in TARGET_MIX_METHODS:
                    row[f"mean_difficulty/{direction}"] = float(stats[i, 2] / stats[i, 3])
    return row


def write_metrics(run, row):
    """One metrics.jsonl row (non-finite numbers as null), and to the tracker."""
    row = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()}
    if run.accelerator.is_main_process:
        try:
            with open(run.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(jsonl_text([row]))
        except OSError as error:
            stop_after_write_error(error, run.output_dir / "metrics.jsonl", run.output_dir)
    run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


def record_step(run, state, step):
    """Add the step to the logging window (good steps only), write its row at the window's end, and
    stop after --max-bad-steps non-finite steps in a row."""
    args, window = run.args, state.window
    if step.good:
        state.bad_steps = []
    else:
        state.bad_steps.append(state.global_step)
        if len(state.bad_steps) >= args.max_bad_steps:
            good = list_checkpoints(run.output_dir)
            raise RuntimeError(
                f"{len(state.bad_steps)} non-finite steps in a row (steps {state.bad_steps[0]}-{state.bad_steps[-1]}, "
                f"--max-bad-steps {args.max_bad_steps}); stopping. Last good checkpoint: "
                f"{good[-1][1] if good else 'none'}. Lower --lr or check the data and the models.")
    state.train_seconds += step.seconds
    if not state.bad_steps:
        state.train_tokens += step.tokens
        window.loss += step.loss * step.tokens
        window.tokens += step.tokens
        window.steps += 1
        window.stats += run.accelerator.reduce(step.stat_sums, "sum").cpu()
        window.on_policy += sum(step.on_policy)
        window.micro_batches += len(step.on_policy)
    window.seconds += step.seconds
    if window.steps and (state.global_step % args.logging_steps == 0 or state.global_step == run.total_steps):
        row = train_row(window, state.global_step, run.steps_per_epoch, step.lr, step.grad_norm, step.beta,
                        args.method, run.directions)
        if args.on_policy_ratio:
            row["on_policy_fraction"] = window.on_policy / window.micro_batches
        if state.auto_gamma:
            row["gamma"] = step.gamma  # the Γ this step used (+inf at step 1: written as null)
        if state.taid:
            row["taid_t"] = step.taid_t  # the t the window's last step used
        write_metrics(run, row)
        state.window = LogWindow(len(run.directions))
        watch_for_collapse(run, state, row)
        return row
    return None


def collapse_signature(windows, method="selfevo", beta=0.5):
    """The warning of a collapsing skewed loss, in words, or None. `windows`: the logged windows, oldest
    first, as (step, loss, mean d, mean d of the hard tokens); the last COLLAPSE_WINDOWS are read."""
    recent = [w for w in windows[-COLLAPSE_WINDOWS:] if None not in w]
    if len(recent) < COLLAPSE_WINDOWS:
        return None
    steps, losses, difficulty, hard = zip(*recent)
    rises = sum(b > a for a, b in zip(hard, hard[1:]))
    if not (hard[-1] >= hard[0] * (1 + COLLAPSE_RISE) and rises >= COLLAPSE_WINDOWS - 2
            and losses[-1] < losses[0] and difficulty[-1] >= difficulty[0] * (1 + COLLAPSE_RISE)):
        return None
    bound = -math.log(1 - beta) if beta < 1 else math.inf
    return (f"{method}: the mean difficulty d = KL(ỹ‖q) of the hard tokens rose {hard[0]:.2f} -> {hard[-1]:.2f} "
            f"over the last {COLLAPSE_WINDOWS} logging windows (steps {steps[0]}-{steps[-1]}) while the training loss "
            f"fell {losses[0]:.3f} -> {losses[-1]:.3f} and the mean d of all tokens rose too ({difficulty[0]:.2f} -> "
            f"{difficulty[-1]:.2f}): the signature of the collapse of the skewed loss. Its per-token loss is bounded by "
            f"-log(1-β) = {bound:.2f} and a hard token the student gets badly wrong sits near that bound with almost "
            f"no pull on its reference (about βq/(1-β) of noevo's), so the hard tokens stop learning while the easy "
            f"ones improve (study/README.md, R5). Watch the validation BLEU (--best-metric bleu); a larger --beta and "
            f"selfevo_token are the variants the study measured.")


def watch_for_collapse(run, state, row):
    """After each logged window of a method with hard tokens: warn once when the collapse's signature shows."""
    if run.args.method not in HARD_TOKEN_METHODS:
        return
    state.windows = (state.windows + [(row["step"], row["loss"], row.get("mean_difficulty"),
                                       row.get("mean_difficulty_hard"))])[-COLLAPSE_WINDOWS:]
    if state.collapse_warning is None:
        message = collapse_signature(state.windows, run.args.method, row.get("beta", run.args.beta))
        if message:
            state.collapse_warning = message
            warnings.warn(message)


def validation_loss(accelerator, model, weight, valid_set, micro_batch_size, pad_token_id, vocab_size):
    """Mean token cross-entropy of the student on the references, overall and per direction."""
    import torch.nn.functional as F

    model.eval()
    num_processes = accelerator.num_processes
    sums = torch.zeros(len(valid_set.directions), 2, device=accelerator.device, dtype=torch.float64)
    examples = [valid_set[i] for i in range(accelerator.process_index, len(valid_set), num_processes)]
    # Every process runs the same number of forward passes (ZeRO-3 gathers weights collectively).
    n_batches = math.ceil(math.ceil(len(valid_set) / num_processes) / micro_batch_size)
    collate = TrainCollator(pad_token_id)
    with torch.no_grad():
        for index in range(n_batches):
            chunk = examples[index * micro_batch_size:(index + 1) * micro_batch_size]
            batch = collate(chunk or [valid_set[0]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if not chunk:  # a padding batch: runs the forward pass, counts nothing
                batch["labels"].fill_(IGNORE_INDEX)
            targets = shifted_targets(batch["labels"])
            counted = targets != IGNORE_INDEX
            keep = counted.any(0).nonzero().squeeze(1) if counted.any() else torch.tensor([0], device=counted.device)
            with accelerator.autocast():
                rows, weight = student_rows(model, batch, counted, keep, weight)
            token_directions = batch["direction"][:, None].expand_as(targets)[counted]
            for start in range(0, rows.shape[0], 1024):
                part = rows[start:start + 1024]
                logits = (part @ weight[:vocab_size].T) if weight is not None else part[:, :vocab_size]
                ce = F.cross_entropy(logits.float(), targets[counted][start:start + 1024], reduction="none")
                d = token_directions[start:start + 1024]
                sums[:, 0].index_add_(0, d, ce.double())
                sums[:, 1].index_add_(0, d, torch.ones_like(ce, dtype=torch.float64))
    model.train()
    sums = accelerator.reduce(sums, reduction="sum")
    result = {"valid_loss": float(sums[:, 0].sum() / sums[:, 1].sum())}
    for i, direction in enumerate(valid_set.directions):
        if sums[i, 1] > 0:
            result[f"valid_loss/{direction}"] = float(sums[i, 0] / sums[i, 1])
    return result


def validation_translation(run):
    """BLEU and chrF of the student's greedy translations of the validation rows (--valid-decode-rows),
    per direction and averaged over the directions; each process translates its share (kd/decoding.py).
    Greedy decoding draws no random numbers, so the run's RNG stream (and a resume) is unchanged."""
    from accelerate.utils import gather_object

    args, accelerator, tokenizer = run.args, run.accelerator, run.tokenizer
    start = time.perf_counter()
    synced_gpus = run.zero_stage == 3
    generator = HFGenerator(run.student, tokenizer, args.valid_max_new_tokens, synced_gpus=synced_gpus)
    id_lists = [encode_prompt(tokenizer, row["prompt"]) for row in run.decode_rows]
    run.model.eval()
    mine = []
    with accelerator.autocast():
        for part in decode_rounds(generator, id_lists, args.valid_decode_batch_size, accelerator.process_index,
                                  accelerator.num_processes, synced_gpus):
            mine += [(index, tokenizer.decode(tokens, skip_special_tokens=True)) for index, tokens in part]
    run.model.train()
    hypotheses = dict(gather_object(mine) if accelerator.num_processes > 1 else mine)
    by_direction = {}
    for index, row in enumerate(run.decode_rows):
        by_direction.setdefault(row["direction"], []).append((first_line(hypotheses[index]), row))
    result = {}
    for direction, pairs in by_direction.items():
        hyps, refs = [h for h, _ in pairs], [r["reference"] for _, r in pairs]
        result[f"valid_bleu/{direction}"] = corpus_bleu(hyps, refs, pairs[0][1].get("tgt_lang")
                                                        or direction.split("-")[-1])[0]
        result[f"valid_chrf/{direction}"] = corpus_chrf(hyps, refs)[0]
    for metric in ("bleu", "chrf"):
        result[f"valid_{metric}"] = sum(result[f"valid_{metric}/{d}"] for d in by_direction) / len(by_direction)
    return {**result, "decoded_rows": len(run.decode_rows), "decode_seconds": time.perf_counter() - start}


def validate(run, state):
    """Validation loss on --valid-file, and the translations' BLEU and chrF where asked (a metrics row);
    a new best by --best-metric saves best/."""
    args = run.args
    state.last_valid_step = state.global_step
    if run.valid_set is None:
        return
    result = validation_loss(run.accelerator, run.model, run.student_weight, run.valid_set, args.micro_batch_size,
                             run.tokenizer.pad_token_id, run.vocab_size)
    if run.decode_rows:
        result.update(validation_translation(run))
    state.last_valid = result["valid_loss"]
    state.last_score = result[f"valid_{args.best_metric}"]
    write_metrics(run, {"type": "valid", "step": state.global_step, "epoch": state.global_step / run.steps_per_epoch,
                        **result})
    run.accelerator.print(f"step {state.global_step}: valid_loss {state.last_valid:.4f}" + "".join(
        f", valid_{m} {result[f'valid_{m}']:.2f}" for m in ("bleu", "chrf") if f"valid_{m}" in result))
    if state.best_valid_loss is None or state.last_valid < state.best_valid_loss:
        state.best_valid_loss = state.last_valid
    better = (state.best_score is None or (state.last_score < state.best_score if args.best_metric == "loss"
                                           else state.last_score > state.best_score))
    if better:
        state.best_score, state.best_step = state.last_score, state.global_step
        state.validations_without_improvement = 0
        save_model(run, run.output_dir / "best")
    else:
        state.validations_without_improvement += 1


def should_stop_early(run, state):
    """--early-stopping-patience validations without a better loss, and at least --early-stopping-min-epochs."""
    args = run.args
    return (0 < args.early_stopping_patience <= state.validations_without_improvement
            and state.global_step >= args.early_stopping_min_epochs * run.steps_per_epoch)


def save_model(run, folder):
    """save_pretrained of the student + tokenizer into folder (16-bit gathered under ZeRO-3), all or nothing."""
    args, accelerator = run.args, run.accelerator
    state_dict = accelerator.get_state_dict(run.model)
    if accelerator.is_main_process:
        try:
            with replacing_folder(folder) as tmp:
                if args.lora_r:  # the merged model (a plain checkpoint) and the adapter (kd/lora.py)
                    merged = merged_state_dict(state_dict, args.lora_alpha / args.lora_r)
                    run.student.get_base_model().save_pretrained(tmp, state_dict=merged, safe_serialization=True)
                    run.student.save_pretrained(Path(tmp) / "adapter", state_dict=state_dict, safe_serialization=True)
                else:
                    run.student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                run.tokenizer.save_pretrained(tmp)
        except (OSError, RuntimeError, WriteError) as error:
            stop_after_write_error(getattr(error, "error", error), f"{folder}/ (the model)", run.output_dir)
    accelerator.wait_for_everyone()


def save_checkpoint(run, state, name):
    """accelerator.save_state into output_dir/name (the teacher is never in it), then trainer_state.json,
    written last: a folder without it is incomplete. Keeps the newest --save-total-limit checkpoints."""
    accelerator, folder = run.accelerator, run.output_dir / name
    if accelerator.is_main_process:  # an older folder of this name is incomplete from here on
        (folder / TRAINER_STATE).unlink(missing_ok=True)
    try:
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            write_json(folder / TRAINER_STATE, state.state_dict(run))
    except (OSError, RuntimeError, WriteError) as error:
        stop_after_write_error(getattr(error, "error", error), f"checkpoint {folder}/", run.output_dir, incomplete=folder)
    if accelerator.is_main_process and run.args.save_total_limit > 0:
        for _, old in list_checkpoints(run.output_dir)[:-run.args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def finish(run, state):
    """The last validation, final/, all_results.json and COMPLETED (written last)."""
    args, accelerator, config = run.args, run.accelerator, run.config
    if state.last_valid_step != state.global_step:
        validate(run, state)
    save_model(run, run.output_dir / "final")
    reported = dict.fromkeys(REPORTED_ARGS)
    reported.update(gradient_accumulation_steps=None, num_processes=None)
    results = {
        "method": args.method,
        "hyperparameters": {k: config[k] for k in reported},
        "trainable_parameters": run.trainable,
        "total_parameters": run.total_parameters,
        "changed_args": run.changed_history,
        "final_valid_loss": state.last_valid,
        "best_valid_loss": state.best_valid_loss,
        "best_metric": args.best_metric,     # best/ is the checkpoint of the best validation score by it
        "final_score": state.last_score,
        "best_score": state.best_score,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "collapse_warning": state.collapse_warning,
        "steps": state.global_step,
        "epochs": state.global_step / run.steps_per_epoch,
        "train_tokens": state.train_tokens,
        "train_seconds": state.train_seconds,
        "tokens_per_s": state.train_tokens / state.train_seconds if state.train_seconds else None,
        "dropped_too_long": run.train_set.dropped_too_long,
        "final_dir": str(run.output_dir / "final"),
        "best_dir": str(run.output_dir / "best") if state.best_step is not None else None,
    }
    if accelerator.is_main_process:
        write_json(run.output_dir / "all_results.json", results)
        write_text(run.output_dir / "COMPLETED", f"{state.global_step} steps\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(json.dumps(results, indent=2))
    return results


# =============================================================================================
# The training loop
# =============================================================================================

def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_runs()  # before accelerate imports DeepSpeed
    from tqdm.auto import tqdm

    run = setup(args)  # every check of the input first, then the accelerator, data, models and optimizer
    if run is None:  # --resume-from-checkpoint latest of a completed run
        return read_json(Path(args.output_dir) / "all_results.json")
    state = start_or_resume(run)
    run.model.train()
    progress = tqdm(total=run.total_steps, initial=state.global_step, desc="train",
                    disable=not run.accelerator.is_local_main_process)
    for epoch in range(state.global_step // run.steps_per_epoch, run.epochs):
        if state.global_step >= run.total_steps or state.stopped_early:
            break
        # the same seeded order on every process; a resumed epoch skips the batches it had done
        run.train_dataloader.set_epoch(epoch)
        run.sampler.set_epoch(epoch)
        skip = state.global_step - epoch * run.steps_per_epoch
        batches = run.accelerator.skip_first_batches(run.train_dataloader, skip) if skip > 0 else run.train_dataloader
        for group in batches:
            step = optimizer_step(run, state, group)
            progress.update(1)
            row = record_step(run, state, step)
            if row:
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{step.lr:.2e}")

            end_of_epoch = state.global_step % run.steps_per_epoch == 0
            if (args.eval_steps and state.global_step % args.eval_steps == 0) or end_of_epoch:
                validate(run, state)
            if not state.bad_steps:  # never checkpoint after a bad step: the last good checkpoint stays the newest
                if end_of_epoch:
                    save_checkpoint(run, state, f"epoch_{state.global_step // run.steps_per_epoch}")
                elif args.save_steps and state.global_step % args.save_steps == 0:
                    save_checkpoint(run, state, f"step_{state.global_step}")
            if args.early_stopping_patience and should_stop_early(run, state):
                state.stopped_early = True
                run.accelerator.print(f"step {state.global_step}: no improvement of the validation {args.best_metric} in "
                                      f"{state.validations_without_improvement} validations; stopping "
                                      f"(best: step {state.best_step})")
            if state.global_step >= run.total_steps or state.stopped_early:
                break
    progress.close()
    return finish(run, state)


if __name__ == "__main__":
    main(sys.argv[1:])
