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
                     {"type": "valid", step, epoch, valid_loss, valid_loss/<dir>}
  step_{n}/ epoch_{n}/  accelerator.save_state (student, optimizer, scheduler, RNG; the teacher is never
                     saved) and trainer_state.json (with the running Γ of --gamma auto), written last: only the newest --save-total-limit
                     complete ones are kept (default 1, all a resume needs; 0 keeps all). At the paper's
                     scale one checkpoint of a 7B student (weights + AdamW state) is about 100 GB.
  best/  final/      save_pretrained model + tokenizer (best validation loss / end of training)
  all_results.json   method, hyperparameters, final/best valid loss, steps, tokens, train_seconds (time
                     in optimizer steps, without validation and saving), tokens/s
  COMPLETED          written last

Resuming (--resume-from-checkpoint latest) continues the run the checkpoint belongs to: an argument
that changes the training (the method and its hyperparameters, lr and schedule, epochs/max steps,
seed, data files, models; every argument but those in NOT_TRAINING_ARGS) that differs from the
checkpoint's is an error naming it (old -> new), unless --allow-changed-args is given: then the new
values apply from the checkpoint's step on, and config.json records them. metrics.jsonl after a
kill and a resume holds the rows of the uninterrupted run (timing fields aside).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

import torch
import torch.nn.functional as F

from kd.compat import attention_mask_for, quiet_cpu_runs
from kd.data import IGNORE_INDEX, REQUIRED_FIELDS, TrainCollator, TranslationDataset, length_grouped_order
from kd.gamma import DEFAULT_MOMENTUM, DEFAULT_QUANTILE, AutoGamma
from kd.io import (WriteError, describe_os_error, fail, fail_with, jsonl_text, read_appended_jsonl, read_json,
                   read_jsonl, replacing_folder, write_json, write_jsonl, write_text)
from kd.lora import ALPHA_PER_RANK, add_adapters, merged_state_dict, trainable_parameters
from kd.losses import (KD_METHODS, METHODS, ON_POLICY_METHODS, SELECTING_METHODS, TARGET_MIX_METHODS, LossConfig,
                       compute_loss, compute_loss_from_hidden, shared_vocab_size)
from kd.methods import HYPERPARAMETERS, methods_reading, range_problem
from kd.models import DTYPES, check_model_path, load_model, load_tokenizer, tokenizer_mismatch
from kd.onpolicy import is_on_policy, sample_micro_batch, sampling_seed
from kd.teacher_cache import TeacherCache, run_fingerprint

CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_ERROR = 2  # exit status of a wrong command line, as argparse's
# Arguments that do not change what is trained (where it is written, how often it is logged, how the
# effective batch is split: the gradient is the same, see "Exact token weighting"). Every other
# argument is compared with the checkpoint's on resume.
NOT_TRAINING_ARGS = ("output_dir", "resume_from_checkpoint", "allow_changed_args", "micro_batch_size",
                     "gradient_checkpointing", "num_workers", "eval_steps", "save_steps", "save_total_limit",
                     "logging_steps", "max_bad_steps", "report_to")
# The checkpoint's position in its epoch is counted in batches of this many examples: these cannot change.
FIXED_ON_RESUME = ("batch_size", "train_examples")


