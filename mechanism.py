"""Where the gradient goes: per-token logit gradients against difficulty, and hard tokens by frequency.

The paper argues that hard tokens (d = KL(ỹ‖q) > Γ) need the teacher's prior knowledge and that
rare tokens are the hard ones (Zipf). This script measures what each loss actually does with them,
on a fixed set of training batches, with the student as it starts and after a short training run
of each method (train_kd.py itself, in-process, into a temporary folder):

    python mechanism.py --teacher runs/sft-teacher/best --student runs/sft-student/best \\
        --train-file data/demo/train.jsonl --steps 50 --batches 4 --batch-size 32 --lr 1e-3 \\
        --out results/mechanism

For every measured target token t (a response token of the training references) and every method:
  d_t      = KL(ỹ_t‖q_t), the paper's difficulty (Eq. 5), the same for every method at a given student;
  |g_t|    = ‖∂ℓ_t/∂z_t‖, the norm of the gradient of the token's own loss w.r.t. its own student
             logits: one backward of kd.losses.compute_loss(chunk_size=0, reduction="sum") on
             logits that require grad gives every row at once (row t depends on ℓ_t only);
  ratio_t  = |g_t| / |g_t of noevo|, how much the method damps the token against plain KL(ỹ‖q)
             (noevo's gradient is q − ỹ; forward KD's is the same when λ = α).
Reported per bin of d (log-spaced, Γ is a bin edge, bins are (lo, hi] so the bins above Γ hold
exactly the hard tokens), per frequency bucket of the target token (quantiles over the target
tokens of the whole training file: bucket 1 = rarest), and for the batch as a whole: hard fraction,
share of the squared logit-gradient that comes from hard tokens. After training, also the mean d
of the same tokens grouped by their starting bin: how far each method moved the hard tokens.

Outputs in --out (each written completely or not at all):
  mechanism.json   every number, settings included
  mechanism.png    panels: |g| vs d; |g|/|g_noevo| vs d; hard fraction by frequency bucket at the
                   start and after training; hard tokens' share of the gradient; d after training
                   by starting d; mean d by frequency bucket

With --snapshots K, each run of a method with a skewed loss (skew, selfevo, selfevo_token) keeps K
checkpoints, and at step 0 and at each of them the measured tokens give (collapse.json, collapse.png):
the hard fraction, the mean d over all tokens and over the hard ones, the share of the hard tokens
whose loss ℓ_t sits at its bound (ℓ_t ≥ 0.9·(−log(1−β)): KL(ỹ‖q̂) ≤ −log(1−β) since q̂ ≥ (1−β)ỹ), and
the pull on the reference token r_t = −∂ℓ_t/∂log q_t against KL(ỹ‖q)'s (ỹ_t): for a hard token it is
βq_t/q̂_t of it, next to nothing where q_t is small. Per-token points of the last snapshot feed the
figure (the pull against q of the reference; the loss against d).

One process, one device (CUDA when available): the training runs are single-process train_kd.py
runs with --batch-size examples per step; teacher logits of the measured batches are cached once.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import train_kd
from kd.data import IGNORE_INDEX, TrainCollator, TranslationDataset, read_rows, shifted_targets
from kd.io import replacing, write_text
from kd.losses import KD_METHODS, METHODS, REGISTRY, LossConfig, compute_loss
from kd.models import check_model_path, load_model, load_tokenizer, tokenizer_mismatch

# The methods measured by default: the three of the paper's argument, forward KD as the usual
# reference, and the token-level self-evolution reading where kd/losses.py has it.
DEFAULT_METHODS = tuple(m for m in ("noevo", "skew", "selfevo", "forward", "selfevo_token") if m in METHODS)
REFERENCE_METHOD = "noevo"  # its gradient q − ỹ is the undamped pull every ratio is taken against
LOSS_DEFAULTS = LossConfig("noevo")  # one source of truth for λ, α, β, Γ
D_BINS_PER_DECADE = 2
D_DECADES_BELOW_GAMMA, D_DECADES_ABOVE_GAMMA = 3, 2
FREQUENCY_BUCKETS = 5
NEAR_BOUND = 0.9   # a hard token whose skewed loss is at least 0.9 × −log(1−β) "sits at the bound"
POINTS = 2000      # hard tokens kept per snapshot for the scatter panels


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher model (save_pretrained folder)")
    parser.add_argument("--student", required=True, help="student model at the start (save_pretrained folder)")
    parser.add_argument("--train-file", required=True, help="train.jsonl made by prepare_data.py")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods of kd/losses.py (default: {','.join(DEFAULT_METHODS)}); "
                             f"{REFERENCE_METHOD} is always measured as the reference of the damping ratio")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of train_kd.py per method (0: start only)")
    parser.add_argument("--batches", type=int, default=4, help="training batches measured (the same for every method)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per measured batch and per training step")
    parser.add_argument("--micro-batch-size", type=int, help="train_kd.py --micro-batch-size (default: --batch-size)")
    parser.add_argument("--lr", type=float, default=2e-5, help="train_kd.py --lr (its default is the paper's 2e-5; "
                                                               "the tiny models need about 1e-3)")
    parser.add_argument("--max-length", type=int, default=512, help="train_kd.py --max-length")
    parser.add_argument("--kd-ratio", type=float, default=LOSS_DEFAULTS.kd_ratio, help="λ of Eq. 3 (forward)")
    parser.add_argument("--target-mix", type=float, default=LOSS_DEFAULTS.target_mix, help="α of Eq. 4")
    parser.add_argument("--beta", type=float, default=LOSS_DEFAULTS.beta, help="β of Eq. 6")
    parser.add_argument("--gamma", type=float, default=LOSS_DEFAULTS.gamma, help="Γ of Eq. 8: hard when d > Γ")
    parser.add_argument("--seed", type=int, default=42, help="seed of the measured batches and of the training runs")
    parser.add_argument("--snapshots", type=int, default=0,
                        help="also measure the skewed loss during training, at K evenly spaced steps of each run "
                             "(collapse.json, collapse.png): the hard tokens' loss against its bound -log(1-β) and "
                             "the pull on their reference token")
    parser.add_argument("--out", required=True, help="folder for mechanism.json and mechanism.png")
    return parser.parse_args(argv)


def check_args(args):
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in KD_METHODS]
    if unknown or not methods:
        raise SystemExit(f"mechanism.py: --methods {args.methods}: {', '.join(unknown) or 'empty'}; "
                         f"choose among {', '.join(KD_METHODS)}")
    if args.steps < 0:
        raise SystemExit(f"mechanism.py: --steps must be >= 0, got {args.steps}")
    if args.snapshots < 0 or (args.snapshots and args.snapshots > args.steps):
        raise SystemExit(f"mechanism.py: --snapshots must be between 0 and --steps ({args.steps}), got {args.snapshots}")
    for name in ("batches", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"mechanism.py: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.gamma > 0:
        raise SystemExit(f"mechanism.py: --gamma must be > 0 (the d bins are log-spaced around it), got {args.gamma}")
    try:
        LossConfig("selfevo", kd_ratio=args.kd_ratio, target_mix=args.target_mix, beta=args.beta, gamma=args.gamma)
    except ValueError as error:
        raise SystemExit(f"mechanism.py: {error}") from None
    try:
        check_model_path(args.teacher, "--teacher")
        check_model_path(args.student, "--student")
    except FileNotFoundError as error:
        raise SystemExit(f"mechanism.py: {error}") from None
    return list(dict.fromkeys([REFERENCE_METHOD, *methods]))  # the reference first, no repeats


# =============================================================================================
# Per-token quantities (the tests check these against the closed-form gradients)
# =============================================================================================

def token_gradients(method, student_logits, teacher_logits, targets, *, kd_ratio, target_mix, beta, gamma):
    """‖∂ℓ_t/∂z_t‖ for every row t of student_logits [N, V] (all rows counted), in their dtype.

    ℓ_t depends on row t only, so one backward of the summed loss gives each row's own gradient.
    """
    logits = student_logits.detach().clone().requires_grad_(True)
    loss, _ = compute_loss(method, logits, teacher_logits, targets, kd_ratio=kd_ratio, target_mix=target_mix,
                           beta=beta, gamma=gamma, chunk_size=0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    return grad.norm(dim=-1)


def token_difficulty(student_logits, teacher_logits, targets, *, target_mix):
    """d = KL(ỹ‖q) per row (Eq. 5), as kd/losses.py computes it for selfevo's selection."""
    with torch.no_grad():
        _, stats = compute_loss("noevo", student_logits, teacher_logits, targets, target_mix=target_mix,
                                chunk_size=0, reduction="sum", token_stats=True)
    return stats["token_difficulty"]


