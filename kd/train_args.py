"""The command line of train_kd.py, defined once: every flag with its help, default and checks.

train_kd.py, kd/estimate.py and the benchmarks read it from here (no script imports another).
Each flag is one `Arg` in SCHEMA, which also says
  training  whether the flag changes what is trained: a resume compares every training argument
            with its checkpoint's (train_kd.py, "Resuming"); where a run is written, how often it
            logs and how the batch is split into micro-batches (the gradient is the same) do not;
  reported  whether all_results.json lists it under "hyperparameters".
The distillation hyperparameters are not written here: there is one flag per field of
kd.methods.LossConfig, with its help, default and range from there.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from kd.gamma import DEFAULT_MOMENTUM, DEFAULT_QUANTILE, AutoGamma
from kd.io import fail, fail_with
from kd.lora import ALPHA_PER_RANK
from kd.methods import (HYPERPARAMETERS, KD_METHODS, METHODS, ON_POLICY_METHODS, SELECTING_METHODS, LossConfig,
                        methods_reading, range_problem)
from kd.models import DTYPES, check_model_path

CONFIG_ERROR = 2  # exit status of a wrong command line, as argparse's


def gamma_arg(text):
    """--gamma: a number, or 'auto' (kd/gamma.py)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


@dataclass(frozen=True)
class Arg:
    flag: str
    group: str
    options: dict = field(default_factory=dict)  # argparse's add_argument keywords (help, type, default, ...)
    training: bool = True                        # compared with the checkpoint's on resume
    reported: bool = False                       # in all_results.json's "hyperparameters"

    @property
    def dest(self):
        return self.flag[2:].replace("-", "_")


def _arg(flag, group, help, *, training=True, reported=False, **options):
    return Arg(flag, group, {"help": help, **options}, training, reported)


def _hyperparameter_args(group):
    """One flag per hyperparameter of kd.methods.LossConfig; the help names the methods that read it."""
    args = []
    for name, spec in HYPERPARAMETERS.items():
        text = f"{spec.metadata['help']} [{', '.join(methods_reading(name))}]"
        if name == "gamma":
            args.append(_arg("--gamma", group, text + "; 'auto': set from the student's own learning state every "
                             "step (kd/gamma.py)", type=gamma_arg, default=spec.default, reported=True))
        else:
            args.append(_arg(f"--{name.replace('_', '-')}", group, text, type=float, default=spec.default,
                             reported=True))
    return args


DATA = "models and data"
OPTIMISATION = "optimisation (paper's defaults)"
DISTILLATION = "distillation (symbols of the paper; the methods that read each in brackets)"
ON_POLICY = "on-policy distillation (GKD; kd/onpolicy.py)"
LORA = "LoRA students (peft; kd/lora.py)"
RUNNING = "evaluation, checkpoints, logging"