# =============================================================================================
# Arguments
# =============================================================================================

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("models and data")
    group.add_argument("--method", required=True, choices=METHODS,
                       help="training objective: sft (Eq. 2) or a distillation method of kd/methods.py")
    group.add_argument("--student", required=True, help="student model: save_pretrained folder or hub name")
    group.add_argument("--teacher", help="teacher model (required for every method but sft); never trained or saved")
    group.add_argument("--teacher-cache",
                       help="in place of --teacher: a stored teacher made by cache_teacher.py for this --train-file "
                            "(no teacher is loaded; kd/teacher_cache.py says how the stored top-K enter the losses)")
    group.add_argument("--teacher-dtype", choices=sorted(DTYPES),
                       help="precision of the frozen teacher (default bf16 with --bf16, else fp32); "
                            "under DeepSpeed the teacher follows the mixed precision of the run")
    group.add_argument("--train-file", required=True, help="train.jsonl made by prepare_data.py")
    group.add_argument("--valid-file", help="valid.jsonl (may hold several directions); validation loss = student CE")
    group.add_argument("--output-dir", required=True, help="run folder (checkpoints, best/, final/, metrics)")
    group.add_argument("--max-length", type=int, default=512,
                       help="longest prompt+response in tokens; longer examples are dropped and counted (paper: 512)")

    group = parser.add_argument_group("optimisation (paper's defaults)")
    group.add_argument("--epochs", type=int, default=3, help="training epochs (paper: 3)")
    group.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    group.add_argument("--batch-size", type=int, default=128, help="effective batch in examples, all processes (paper: 128)")
    group.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward pass per process")
    group.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (paper: 2e-5)")
    group.add_argument("--warmup-ratio", type=float, default=0.03, help="share of steps for linear warmup (paper: 0.03)")
    group.add_argument("--lr-scheduler", default="linear", choices=("linear", "cosine", "constant_with_warmup"),
                       help="transformers.get_scheduler name")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms and biases)")
    group.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    group.add_argument("--bf16", action="store_true", help="bf16 mixed precision (accelerate / DeepSpeed)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--seed", type=int, default=42, help="seed of the data order and of everything random")
    group.add_argument("--group-by-length", action="store_true",
                       help="micro-batches of similar length (less padding); the order stays random")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    group = parser.add_argument_group("distillation (symbols of the paper; the methods that read each in brackets)")
    for name, field in HYPERPARAMETERS.items():  # one flag per hyperparameter of kd/methods.py's LossConfig
        text = f"{field.metadata['help']} [{', '.join(methods_reading(name))}]"
        if name == "gamma":
            group.add_argument("--gamma", type=gamma_arg, default=field.default,
                               help=text + "; 'auto': set from the student's own learning state every step (kd/gamma.py)")
        else:
            group.add_argument(f"--{name.replace('_', '-')}", type=float, default=field.default, help=text)
    group.add_argument("--beta-end", type=float,
                       help="progressive β (Fig. 3): β moves linearly from --beta to --beta-end over the optimizer steps")
    group.add_argument("--gamma-quantile", type=float,
                       help=f"--gamma auto: Γ follows the Q-quantile of d over each step's tokens (default "
                            f"{DEFAULT_QUANTILE}: about half of the recent tokens are hard)")
    group.add_argument("--gamma-momentum", type=float,
                       help=f"--gamma auto: momentum M of Γ's moving average over steps (default {DEFAULT_MOMENTUM})")

    group = parser.add_argument_group("on-policy distillation (GKD; kd/onpolicy.py)")
    group.add_argument("--on-policy-ratio", type=float, default=0.0,
                       help="share of the micro-batches whose responses the student samples itself; the loss is "
                            "then the divergence alone on those tokens (forward, reverse, skew_teacher, jsd)")
    group.add_argument("--on-policy-temperature", type=float, default=1.0, help="sampling temperature T")
    group.add_argument("--on-policy-max-new-tokens", type=int, default=256,
                       help="longest sampled response (prompt + response stay within --max-length)")

    group = parser.add_argument_group("LoRA students (peft; kd/lora.py)")
    group.add_argument("--lora-r", type=int, default=0,
                       help="train rank-R LoRA adapters instead of every student weight (0: full fine-tuning)")
    group.add_argument("--lora-alpha", type=float,
                       help=f"LoRA scaling α (the update is (α/r)·B·A; default {ALPHA_PER_RANK:g}·r)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    group.add_argument("--lora-target-modules", nargs="+", default=["all-linear"],
                       help="module names that get adapters (default all-linear: every linear layer but the lm_head)")

    group = parser.add_argument_group("evaluation, checkpoints, logging")
    group.add_argument("--eval-steps", type=int, default=0, help="validate every N optimizer steps (and at each epoch end)")
    group.add_argument("--early-stopping-patience", type=int, default=0,
                       help="stop when N validations in a row have not improved the best validation loss (0: off; "
                            "needs --valid-file). The learning-rate schedule stays that of the full run; best/ is "
                            "the result. Lets a study train every system to convergence with a generous --epochs")
    group.add_argument("--early-stopping-min-epochs", type=float, default=0.0,
                       help="never stop early before this many epochs (a loss whose validation loss first rises, "
                            "as selfevo's does from a base model, is not cut before it can fall)")
    group.add_argument("--save-steps", type=int, default=0, help="save_state into step_N every N optimizer steps")
    group.add_argument("--save-total-limit", type=int, default=1,
                       help="keep the newest N complete step_/epoch_ checkpoints (default 1: all a resume needs; "
                            "0: keep all). One checkpoint of a 7B student is about 100 GB")
    group.add_argument("--resume-from-checkpoint", help="'latest' (the newest step_N/epoch_N of --output-dir) or a folder")
    group.add_argument("--allow-changed-args", action="store_true",
                       help="resume even though training arguments differ from the checkpoint's: the new values "
                            "apply from its step on and config.json records them (default: an error)")
    group.add_argument("--logging-steps", type=int, default=10, help="one metrics.jsonl row per N optimizer steps")
    group.add_argument("--max-bad-steps", type=int, default=10, help="stop after N non-finite steps in a row")
    group.add_argument("--report-to", default="none", choices=("none", "tensorboard", "wandb"),
                       help="also log to this accelerate tracker")
    return parser.parse_args(argv)


# =============================================================================================
# Helpers (small, pure where possible; the tests call some of them directly)
# =============================================================================================