def d_bin_edges(gamma):
    """Inner edges Γ·10^(k/2), k = −6..4: log-spaced, Γ itself an edge; bins are (lo, hi]."""
    ks = np.arange(-D_DECADES_BELOW_GAMMA * D_BINS_PER_DECADE, D_DECADES_ABOVE_GAMMA * D_BINS_PER_DECADE + 1)
    return [float(gamma * 10.0 ** (k / D_BINS_PER_DECADE)) for k in ks]


def d_bin_index(d, edges):
    """Bin of each d among len(edges)+1 bins [0, e0], (e0, e1], ..., (e_last, inf): closed above, so
    with Γ an edge the bins above Γ hold exactly the hard tokens (d > Γ)."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(d, dtype=float), side="left")


def frequency_bucket_edges(counts_of_occurrences, n_buckets=FREQUENCY_BUCKETS):
    """Inner edges of the frequency buckets: quantiles of the training count of every target-token
    occurrence, so each bucket holds about 1/n of the training target tokens (tied counts merge
    edges, and a bucket can hold more)."""
    fractions = np.arange(1, n_buckets) / n_buckets
    return [float(e) for e in np.unique(np.quantile(np.asarray(counts_of_occurrences, dtype=float), fractions))]


def frequency_bucket_index(counts, edges):
    """Bucket of each training count among len(edges)+1 buckets [0, e0), [e0, e1), ..., [e_last, inf):
    closed below, so the few very frequent tokens that tie at the top quantile (EOS, the full stop)
    fill the last bucket instead of leaving it empty."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(counts, dtype=float), side="right")