SCHEMA = (
    _arg("--method", DATA, "training objective: sft (Eq. 2) or a distillation method of kd/methods.py",
         required=True, choices=METHODS),
    _arg("--student", DATA, "student model: save_pretrained folder or hub name", required=True, reported=True),
    _arg("--teacher", DATA, "teacher model (required for every method but sft); never trained or saved",
         reported=True),
    _arg("--teacher-cache", DATA, "in place of --teacher: a stored teacher made by cache_teacher.py for this "
         "--train-file (no teacher is loaded; kd/teacher_cache.py says how the stored top-K enter the losses)",
         reported=True),
    _arg("--teacher-dtype", DATA, "precision of the frozen teacher (default bf16 with --bf16, else fp32); under "
         "DeepSpeed the teacher follows the mixed precision of the run", choices=sorted(DTYPES), reported=True),
    _arg("--train-file", DATA, "train.jsonl made by prepare_data.py", required=True),
    _arg("--valid-file", DATA, "valid.jsonl (may hold several directions); validation loss = student CE"),
    _arg("--output-dir", DATA, "run folder (checkpoints, best/, final/, metrics)", required=True, training=False),
    _arg("--max-length", DATA, "longest prompt+response in tokens; longer examples are dropped and counted "
         "(paper: 512)", type=int, default=512, reported=True),

    _arg("--epochs", OPTIMISATION, "training epochs (paper: 3)", type=int, default=3, reported=True),
    _arg("--max-steps", OPTIMISATION, "stop after this many optimizer steps (0: all epochs)", type=int, default=0,
         reported=True),
    _arg("--batch-size", OPTIMISATION, "effective batch in examples, all processes (paper: 128)", type=int,
         default=128, reported=True),
    _arg("--micro-batch-size", OPTIMISATION, "examples per forward pass per process", type=int, default=8,
         training=False, reported=True),
    _arg("--lr", OPTIMISATION, "peak learning rate (paper: 2e-5)", type=float, default=2e-5, reported=True),
    _arg("--warmup-ratio", OPTIMISATION, "share of steps for linear warmup (paper: 0.03)", type=float, default=0.03,
         reported=True),
    _arg("--lr-scheduler", OPTIMISATION, "transformers.get_scheduler name", default="linear",
         choices=("linear", "cosine", "constant_with_warmup"), reported=True),
    _arg("--weight-decay", OPTIMISATION, "AdamW weight decay (not on norms and biases)", type=float, default=0.0,
         reported=True),
    _arg("--adam-epsilon", OPTIMISATION, "AdamW epsilon", type=float, default=1e-8),
    _arg("--max-grad-norm", OPTIMISATION, "gradient clipping norm (0: no clipping)", type=float, default=1.0,
         reported=True),
    _arg("--bf16", OPTIMISATION, "bf16 mixed precision (accelerate / DeepSpeed)", action="store_true",
         reported=True),
    _arg("--gradient-checkpointing", OPTIMISATION, "recompute activations in backward", action="store_true",
         training=False),
    _arg("--seed", OPTIMISATION, "seed of the data order and of everything random", type=int, default=42,
         reported=True),
    _arg("--group-by-length", OPTIMISATION, "micro-batches of similar length (less padding); the order stays "
         "random", action="store_true"),
    _arg("--num-workers", OPTIMISATION, "DataLoader worker processes", type=int, default=0, training=False),

    *_hyperparameter_args(DISTILLATION),
    _arg("--beta-end", DISTILLATION, "progressive β (Fig. 3): β moves linearly from --beta to --beta-end over the "
         "optimizer steps", type=float, reported=True),
    _arg("--gamma-quantile", DISTILLATION, f"--gamma auto: Γ follows the Q-quantile of d over each step's tokens "
         f"(default {DEFAULT_QUANTILE}: about half of the recent tokens are hard)", type=float, reported=True),
    _arg("--gamma-momentum", DISTILLATION, f"--gamma auto: momentum M of Γ's moving average over steps (default "
         f"{DEFAULT_MOMENTUM})", type=float, reported=True),

    _arg("--on-policy-ratio", ON_POLICY, "share of the micro-batches whose responses the student samples itself; "
         "the loss is then the divergence alone on those tokens (" + ", ".join(ON_POLICY_METHODS) + ")",
         type=float, default=0.0, reported=True),
    _arg("--on-policy-temperature", ON_POLICY, "sampling temperature T", type=float, default=1.0, reported=True),
    _arg("--on-policy-max-new-tokens", ON_POLICY, "longest sampled response (prompt + response stay within "
         "--max-length)", type=int, default=256, reported=True),

    _arg("--lora-r", LORA, "train rank-R LoRA adapters instead of every student weight (0: full fine-tuning)",
         type=int, default=0, reported=True),
    _arg("--lora-alpha", LORA, f"LoRA scaling α (the update is (α/r)·B·A; default {ALPHA_PER_RANK:g}·r)",
         type=float, reported=True),
    _arg("--lora-dropout", LORA, "dropout on the adapters' input", type=float, default=0.0, reported=True),
    _arg("--lora-target-modules", LORA, "module names that get adapters (default all-linear: every linear layer "
         "but the lm_head)", nargs="+", default=["all-linear"], reported=True),

    _arg("--eval-steps", RUNNING, "validate every N optimizer steps (and at each epoch end)", type=int, default=0,
         training=False),
    _arg("--best-metric", RUNNING, "the validation score that keeps best/ and drives early stopping: loss (the "
         "student's cross-entropy on the references, as the paper's SFT runs), or bleu / chrf of the student's "
         "greedy translations of the validation rows (as fairseq's --best-checkpoint-metric bleu); needs "
         "--valid-file", default="loss", choices=("loss", "bleu", "chrf"), reported=True),
    _arg("--valid-decode-rows", RUNNING, "translate this many validation rows at each validation, the first ones "
         "of each direction in equal shares (default: every row; with --best-metric loss, setting it logs "
         "valid_bleu and valid_chrf beside the loss)", type=int, reported=True),
    _arg("--valid-max-new-tokens", RUNNING, "longest translation of a validation row in tokens", type=int,
         default=256, reported=True),
    _arg("--valid-decode-batch-size", RUNNING, "rows per generate call and process when translating the "
         "validation rows", type=int, default=16, training=False),
    _arg("--early-stopping-patience", RUNNING, "stop when N validations in a row have not improved the best "
         "validation score (--best-metric; 0: off; needs --valid-file). The learning-rate schedule stays that of "
         "the full run; best/ is the result. Lets a study train every system to convergence with a generous "
         "--epochs", type=int, default=0),
    _arg("--early-stopping-min-epochs", RUNNING, "never stop early before this many epochs (a loss whose "
         "validation loss first rises, as selfevo's does from a base model, is not cut before it can fall)",
         type=float, default=0.0),
    _arg("--save-steps", RUNNING, "save_state into step_N every N optimizer steps", type=int, default=0,
         training=False),
    _arg("--save-total-limit", RUNNING, "keep the newest N complete step_/epoch_ checkpoints (default 1: all a "
         "resume needs; 0: keep all). One checkpoint of a 7B student is about 100 GB", type=int, default=1,
         training=False),
    _arg("--resume-from-checkpoint", RUNNING, "'latest' (the newest step_N/epoch_N of --output-dir) or a folder",
         training=False),
    _arg("--allow-changed-args", RUNNING, "resume even though training arguments differ from the checkpoint's: "
         "the new values apply from its step on and config.json records them (default: an error)",
         action="store_true", training=False),
    _arg("--logging-steps", RUNNING, "one metrics.jsonl row per N optimizer steps", type=int, default=10,
         training=False),
    _arg("--max-bad-steps", RUNNING, "stop after N non-finite steps in a row", type=int, default=10,
         training=False),
    _arg("--report-to", RUNNING, "also log to this accelerate tracker", default="none",
         choices=("none", "tensorboard", "wandb"), training=False),
)