def gamma_arg(text):
    """--gamma: a number, or 'auto' (kd/gamma.py)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


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


def build_loss_config(args):
    """kd.losses.LossConfig of the arguments; each hyperparameter is checked against its range in
    kd/methods.py, the message naming the flag."""
    values = {name: getattr(args, name) for name in HYPERPARAMETERS}
    if values["gamma"] == "auto":  # the per-step Γ replaces this (kd/gamma.py); step 1 has none: +inf
        values["gamma"] = math.inf
    for name, value in values.items():
        problem = range_problem(name, value)
        if problem:
            fail("arguments", problem.replace(name, "--" + name.replace("_", "-"), 1), "see train_kd.py --help",
                 code=CONFIG_ERROR)
    try:
        return LossConfig(args.method, **values, reduction="sum")
    except ValueError as error:
        fail("arguments", re.sub(r"\b(" + "|".join(HYPERPARAMETERS) + r")\b",
                                 lambda match: "--" + match.group(1).replace("_", "-"), str(error)),
             "see train_kd.py --help", code=CONFIG_ERROR)


def check_args(args):
    """Every check of the command line that needs no model and no data: one message, exit status 2.
    Returns the LossConfig."""
    if args.teacher and args.teacher_cache:
        fail("--teacher-cache", "replaces --teacher", "pass one of the two", code=CONFIG_ERROR)
    if args.method in KD_METHODS and not (args.teacher or args.teacher_cache):
        fail(f"--method {args.method}", "distils from a teacher", "pass --teacher PATH or --teacher-cache DIR "
             "(only sft runs without one)", code=CONFIG_ERROR)
    if args.method not in KD_METHODS and (args.teacher or args.teacher_cache):
        warnings.warn("--teacher / --teacher-cache is ignored by --method sft")
        args.teacher = args.teacher_cache = None
    loss_config = build_loss_config(args)
    if args.gamma == "auto":
        if args.method not in SELECTING_METHODS or args.top_k is not None:
            fail(f"--gamma auto with --method {args.method}" + (" and --top-k" if args.top_k is not None else ""),
                 f"sets the threshold of {' and '.join(SELECTING_METHODS)} (without --top-k)",
                 "pass --method selfevo or selfevo_token and no --top-k", code=CONFIG_ERROR)
        args.gamma_quantile = DEFAULT_QUANTILE if args.gamma_quantile is None else args.gamma_quantile
        args.gamma_momentum = DEFAULT_MOMENTUM if args.gamma_momentum is None else args.gamma_momentum
        try:
            AutoGamma(args.gamma_quantile, args.gamma_momentum)
        except ValueError as error:
            fail("arguments", str(error).replace("gamma_", "--gamma-"), "see train_kd.py --help", code=CONFIG_ERROR)
    elif args.gamma_quantile is not None or args.gamma_momentum is not None:
        fail("--gamma-quantile/--gamma-momentum", "only apply to --gamma auto", "pass --gamma auto or leave them out",
             code=CONFIG_ERROR)
    if args.on_policy_ratio and args.method not in ON_POLICY_METHODS:
        fail(f"--on-policy-ratio {args.on_policy_ratio} with --method {args.method}",
             "needs a loss that is defined on sampled tokens: " + ", ".join(ON_POLICY_METHODS) +
             " (the methods built on the reference token mix it into their target, and a sampled response has none)",
             "pass one of those methods, or --on-policy-ratio 0", code=CONFIG_ERROR)
    if args.on_policy_ratio and args.teacher_cache:
        fail(f"--on-policy-ratio {args.on_policy_ratio} with --teacher-cache", "the student's own samples are not in "
             "the cache (it holds the teacher on the training data only)", "pass --teacher for on-policy distillation",
             code=CONFIG_ERROR)
    if not 0.0 <= args.on_policy_ratio <= 1.0:
        fail(f"--on-policy-ratio {args.on_policy_ratio}", "is a share of the micro-batches", "pass a value in [0, 1]",
             code=CONFIG_ERROR)
    if not args.on_policy_temperature > 0.0 or args.on_policy_max_new_tokens < 1:
        fail(f"--on-policy-temperature {args.on_policy_temperature} / --on-policy-max-new-tokens "
             f"{args.on_policy_max_new_tokens}", "the temperature must be > 0 and the length at least 1",
             "pass positive values", code=CONFIG_ERROR)
    if args.early_stopping_min_epochs < 0:
        fail(f"--early-stopping-min-epochs {args.early_stopping_min_epochs}", "must not be negative", "pass 0 or more",
             code=CONFIG_ERROR)
    if args.lora_r < 0:
        fail(f"--lora-r {args.lora_r}", "is a rank", "pass 0 (full fine-tuning) or a rank >= 1", code=CONFIG_ERROR)
    if args.lora_r:
        if (args.lora_alpha is not None and not args.lora_alpha > 0) or not 0.0 <= args.lora_dropout < 1.0:
            fail(f"--lora-r {args.lora_r} / --lora-alpha {args.lora_alpha} / --lora-dropout {args.lora_dropout}",
                 "need a rank >= 1, α > 0 and a dropout in [0, 1)", "pass valid values", code=CONFIG_ERROR)
        try:
            import peft  # noqa: F401
        except ImportError:
            fail(f"--lora-r {args.lora_r}", "needs peft, which is not installed", "pip install -r requirements.txt",
                 code=CONFIG_ERROR)
        args.lora_alpha = ALPHA_PER_RANK * args.lora_r if args.lora_alpha is None else args.lora_alpha
    if args.early_stopping_patience < 0 or (args.early_stopping_patience and not args.valid_file):
        fail(f"--early-stopping-patience {args.early_stopping_patience}", "needs a number >= 0 and, when > 0, "
             "a --valid-file to watch", "pass --valid-file, or 0 to train every epoch", code=CONFIG_ERROR)
    if args.beta_end is not None and not 0.0 <= args.beta_end <= 1.0:
        fail(f"--beta-end {args.beta_end}", "must lie in [0, 1]", "pass a value in [0, 1]", code=CONFIG_ERROR)
    for name in ("batch_size", "micro_batch_size", "max_length", "epochs", "logging_steps", "max_bad_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}", "must be at least 1", "pass a positive number",
                 code=CONFIG_ERROR)
    for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}", "must not be negative", "pass 0 or more",
                 code=CONFIG_ERROR)
    for argument, path in (("--student", args.student), ("--teacher", args.teacher)):
        if path:
            try:
                check_model_path(path, argument)
            except FileNotFoundError as error:
                fail_with(error, code=CONFIG_ERROR)
    return loss_config


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
             f"{', '.join(fixed)} cannot change within a run (the checkpoint's place in its epoch depends on them); "
             "resume with the original --batch-size and training data", code=CONFIG_ERROR)
    if changes and not allow_changed:
        fail(f"--resume-from-checkpoint {resume_path}", f"saved with other arguments: {listed}",
             "resume with the checkpoint's values, or pass --allow-changed-args to apply the new ones from its "
             f"step {state['global_step']} on (config.json records them)", code=CONFIG_ERROR)
    return changes


def reapply_optimizer_args(optimizer, lr_scheduler, args):
    """After loading a checkpoint saved with another --lr, --weight-decay or --adam-epsilon
    (--allow-changed-args): the new values from this step on. The schedule's shape (--lr-scheduler,
    --warmup-ratio, total steps) is already the new one: the checkpoint restores only its base rates."""
    decays = (args.weight_decay, 0.0)  # the parameter groups of main(): with and without weight decay
    lr_scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for group, decay, factor in zip(optimizer.param_groups, decays, lr_scheduler.lr_lambdas):
        group.update(initial_lr=args.lr, weight_decay=decay, eps=args.adam_epsilon,
                     lr=args.lr * factor(lr_scheduler.last_epoch))
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def read_rows(path, argument):
    """Rows of a prepared JSONL file; any problem stops the run naming the argument (and file:line)."""
    return read_jsonl(path, required=REQUIRED_FIELDS, text_fields=("prompt", "reference"), allow_empty=False,
                      argument=argument)


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


def shifted_targets(labels):
    """targets[b, i] = labels[b, i + 1]: the token that position i predicts (IGNORE_INDEX where nothing counts)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# =============================================================================================