# =============================================================================================
# Summaries
# =============================================================================================

def mean_or_none(values):
    return float(np.mean(values)) if len(values) else None


def summarise(tokens, d_edges, freq_edges, gamma):
    """Aggregates of one measurement (arrays over the measured tokens) for mechanism.json."""
    d, norm, ratio, freq_bucket = tokens["d"], tokens["grad_norm"], tokens["ratio"], tokens["freq_bucket"]
    hard = d > gamma
    squared = norm.astype(np.float64) ** 2
    d_bin = d_bin_index(d, d_edges)
    lows, highs = [0.0, *d_edges], [*d_edges, math.inf]
    d_bins = []
    for b in range(len(d_edges) + 1):
        inside = d_bin == b
        d_bins.append({
            "d_low": lows[b], "d_high": highs[b] if math.isfinite(highs[b]) else None,
            "tokens": int(inside.sum()),
            "mean_d": mean_or_none(d[inside]),
            "grad_norm_mean": mean_or_none(norm[inside]),
            "grad_norm_median": float(np.median(norm[inside])) if inside.any() else None,
            "ratio_to_noevo_mean": mean_or_none(ratio[inside]),
            "grad_sq_share": float(squared[inside].sum() / squared.sum()) if squared.sum() > 0 else None,
        })
    buckets = []
    for b in range(len(freq_edges) + 1):
        inside = freq_bucket == b
        buckets.append({
            "tokens": int(inside.sum()),
            "hard_fraction": mean_or_none(hard[inside]),
            "mean_d": mean_or_none(d[inside]),
            "grad_norm_mean": mean_or_none(norm[inside]),
        })
    return {
        "tokens": int(d.size),
        "hard_fraction": float(hard.mean()),
        "mean_d": float(d.mean()),
        "grad_norm_mean_hard": mean_or_none(norm[hard]),
        "grad_norm_mean_easy": mean_or_none(norm[~hard]),
        "ratio_to_noevo_mean_hard": mean_or_none(ratio[hard]),
        "ratio_to_noevo_mean_easy": mean_or_none(ratio[~hard]),
        "hard_grad_sq_share": float(squared[hard].sum() / squared.sum()) if squared.sum() > 0 else None,
        "d_bins": d_bins,
        "frequency_buckets": buckets,
    }


def by_start_bin(d_start, d_end, d_edges):
    """The same tokens after training, grouped by their d at the start: who learned the hard tokens."""
    start_bin = d_bin_index(d_start, d_edges)
    rows = []
    for b in range(len(d_edges) + 1):
        inside = start_bin == b
        rows.append({"tokens": int(inside.sum()), "mean_d_start": mean_or_none(d_start[inside]),
                     "mean_d_end": mean_or_none(d_end[inside])})
    return rows