# Arguments that do not change what is trained (where it is written, how often it is logged, how the
# effective batch is split: the gradient is the same). Every other argument is compared on resume.
NOT_TRAINING_ARGS = tuple(a.dest for a in SCHEMA if not a.training)
# The arguments all_results.json lists as the run's hyperparameters.
REPORTED_ARGS = tuple(a.dest for a in SCHEMA if a.reported)


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for arg in SCHEMA:
        if arg.group not in groups:
            groups[arg.group] = parser.add_argument_group(arg.group)
        groups[arg.group].add_argument(arg.flag, **arg.options)
    return parser


def parse_args(argv=None, description=None):
    """train_kd.py's arguments (argparse.Namespace); `description` is the --help text above the flags."""
    return build_parser(description).parse_args(argv)


# ----------------------------------------------------------------------------- checks


def build_loss_config(args):
    """kd.methods.LossConfig of the arguments; each hyperparameter is checked against its range in
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
        text = str(error)
        for name in HYPERPARAMETERS:
            text = text.replace(name, "--" + name.replace("_", "-"))
        fail("arguments", text, "see train_kd.py --help", code=CONFIG_ERROR)


def check_args(args):
    """Every check of the command line that needs no model and no data: one message, exit status 2.
    Fills in the defaults that depend on other arguments. Returns the LossConfig."""
    for arg in SCHEMA:  # every number flag: a finite number (inf and nan would reach the JSON and the loss)
        value = getattr(args, arg.dest)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{arg.flag} {value}", "must be a finite number", "pass a finite value", code=CONFIG_ERROR)
    if isinstance(args.gamma, float) and args.gamma < 0:
        fail(f"--gamma {args.gamma}", "is below 0: d = KL(ỹ‖q) is never negative, so every token would be hard "
             "(that is --method skew)", "pass Γ >= 0 (the paper's 0.4), or --method skew", code=CONFIG_ERROR)
    if args.teacher and args.teacher_cache:
        fail("--teacher-cache", "replaces --teacher", "pass one of the two", code=CONFIG_ERROR)
    if args.method in KD_METHODS and not (args.teacher or args.teacher_cache):
        fail(f"--method {args.method}", "distils from a teacher", "pass --teacher PATH or --teacher-cache DIR "
             "(only sft runs without one)", code=CONFIG_ERROR)
    if args.method not in KD_METHODS and (args.teacher or args.teacher_cache):
        flag = "--teacher" if args.teacher else "--teacher-cache"
        fail(f"--method {args.method} with {flag}", "trains on the references alone: the teacher would be unused",
             f"drop {flag}, or pass a distillation --method", code=CONFIG_ERROR)
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
    if args.best_metric != "loss" and not args.valid_file:
        fail(f"--best-metric {args.best_metric}", "scores translations of the validation set",
             "pass --valid-file (prepared rows with references), or --best-metric loss", code=CONFIG_ERROR)
    if args.valid_decode_rows is not None and (args.valid_decode_rows < 1 or not args.valid_file):
        fail(f"--valid-decode-rows {args.valid_decode_rows}", "is a number of validation rows to translate",
             "pass a number >= 1 and a --valid-file, or leave it out (every row)", code=CONFIG_ERROR)
    if args.valid_max_new_tokens < 1 or args.valid_decode_batch_size < 1:
        fail(f"--valid-max-new-tokens {args.valid_max_new_tokens} / --valid-decode-batch-size "
             f"{args.valid_decode_batch_size}", "must be at least 1", "pass positive numbers", code=CONFIG_ERROR)
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