# Forward passes, validation, log rows (called by main's loop; module level so tests can call them)
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


def validation_loss(accelerator, model, weight, valid_set, micro_batch_size, pad_token_id, vocab_size):
    """Mean token cross-entropy of the student on the references, overall and per direction."""
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


def new_window(n_directions):
    """The sums of one logging window: loss x tokens, tokens, good steps, seconds, stats per direction [D, 4]."""
    return {"loss": 0.0, "tokens": 0, "steps": 0, "seconds": 0.0, "stats": torch.zeros(n_directions, 4)}


def window_state(window):
    """The window as JSON (saved with each checkpoint, so that a resumed run logs the same rows)."""
    return {**window, "stats": window["stats"].tolist()}


def window_from_state(state, n_directions):
    if state is None:  # a checkpoint of an older train_kd.py: the first window after it is short
        return new_window(n_directions)
    return {**state, "stats": torch.tensor(state["stats"], dtype=torch.float32)}


def train_row(window, step, steps_per_epoch, lr, grad_norm, beta, method, directions):
    """The metrics.jsonl row of a logging window (see the module docstring for the fields)."""
    row = {"type": "train", "step": step, "epoch": step / steps_per_epoch,
           "loss": window["loss"] / window["tokens"], "lr": lr, "grad_norm": grad_norm,
           "tokens": window["tokens"], "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
           "steps_in_window": window["steps"]}
    if method in KD_METHODS:
        stats = window["stats"]
        row["beta"] = beta
        row["hard_fraction"] = float(stats[:, 1].sum() / stats[:, 0].sum())
        if method in TARGET_MIX_METHODS:
            row["mean_difficulty"] = float(stats[:, 2].sum() / stats[:, 3].sum())
        for i, direction in enumerate(directions):
            if stats[i, 0] > 0:
                row[f"hard_fraction/{direction}"] = float(stats[i, 1] / stats[i, 0])
                if method in TARGET_MIX_METHODS:
                    row[f"mean_difficulty/{direction}"] = float(stats[i, 2] / stats[i, 3])
    return row


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
# Training
# =============================================================================================