# =============================================================================================
# Measuring a student on the fixed batches
# =============================================================================================

def student_logits_of(model, batch, counted, device):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
    return out.logits[counted.to(device)].float()


def measure(model, batches, teacher_rows, methods, args, device, freq_buckets):
    """Per-token arrays {method: {d, grad_norm, ratio, freq_bucket}} of one student on the measured batches."""
    losses = dict(kd_ratio=args.kd_ratio, target_mix=args.target_mix, beta=args.beta, gamma=args.gamma)
    parts = {m: {"d": [], "grad_norm": []} for m in methods}
    model.eval()
    for batch, teacher_logits in zip(batches, teacher_rows):
        targets = shifted_targets(batch["labels"])
        counted = targets != IGNORE_INDEX
        logits = student_logits_of(model, batch, counted, device)
        teacher = teacher_logits.to(device)
        rows_targets = targets[counted].to(device)
        d = token_difficulty(logits, teacher, rows_targets, target_mix=args.target_mix).cpu().numpy()
        for method in methods:
            parts[method]["d"].append(d)
            parts[method]["grad_norm"].append(
                token_gradients(method, logits, teacher, rows_targets, **losses).cpu().numpy())
    result = {}
    reference = np.concatenate(parts[REFERENCE_METHOD]["grad_norm"])
    for method in methods:
        norm = np.concatenate(parts[method]["grad_norm"])
        result[method] = {"d": np.concatenate(parts[method]["d"]), "grad_norm": norm,
                          "ratio": norm / np.maximum(reference, np.finfo(np.float32).tiny),
                          "freq_bucket": freq_buckets}
    return result


# =============================================================================================
# The skewed loss during training (--snapshots): its bound and the pull on the reference token
# =============================================================================================

def teacher_confidence(teacher_rows, targets):
    """How sure the teacher is on the measured tokens: the mean probability of the reference token,
    the share of tokens where it exceeds 0.9, and the mean entropy (nats) of its distribution."""
    log_p = torch.cat([torch.log_softmax(rows.double(), -1) for rows in teacher_rows])
    reference = torch.cat(targets)
    p_reference = log_p.gather(1, reference[:, None]).squeeze(1).exp()
    entropy = -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(-1)
    return {"mean_p_reference": float(p_reference.mean()), "share_p_reference_above_0.9": float((p_reference > 0.9).double().mean()),
            "mean_entropy": float(entropy.mean()), "tokens": int(reference.numel())}


def token_loss_and_pull(method, student_logits, teacher_logits, targets, *, kd_ratio, target_mix, beta, gamma):
    """Per token (rows of student_logits [N, V]): the method's loss ℓ_t, the hard flag, q of the reference
    token, and the pull on it: r_t = −∂ℓ_t/∂log q_t at the reference (the weight with which the loss pulls
    log q of the reference up; KL(ỹ‖q) pulls with ỹ_t, the skewed KL(ỹ‖q̂) with ỹ_t·βq_t/q̂_t)."""
    config = LossConfig(method, kd_ratio=kd_ratio, target_mix=target_mix, beta=beta, gamma=gamma, chunk_size=0)
    with torch.no_grad():  # the engine's own hard/easy decision (Eq. 8)
        hard = compute_loss(config, student_logits, teacher_logits, targets, token_stats=True)[1]["token_hard"]
    log_q = torch.log_softmax(student_logits.double(), -1).detach().requires_grad_(True)
    log_p = torch.log_softmax(teacher_logits.double(), -1)
    loss = REGISTRY[method].formula(log_q, log_p, targets, hard, config)  # the entry's per-token formula
    (grad,) = torch.autograd.grad(loss.sum(), log_q)
    at_target = targets[:, None]
    return {"loss": loss.detach(), "hard": hard, "q_ref": log_q.detach().gather(1, at_target).squeeze(1).exp(),
            "pull_ref": -grad.gather(1, at_target).squeeze(1)}


def snapshot_measures(model, batches, teacher_rows, method, args, device):
    """The skewed loss of `method` at one snapshot of the student, over the measured tokens: how many
    tokens are hard, how close their loss is to the bound −log(1−β), how much pull their reference keeps
    against KL(ỹ‖q)'s (noevo's ỹ_t), and the per-token points of the pull figure."""
    settings = dict(kd_ratio=args.kd_ratio, target_mix=args.target_mix, beta=args.beta, gamma=args.gamma)
    parts = {"loss": [], "hard": [], "q_ref": [], "pull_ref": [], "pull_noevo": [], "d": []}
    model.eval()
    for batch, teacher_logits in zip(batches, teacher_rows):
        targets = shifted_targets(batch["labels"])
        counted = targets != IGNORE_INDEX
        logits = student_logits_of(model, batch, counted, device)
        teacher, rows_targets = teacher_logits.to(device), targets[counted].to(device)
        measured = token_loss_and_pull(method, logits, teacher, rows_targets, **settings)
        reference = token_loss_and_pull("noevo", logits, teacher, rows_targets, **settings)
        for key in ("loss", "hard", "q_ref", "pull_ref"):
            parts[key].append(measured[key].cpu().numpy())
        parts["pull_noevo"].append(reference["pull_ref"].cpu().numpy())  # ỹ_t: the unskewed pull
        parts["d"].append(reference["loss"].cpu().numpy())               # noevo's loss is d = KL(ỹ‖q)
    tokens = {key: np.concatenate(value) for key, value in parts.items()}
    hard = tokens["hard"].astype(bool)
    bound = -math.log(1 - args.beta) if args.beta < 1 else math.inf
    ratio = tokens["pull_ref"] / np.maximum(tokens["pull_noevo"], np.finfo(np.float64).tiny)
    near = tokens["loss"] >= NEAR_BOUND * bound
    return {
        "hard_fraction": float(hard.mean()),
        "mean_d": float(tokens["d"].mean()),
        "mean_d_hard": mean_or_none(tokens["d"][hard]),
        "loss_bound": bound,
        "hard_near_bound": mean_or_none(near[hard]),            # share of the hard tokens with ℓ ≥ 0.9·bound
        "hard_loss_over_bound_mean": mean_or_none(tokens["loss"][hard] / bound),
        "hard_pull_ratio_median": float(np.median(ratio[hard])) if hard.any() else None,
        "easy_pull_ratio_median": float(np.median(ratio[~hard])) if (~hard).any() else None,
        "hard_q_ref_median": float(np.median(tokens["q_ref"][hard])) if hard.any() else None,
        "points": {"q_ref": tokens["q_ref"][hard][:POINTS].tolist(), "pull_ratio": ratio[hard][:POINTS].tolist(),
                   "loss_over_bound": (tokens["loss"][hard][:POINTS] / bound).tolist(),
                   "d": tokens["d"][hard][:POINTS].tolist()},
    }