def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_runs()  # before accelerate imports DeepSpeed
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # ------------------------------------------------------------------ 1. check the input (cheap, before any model)
    loss_config = check_args(args)
    train_rows = read_rows(args.train_file, "--train-file")
    valid_rows = read_rows(args.valid_file, "--valid-file") if args.valid_file else []
    output_dir = Path(args.output_dir)
    if (output_dir / "COMPLETED").is_file() and args.resume_from_checkpoint == "latest":
        print(f"{output_dir}: run already completed; nothing to do")
        return read_json(output_dir / "all_results.json")
    if args.resume_from_checkpoint is None and output_dir.is_dir() and (
            list_checkpoints(output_dir) or (output_dir / "final").exists()):
        fail(f"--output-dir {output_dir}", "already holds a run",
             "pass --resume-from-checkpoint latest to continue it, or choose another --output-dir", code=CONFIG_ERROR)
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, output_dir)

    # ------------------------------------------------------------------ 2. accelerator (student + teacher DeepSpeed plugins)
    plugins = deepspeed_plugins(args)
    accelerator = Accelerator(
        # accelerate's torchrun launcher (any --num_processes > 1) does not pass use_cpu on: on a machine
        # without GPUs ask for CPU DDP (gloo) here. DeepSpeed runs its own CPU path and must not get cpu=True.
        cpu=not torch.cuda.is_available() and plugins is None,
        mixed_precision="bf16" if args.bf16 else None,
        deepspeed_plugins=plugins,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    num_processes = accelerator.num_processes
    grad_accum = accumulation_steps(args.batch_size, args.micro_batch_size, num_processes)
    accelerator.gradient_accumulation_steps = grad_accum
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed else None
    # The lean path needs the real lm_head weight outside forward; ZeRO-3 and FSDP partition it.
    lean_student = not (zero_stage == 3 or accelerator.distributed_type == DistributedType.FSDP)
    lean_teacher = not is_deepspeed and accelerator.distributed_type != DistributedType.FSDP
    set_seed(args.seed)

    # ------------------------------------------------------------------ 3. tokenizers and data
    tokenizer = load_tokenizer(args.student)
    vocab_size = model_vocab_size(args.student)
    if args.teacher:
        teacher_tokenizer = load_tokenizer(args.teacher)
        reason = tokenizer_mismatch(tokenizer, teacher_tokenizer)
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
        train_set = TranslationDataset(train_rows, tokenizer, args.max_length, source_name=f"--train-file {args.train_file}")
        valid_set = (TranslationDataset(valid_rows, tokenizer, args.max_length, source_name=f"--valid-file {args.valid_file}")
                     if valid_rows else None)
    except ValueError as error:
        fail_with(error, code=CONFIG_ERROR)
    teacher_cache = None
    if args.teacher_cache:  # checked against this run's data, tokenizer, template and max length
        teacher_cache = TeacherCache(args.teacher_cache, run_fingerprint(args.train_file, tokenizer, args.max_length,
                                                                         len(train_set)))
        try:
            vocab_size = shared_vocab_size(vocab_size, teacher_cache.vocab)
        except ValueError as error:
            fail(f"--teacher-cache {args.teacher_cache}", str(error), "pass a cache of a teacher of the student's family",
                 code=CONFIG_ERROR)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size}", f"more than the {len(train_set)} usable examples of --train-file "
             f"{args.train_file}", "pass a smaller --batch-size or more data", code=CONFIG_ERROR)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    run_args = training_args(args, len(train_set))
    resume_state, changes, changed_history = None, {}, []
    if resume_path is not None:
        resume_state = read_json(resume_path / TRAINER_STATE)
        changes = check_resume(resume_state, run_args, resume_path, args.allow_changed_args)
        changed_history = resume_state.get("changed_args", [])
        if changes:
            changed_history = changed_history + [{"step": resume_state["global_step"],
                                                  "changes": {k: list(v) for k, v in changes.items()}}]
            for name, (old, new) in changes.items():
                accelerator.print(f"--allow-changed-args: --{name.replace('_', '-')} {old} -> {new} "
                                  f"from step {resume_state['global_step']} on")
    directions = train_set.directions

    sampler = EpochSampler(train_set.lengths(), args.seed, args.micro_batch_size if args.group_by_length else None)
    train_dataloader = torch.utils.data.DataLoader(
        train_set, batch_size=args.micro_batch_size * grad_accum, sampler=sampler, drop_last=True,
        collate_fn=MicroBatchCollator(tokenizer.pad_token_id, args.micro_batch_size), num_workers=args.num_workers,
        # its own generator: a DataLoader without one draws its workers' base seed from the global RNG at
        # every iter(), so a resumed epoch would shift the stream that dropout and on-policy sampling use
        generator=torch.Generator().manual_seed(args.seed))

    config = {
        **vars(args),
        "teacher_dtype": args.teacher_dtype or ("bf16" if args.bf16 else "fp32"),
        "num_processes": num_processes,
        "gradient_accumulation_steps": grad_accum,
        "distributed_type": str(accelerator.distributed_type),
        "zero_stage": zero_stage,
        "mixed_precision": accelerator.mixed_precision,
        "student_loss_path": "hidden" if lean_student else "logits",
        "teacher_loss_path": ("cache" if teacher_cache else None) if not args.teacher else (
            "hidden" if lean_teacher else "logits"),
        "teacher_cache_manifest": None if teacher_cache is None else {
            k: teacher_cache.manifest[k] for k in ("teacher", "teacher_sha256", "top_k", "dtype", "vocab_size")},
        "vocab_size": vocab_size,
        "train_examples": len(train_set),
        "valid_examples": len(valid_set) if valid_set else 0,
        "dropped_too_long": train_set.dropped_too_long,
        "directions": directions,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "changed_args": changed_history,
    }
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            stop_after_write_error(error, f"--output-dir {output_dir}", output_dir.parent)
        write_json(output_dir / "config.json", config)
    accelerator.print(json.dumps(config, indent=2))
    accelerator.print(f"loss path: student {config['student_loss_path']}, teacher {config['teacher_loss_path']} "
                      f"({config['distributed_type']}, ZeRO stage {zero_stage})")
    if train_set.dropped_too_long:
        accelerator.print(f"dropped {train_set.dropped_too_long} training examples longer than --max-length {args.max_length}")

    # ------------------------------------------------------------------ 4. models
    # a LoRA student's frozen base weights need no fp32 master copy: bf16 under --bf16
    model = load_model(args.student, dtype="bf16" if args.lora_r and args.bf16 else "fp32")
    if args.lora_r:
        try:
            model = add_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        except ValueError as error:  # e.g. a target module the model does not have
            fail(f"--lora-target-modules {' '.join(args.lora_target_modules)}", str(error).splitlines()[0],
                 "name modules of the student (e.g. q_proj v_proj), or all-linear", code=CONFIG_ERROR)
    trainable, total_parameters = trainable_parameters(model)
    accelerator.print(f"student: {trainable:,} trainable parameters of {total_parameters:,}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher, dtype=config["teacher_dtype"])
        teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------ 5. optimizer, schedule, prepare
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
    # The scheduler is stepped once per optimizer step by this loop (not prepared: accelerate would
    # step it once per process) and checkpointed through register_for_checkpointing.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                                 num_training_steps=total_steps)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    accelerator.register_for_checkpointing(lr_scheduler)
    if teacher is not None:
        if is_deepspeed:
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
    student = accelerator.unwrap_model(model)
    # the lm_head weights of the lean path (None: the logits path)
    student_weight = student.get_output_embeddings().weight if lean_student else None
    teacher_weight = teacher.get_output_embeddings().weight if teacher is not None and lean_teacher else None

    # ------------------------------------------------------------------ 6. one micro-batch: forward passes and the loss
    def micro_batch_loss(batch, beta, gamma, on_policy=False):
        """Summed loss over the micro-batch's response tokens, per-direction stat sums [D, 4], and d of
        each counted token (for --gamma auto)."""
        targets = shifted_targets(batch["labels"])
        counted = targets != IGNORE_INDEX
        keep = counted.any(0).nonzero().squeeze(1)
        token_directions = batch["direction"][:, None].expand_as(targets)[counted]
        rows, weight = student_rows(model, batch, counted, keep, student_weight)
        teacher_kwargs = {}
        if teacher is not None:
            with accelerator.autocast():
                teacher_kwargs = teacher_inputs(teacher, batch, counted, keep, teacher_weight)
        elif teacher_cache is not None:  # stored log-probabilities enter the losses as the teacher's logits
            teacher_kwargs = {"teacher_logits": teacher_cache.log_probs(batch["index"], counted.sum(1), rows.device)}
        step_config = dataclasses.replace(loss_config, beta=beta, gamma=gamma)
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
        columns = torch.stack([torch.ones_like(difficulty), stats["token_hard"].float(),
                               torch.where(has_difficulty, difficulty, torch.zeros_like(difficulty)),
                               has_difficulty.float()], dim=1)
        sums = torch.zeros(len(directions), 4, device=columns.device).index_add_(0, token_directions, columns)
        return loss_sum, sums, difficulty

    # ------------------------------------------------------------------ 7. validation and saving (all writes stop in words)
    def save_model(folder):
        """save_pretrained of the student + tokenizer into folder (16-bit gathered under ZeRO-3), all or nothing."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            try:
                with replacing_folder(folder) as tmp:
                    if args.lora_r:  # the merged model (a plain checkpoint) and the adapter (kd/lora.py)
                        merged = merged_state_dict(state_dict, args.lora_alpha / args.lora_r)
                        student.get_base_model().save_pretrained(tmp, state_dict=merged, safe_serialization=True)
                        student.save_pretrained(Path(tmp) / "adapter", state_dict=state_dict, safe_serialization=True)
                    else:
                        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                    tokenizer.save_pretrained(tmp)
            except (OSError, RuntimeError, WriteError) as error:
                stop_after_write_error(getattr(error, "error", error), f"{folder}/ (the model)", output_dir)
        accelerator.wait_for_everyone()

    def save_checkpoint(name):
        folder = output_dir / name
        if accelerator.is_main_process:  # an older folder of this name is incomplete from here on
            (folder / TRAINER_STATE).unlink(missing_ok=True)
        try:
            accelerator.save_state(str(folder))
            if accelerator.is_main_process:  # written last: a folder without it is incomplete
                write_json(folder / TRAINER_STATE, {
                    "global_step": global_step, "epoch": global_step / steps_per_epoch,
                    "batch_size": args.batch_size, "seed": args.seed, "train_examples": len(train_set),
                    "args": run_args, "changed_args": changed_history,
                    "best_valid_loss": best_valid_loss, "best_step": best_step,
                    "validations_without_improvement": validations_without_improvement,
                    "train_tokens": train_tokens, "train_seconds": train_seconds, "window": window_state(window),
                    "auto_gamma": auto_gamma.state_dict() if auto_gamma else None})
        except (OSError, RuntimeError, WriteError) as error:
            stop_after_write_error(getattr(error, "error", error), f"checkpoint {folder}/", output_dir, incomplete=folder)
        if accelerator.is_main_process and args.save_total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def write_metrics(row):
        row = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()}
        if accelerator.is_main_process:
            try:
                with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(jsonl_text([row]))
            except OSError as error:
                stop_after_write_error(error, output_dir / "metrics.jsonl", output_dir)
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                        step=row["step"])

    def run_validation():
        nonlocal best_valid_loss, best_step, last_valid, last_valid_step, validations_without_improvement
        last_valid_step = global_step
        if valid_set is None:
            return
        result = validation_loss(accelerator, model, student_weight, valid_set, args.micro_batch_size,
                                 tokenizer.pad_token_id, vocab_size)
        last_valid = result["valid_loss"]
        write_metrics({"type": "valid", "step": global_step, "epoch": global_step / steps_per_epoch, **result})
        accelerator.print(f"step {global_step}: valid_loss {last_valid:.4f}")
        if best_valid_loss is None or last_valid < best_valid_loss:
            best_valid_loss, best_step = last_valid, global_step
            validations_without_improvement = 0
            save_model(output_dir / "best")
        else:
            validations_without_improvement += 1

    # ------------------------------------------------------------------ 8. resume
    global_step, train_tokens, train_seconds = 0, 0, 0.0
    best_valid_loss, best_step, last_valid, last_valid_step = None, None, None, None
    validations_without_improvement, stopped_early = 0, False
    window = new_window(len(directions))
    auto_gamma = AutoGamma(args.gamma_quantile, args.gamma_momentum) if args.gamma == "auto" else None
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        if changes:
            reapply_optimizer_args(optimizer, lr_scheduler, args)
        state = resume_state
        global_step, train_tokens, train_seconds = state["global_step"], state["train_tokens"], state["train_seconds"]
        best_valid_loss, best_step = state["best_valid_loss"], state["best_step"]
        validations_without_improvement = state.get("validations_without_improvement", 0)
        window = window_from_state(state.get("window"), len(directions))
        if auto_gamma and state.get("auto_gamma"):  # else (resumed into --gamma auto) Γ starts afresh
            auto_gamma.load_state_dict(state["auto_gamma"])
        metrics_file = output_dir / "metrics.jsonl"
        kept, _ = read_appended_jsonl(metrics_file, required=("type", "step"))
        kept = [row for row in kept if row["step"] <= global_step]  # rows written after the checkpoint go
        validated = [row for row in kept if row["type"] == "valid" and row["step"] == global_step]
        if validated:  # this step's validation ran before the checkpoint: not again at the end
            last_valid, last_valid_step = validated[-1]["valid_loss"], global_step
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and metrics_file.is_file():
            write_jsonl(metrics_file, kept)
        accelerator.wait_for_everyone()
    else:
        if args.resume_from_checkpoint == "latest":
            accelerator.print(f"--resume-from-checkpoint latest: no checkpoint in {output_dir} yet; starting from scratch")
        if accelerator.is_main_process:  # rows of an earlier attempt that never reached a checkpoint
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)

    if args.report_to != "none":
        accelerator.init_trackers("train_kd", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                      for k, v in config.items()})

    # ------------------------------------------------------------------ 9. training loop
    model.train()
    bad_steps = []
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="train")
    start_epoch = global_step // steps_per_epoch
    # a run resumed from the checkpoint written where it decided to stop early stops again at once
    stopped_early = (0 < args.early_stopping_patience <= validations_without_improvement
                     and global_step >= args.early_stopping_min_epochs * steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        if global_step >= total_steps or stopped_early:
            break
        train_dataloader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        skip = global_step - epoch * steps_per_epoch
        epoch_loader = accelerator.skip_first_batches(train_dataloader, skip) if skip > 0 else train_dataloader
        for group in epoch_loader:
            step_start = time.perf_counter()
            beta = beta_at(global_step, total_steps, args.beta, args.beta_end)
            gamma = auto_gamma.value if auto_gamma else loss_config.gamma  # one Γ for every micro-batch of the step
            # on-policy micro-batches: the student's own responses, sampled before any forward pass of the
            # step so that the token count below counts them (kd/onpolicy.py)
            on_policy = [is_on_policy(args.seed, global_step, index, args.on_policy_ratio) for index in range(len(group))]
            group = [sample_micro_batch(student, micro_batch, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id,
                                        max_new_tokens=args.on_policy_max_new_tokens, max_length=args.max_length,
                                        temperature=args.on_policy_temperature, synced_gpus=zero_stage == 3,
                                        seed=sampling_seed(args.seed, global_step, index, accelerator.process_index))
                     if sampled else micro_batch for index, (micro_batch, sampled) in enumerate(zip(group, on_policy))]
            local_tokens = sum(int((shifted_targets(mb["labels"]) != IGNORE_INDEX).sum()) for mb in group)
            step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
            # Undo accelerate's 1/accumulation and DDP's mean over processes: sum / tokens of the effective batch.
            scale = num_processes * grad_accum / step_tokens
            loss_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            stat_sums = torch.zeros(len(directions), 4, device=accelerator.device)
            step_difficulties = []
            for micro_batch, sampled in zip(group, on_policy):
                with accelerator.accumulate(model):
                    loss_sum, sums, difficulty = micro_batch_loss(micro_batch, beta, gamma, sampled)
                    accelerator.backward(loss_sum * scale)
                    loss_total += loss_sum.detach().double()
                    stat_sums += sums
                    if auto_gamma:
                        step_difficulties.append(difficulty)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
            grad_norm = float(grad_norm) if grad_norm is not None else None
            step_loss = float(accelerator.reduce(loss_total, "sum")) / step_tokens
            if is_finite(step_loss) and (grad_norm is None or is_finite(grad_norm)):
                optimizer.step()
                bad_steps = []
            else:
                bad_steps.append(global_step + 1)
                warnings.warn(f"step {global_step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; "
                              "skipping the optimizer step")
            if auto_gamma:  # Γ of the next step from d of every token of this one, all processes (kd/gamma.py)
                local = torch.cat(step_difficulties)
                gathered = accelerator.gather(accelerator.pad_across_processes(local, pad_index=math.nan))
                auto_gamma.update(gathered)
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            progress.update(1)
            if len(bad_steps) >= args.max_bad_steps:
                good = list_checkpoints(output_dir)
                raise RuntimeError(
                    f"{len(bad_steps)} non-finite steps in a row (steps {bad_steps[0]}-{bad_steps[-1]}, "
                    f"--max-bad-steps {args.max_bad_steps}); stopping. Last good checkpoint: "
                    f"{good[-1][1] if good else 'none'}. Lower --lr or check the data and the models.")

            # -------------------------------------------------------------- logging
            seconds = time.perf_counter() - step_start
            train_seconds += seconds
            if not bad_steps:
                train_tokens += step_tokens
                window["loss"] += step_loss * step_tokens
                window["tokens"] += step_tokens
                window["steps"] += 1
                window["stats"] += accelerator.reduce(stat_sums, "sum").cpu()
                window["on_policy"] = window.get("on_policy", 0) + sum(on_policy)
                window["micro_batches"] = window.get("micro_batches", 0) + len(on_policy)
            window["seconds"] += seconds
            if window["steps"] and (global_step % args.logging_steps == 0 or global_step == total_steps):
                row = train_row(window, global_step, steps_per_epoch, lr, grad_norm, beta, args.method, directions)
                if args.on_policy_ratio:
                    row["on_policy_fraction"] = window["on_policy"] / window["micro_batches"]
                if auto_gamma:
                    row["gamma"] = gamma  # the Γ this step used (+inf at step 1: written as null)
                write_metrics(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                window = new_window(len(directions))

            # -------------------------------------------------------------- validation and checkpoints
            end_of_epoch = global_step % steps_per_epoch == 0
            if (args.eval_steps and global_step % args.eval_steps == 0) or end_of_epoch:
                run_validation()
            if not bad_steps:  # never checkpoint after a bad step: the last good checkpoint stays the newest
                if end_of_epoch:
                    save_checkpoint(f"epoch_{global_step // steps_per_epoch}")
                elif args.save_steps and global_step % args.save_steps == 0:
                    save_checkpoint(f"step_{global_step}")
            if (args.early_stopping_patience and validations_without_improvement >= args.early_stopping_patience
                    and global_step >= args.early_stopping_min_epochs * steps_per_epoch):
                stopped_early = True
                accelerator.print(f"step {global_step}: no improvement of the validation loss in "
                                  f"{validations_without_improvement} validations; stopping (best: step {best_step})")
            if global_step >= total_steps or stopped_early:
                break
        if stopped_early:
            break
    progress.close()

    # ------------------------------------------------------------------ 10. final model and results
    if last_valid_step != global_step:
        run_validation()
    save_model(output_dir / "final")
    results = {
        "method": args.method,
        "hyperparameters": {k: config[k] for k in (
            "student", "teacher", "teacher_cache", "teacher_dtype", "epochs", "max_steps", "batch_size", "micro_batch_size",
            "gradient_accumulation_steps", "num_processes", "lr", "warmup_ratio", "lr_scheduler", "weight_decay",
            "max_grad_norm", "max_length", "seed", "bf16", "kd_ratio", "target_mix", "beta", "beta_end", "gamma",
            "gamma_quantile", "gamma_momentum", "top_k", "skew_beta", "jsd_beta", "on_policy_ratio",
            "on_policy_temperature", "on_policy_max_new_tokens", "lora_r", "lora_alpha", "lora_dropout",
            "lora_target_modules")},
        "trainable_parameters": trainable,
        "total_parameters": total_parameters,
        "changed_args": changed_history,
        "final_valid_loss": last_valid,
        "best_valid_loss": best_valid_loss,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "steps": global_step,
        "epochs": global_step / steps_per_epoch,
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else None,
        "dropped_too_long": train_set.dropped_too_long,
        "final_dir": str(output_dir / "final"),
        "best_dir": str(output_dir / "best") if best_step is not None else None,
    }
    if accelerator.is_main_process:
        write_json(output_dir / "all_results.json", results)
        write_text(output_dir / "COMPLETED", f"{global_step} steps\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