def plot_collapse(snapshots, settings, path):
    """collapse.png: over training, the hard tokens near the bound and their pull; at the last snapshot,
    the pull on the reference against q (theory: βq/((1−β)ỹ + βq) of noevo's) and the loss against d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beta = settings["beta"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (method, runs) in enumerate(snapshots.items()):
        steps = [run["step"] for run in runs]
        color = f"C{i}"
        axes[0].plot(steps, [run["hard_fraction"] for run in runs], "-o", color=color, markersize=3,
                     label=f"{method}: hard fraction")
        axes[0].plot(steps, [run["hard_near_bound"] or 0 for run in runs], "--o", color=color, markersize=3,
                     label=f"{method}: hard tokens with ℓ ≥ {NEAR_BOUND:g}·bound")
        axes[0].plot(steps, [run["hard_pull_ratio_median"] or 0 for run in runs], ":o", color=color, markersize=3,
                     label=f"{method}: median pull of the hard / noevo's")
        last = runs[-1]["points"]
        if last["q_ref"]:
            axes[1].scatter(last["q_ref"], last["pull_ratio"], s=4, color=color, alpha=0.4, label=method)
            axes[2].scatter(last["d"], last["loss_over_bound"], s=4, color=color, alpha=0.4, label=method)
    q = np.logspace(-6, 0, 100)
    axes[1].plot(q, beta * q / ((1 - beta) + beta * q), color="black", linewidth=1,
                 label="βq/((1−β) + βq): ỹ_t = 1 (α = 0)")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_title("the skewed loss over training (measured tokens)")
    axes[0].legend(fontsize=6)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("q of the reference token (hard tokens, last snapshot)")
    axes[1].set_ylabel("pull on the reference / noevo's (ỹ_t)")
    axes[1].set_title("the pull vanishes where q is small")
    axes[1].legend(fontsize=7)
    axes[2].axhline(1.0, color="grey", linestyle=":", label="the bound −log(1−β)")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("d = KL(ỹ‖q) (hard tokens, last snapshot)")
    axes[2].set_ylabel("loss / −log(1−β)")
    axes[2].set_title("hard tokens sit at the bound")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"The skewed loss during training (β = {beta}, Γ = {settings['gamma']}, α = {settings['target_mix']})")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def measure_snapshots(run_dir, method, batches, teacher_rows, args, device):
    """snapshot_measures at step 0 and at every checkpoint the run kept (step_N / epoch_N), in step order."""
    from safetensors.torch import load_file

    model = load_model(args.student).to(device)
    rows = [{"step": 0, **snapshot_measures(model, batches, teacher_rows, method, args, device)}]
    kept = sorted((json.loads((folder / "trainer_state.json").read_text())["global_step"], folder)
                  for folder in run_dir.glob("*_*") if (folder / "trainer_state.json").is_file())
    for step, checkpoint in kept:
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        rows.append({"step": step, **snapshot_measures(model.to(device), batches, teacher_rows, method, args, device)})
    del model
    return rows


def reset_accelerate():
    """train_kd.main builds an Accelerator per call; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_briefly(method, args, folder, save_steps=0):
    """args.steps optimizer steps of train_kd.py from --student (a checkpoint every save_steps, all kept);
    returns the final model folder and the results."""
    argv = ["--method", method, "--student", args.student, "--teacher", args.teacher,
            "--train-file", args.train_file, "--output-dir", str(folder),
            "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size or args.batch_size),
            "--lr", str(args.lr), "--max-steps", str(args.steps), "--epochs", str(10**6),
            "--max-length", str(args.max_length), "--seed", str(args.seed), "--logging-steps", str(args.steps),
            "--save-total-limit", "0" if save_steps else "1", "--save-steps", str(save_steps),
            "--kd-ratio", str(args.kd_ratio), "--target-mix", str(args.target_mix), "--beta", str(args.beta),
            "--gamma", str(args.gamma)]
    try:
        results = train_kd.main(argv)
    finally:
        reset_accelerate()
    return Path(results["final_dir"]), results


# =============================================================================================
# Figure and writing
# =============================================================================================

def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    gamma = summary["settings"]["gamma"]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    # Methods with identical gradients (forward = noevo when λ = α) would hide each other: earlier
    # methods are drawn wider.
    widths = {m: 1.0 + 0.8 * (len(methods) - 1 - i) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    def d_centers(bins):
        edges = summary["d_bin_edges"]
        first, last = edges[0] / 10 ** (1 / D_BINS_PER_DECADE), edges[-1] * 10 ** (1 / D_BINS_PER_DECADE)
        lows, highs = [first, *edges], [*edges, last]
        return [math.sqrt(lo * hi) for lo, hi in zip(lows, highs)]

    def line(ax, xs, bins, key, method, style, label):
        points = [(x, b[key]) for x, b in zip(xs, bins) if b.get(key) is not None and b["tokens"] > 0]
        if points:
            ax.plot(*zip(*points), style, color=colors[method], linewidth=widths[method], label=label,
                    marker="o", markersize=3)

    for ax, key, title in ((axes[0, 0], "grad_norm_mean", "‖∂ℓ_t/∂z_t‖ (mean per bin of d)"),
                           (axes[0, 1], "ratio_to_noevo_mean", "‖g_t‖ / ‖g_t of noevo‖ (damping)")):
        for method, runs in summary["methods"].items():
            for when, style in (("start", "-"), ("end", "--")):
                if when in runs:
                    line(ax, d_centers(runs[when]["d_bins"]), runs[when]["d_bins"], key, method, style,
                         f"{method} {'step 0' if when == 'start' else 'after training'}")
        ax.axvline(gamma, color="grey", linestyle=":", label=f"Γ = {gamma:g}")
        ax.set_xscale("log")
        ax.set_xlabel("difficulty d = KL(ỹ‖q)")
        ax.set_title(title)
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=7)

    buckets = range(1, len(summary["frequency_buckets"]) + 1)
    first = summary["methods"][methods[0]]["start"]
    for ax, key, title in ((axes[0, 2], "hard_fraction", "hard fraction (d > Γ) by frequency bucket"),
                           (axes[1, 2], "mean_d", "mean d by frequency bucket")):
        ax.plot(buckets, [b[key] for b in first["frequency_buckets"]], "-", color="black", marker="o",
                label="step 0 (all methods)")
        for method, runs in summary["methods"].items():
            if "end" in runs:
                ax.plot(buckets, [b[key] for b in runs["end"]["frequency_buckets"]], "--", color=colors[method],
                        linewidth=widths[method], marker="o", markersize=3, label=f"{method} after training")
        ax.set_xticks(list(buckets))
        ax.set_xlabel("frequency bucket of the target token (1 = rarest)")
        ax.set_title(title)
        ax.legend(fontsize=7)

    ax = axes[1, 0]
    width = 0.4
    for i, (method, runs) in enumerate(summary["methods"].items()):
        for j, when in enumerate(("start", "end")):
            if when in runs and runs[when]["hard_grad_sq_share"] is not None:
                ax.bar(i + (j - 0.5) * width, runs[when]["hard_grad_sq_share"], width, color=colors[method],
                       alpha=1.0 if when == "start" else 0.5)
        if "start" in runs:
            ax.plot([i - width, i + width], [runs["start"]["hard_fraction"]] * 2, color="black", linewidth=1)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_title("hard tokens' share of Σ‖g_t‖² (dark: step 0, light: after);\nblack bar: their share of the tokens")

    ax = axes[1, 1]
    seen = []
    for method, runs in summary["methods"].items():
        if "by_start_bin" in runs:
            rows = runs["by_start_bin"]
            points = [(row["mean_d_start"], row["mean_d_end"]) for row in rows if row["tokens"] > 0]
            ax.plot(*zip(*points), "--", color=colors[method], linewidth=widths[method], marker="o", markersize=3,
                    label=method)
            seen.extend(value for point in points for value in point if value and value > 0)
    ax.axvline(gamma, color="grey", linestyle=":")
    ax.axhline(gamma, color="grey", linestyle=":")
    if seen:
        ax.plot([min(seen), max(seen)], [min(seen), max(seen)], color="lightgrey", linewidth=1, label="unchanged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean d at step 0 (tokens grouped by their starting bin)")
    ax.set_ylabel("mean d of the same tokens after training")
    ax.set_title("who learned the hard tokens")
    ax.legend(fontsize=7)

    settings = summary["settings"]
    fig.suptitle(f"Where the gradient goes: {settings['tokens_measured']} target tokens, "
                 f"{settings['steps']} steps of train_kd.py per method "
                 f"(α={settings['target_mix']}, β={settings['beta']}, Γ={gamma})")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(summary, out_dir):
    """mechanism.json and mechanism.png, each complete or absent (kd/io.py; the png is renamed last)."""
    png, js = out_dir / "mechanism.png", out_dir / "mechanism.json"
    with replacing(png) as tmp_png:
        plot(summary, tmp_png)
        write_text(js, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return js, png


# =============================================================================================
# Main
# =============================================================================================

def main(argv=None):
    args = parse_args(argv)
    methods = check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out)

    tokenizer = load_tokenizer(args.student)
    reason = tokenizer_mismatch(tokenizer, load_tokenizer(args.teacher))
    if reason:
        raise SystemExit(f"mechanism.py: --teacher {args.teacher}: its tokenizer does not match the student's: {reason}")
    try:
        rows = read_rows(args.train_file, "--train-file")
        dataset = TranslationDataset(rows, tokenizer, args.max_length, source_name=f"--train-file {args.train_file}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"mechanism.py: {error}") from None

    # Token frequencies over every target token of the training references (response + EOS).
    training_targets = [t for example in dataset.examples for t in example["labels"] if t != IGNORE_INDEX]
    vocab_counts = np.bincount(training_targets, minlength=len(tokenizer))
    occurrence_counts = np.repeat(vocab_counts, vocab_counts)  # the count of each occurrence's token
    freq_edges = frequency_bucket_edges(occurrence_counts)
    d_edges = d_bin_edges(args.gamma)

    # The measured batches: a seeded draw of --batches x --batch-size training examples, fixed for all.
    n_examples = min(len(dataset), args.batches * args.batch_size)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:n_examples].tolist()
    collate = TrainCollator(tokenizer.pad_token_id)
    batches = [collate([dataset[i] for i in order[start:start + args.batch_size]])
               for start in range(0, n_examples, args.batch_size)]
    shifted = [shifted_targets(batch["labels"]) for batch in batches]
    measured_targets = np.concatenate([targets[targets != IGNORE_INDEX].numpy() for targets in shifted])
    freq_buckets = frequency_bucket_index(vocab_counts[measured_targets], freq_edges)

    # Teacher logits of the measured tokens, once (the teacher is frozen).
    teacher = load_model(args.teacher).to(device).eval()
    teacher_rows = []
    for batch in batches:
        counted = shifted_targets(batch["labels"]) != IGNORE_INDEX
        teacher_rows.append(student_logits_of(teacher, batch, counted, device).cpu())
    del teacher
    teacher_stats = teacher_confidence(teacher_rows, [targets[targets != IGNORE_INDEX] for targets in shifted])

    student = load_model(args.student).to(device)
    start = measure(student, batches, teacher_rows, methods, args, device, freq_buckets)
    del student
    summary_methods = {m: {"start": summarise(start[m], d_edges, freq_edges, args.gamma)} for m in methods}
    print(f"step 0: {start[REFERENCE_METHOD]['d'].size} tokens, hard fraction "
          f"{summary_methods[REFERENCE_METHOD]['start']['hard_fraction']:.3f}")

    snapshots = {}
    if args.steps > 0:
        with tempfile.TemporaryDirectory(prefix="mechanism_", dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
            for method in methods:
                every = args.steps // args.snapshots if args.snapshots else 0
                final_dir, results = train_briefly(method, args, Path(tmp) / method, save_steps=every)
                if args.snapshots and REGISTRY[method].hard != "none":  # the methods with a skewed loss
                    snapshots[method] = measure_snapshots(Path(tmp) / method, method, batches, teacher_rows, args,
                                                          device)
                model = load_model(str(final_dir)).to(device)
                end = measure(model, batches, teacher_rows, list(dict.fromkeys([REFERENCE_METHOD, method])),
                              args, device, freq_buckets)
                del model
                summary_methods[method]["end"] = summarise(end[method], d_edges, freq_edges, args.gamma)
                summary_methods[method]["by_start_bin"] = by_start_bin(start[method]["d"], end[method]["d"], d_edges)
                summary_methods[method]["train_seconds"] = results["train_seconds"]
                print(f"{method}: hard fraction {summary_methods[method]['start']['hard_fraction']:.3f} -> "
                      f"{summary_methods[method]['end']['hard_fraction']:.3f} after {args.steps} steps")

    bucket_counts = [vocab_counts[measured_targets][freq_buckets == b] for b in range(len(freq_edges) + 1)]
    summary = {
        "settings": {
            "teacher": args.teacher, "student": args.student, "train_file": args.train_file,
            "methods": methods, "steps": args.steps, "batches": len(batches), "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size or args.batch_size, "lr": args.lr,
            "max_length": args.max_length, "kd_ratio": args.kd_ratio, "target_mix": args.target_mix,
            "beta": args.beta, "gamma": args.gamma, "seed": args.seed, "device": str(device),
            "tokens_measured": int(measured_targets.size),
            "training_target_tokens": int(vocab_counts.sum()),
        },
        "teacher": teacher_stats,
        "d_bin_edges": d_edges,
        "frequency_bucket_edges": freq_edges,
        "frequency_buckets": [{"bucket": b + 1, "tokens": int(c.size),
                               "min_count": int(c.min()) if c.size else None,
                               "max_count": int(c.max()) if c.size else None} for b, c in enumerate(bucket_counts)],
        "methods": summary_methods,
    }
    js, png = write_outputs(summary, out_dir)
    print(f"wrote {js}\nwrote {png}")
    if snapshots:
        collapse = {"settings": summary["settings"], "near_bound": NEAR_BOUND, "methods": snapshots}
        with replacing(out_dir / "collapse.png") as tmp_png:
            plot_collapse(snapshots, summary["settings"], tmp_png)
            write_text(out_dir / "collapse.json", json.dumps(collapse, indent=2, allow_nan=False) + "\n")
        print(f"wrote {out_dir / 'collapse.json'}\nwrote {out_dir / 'collapse.png'}")
        summary["collapse"] = collapse
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
