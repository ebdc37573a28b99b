"""The engine that computes every method of kd/methods.py: exact, numerically stable, memory-lean.

What each method computes (its per-token formula, its hyperparameters, where it comes from) is its
entry in kd/methods.py; this module runs those formulas over a batch, in three entries with
identical values (tests/test_losses.py checks them against each other and against an independent
float64 reference):
- `compute_loss(..., chunk_size=0)`: the plain form, for reading: the formula over all counted
  tokens, autograd differentiates. Autograd keeps several float32 [N, V] tensors alive (the
  "naive" baseline of bench/bench_losses.py).
- `compute_loss(...)` (default chunk_size): a torch.autograd.Function that, chunk by chunk over the
  counted tokens, computes the loss AND its gradient w.r.t. the student logits inside forward (as
  Liger-Kernel's chunked losses do) and stores only that gradient; extra memory is the gradient
  plus a few [chunk, V] buffers. A chunk's gradient is the autograd of the entry's formula on that
  chunk, or the entry's hand-derived `fast` path where it has one (kd/fast_paths.py).
- `compute_loss_from_hidden(...)`: the same from the student's final hidden states and lm_head
  weight; per chunk it builds the logits, the loss, the gradient w.r.t. the chunk's hidden states
  and accumulates the weight gradient, so the full [N, V] student logits never exist.
Each takes the method's name and its hyperparameters as keywords, or a kd.methods.LossConfig.

The loss of a call is the mean over its counted tokens (Eq. 9 divides by N, easy and hard tokens
together), or their sum with reduction="sum" (train_kd.py divides that by the token count of the
whole effective batch, so gradient accumulation over micro-batches and processes is exact).

Conventions worth knowing:
- The hard/easy choice of a selecting method (selfevo, selfevo_token: Eq. 8) is a gradient-free
  decision re-made at every call from d = KL(ỹ‖q); top_k selects within one call (with gradient
  accumulation: per micro-batch), so d of every token is computed before any loss.
- Everything is computed in log space, in float32 for bf16/fp16 inputs (float64 stays float64).
- Every teacher row needs at least one finite logit; student logits must be finite. A formula that
  gives a non-finite loss on such inputs is an error naming the method; non-finite inputs (a bf16
  overflow) give a non-finite loss, which train_kd.py skips as a bad step.
- `hard_fraction` is 1.0 for `skew`, the selected share for the selecting methods, 0.0 for
  everything else. `mean_difficulty` is the mean of d = KL(ỹ‖q) for the methods that build ỹ
  (TARGET_MIX_METHODS) and NaN for the others (no ỹ exists there); with no counted token it is 0.0.
- The caller shifts: labels[i] is the target of logits[i]. Shift the labels (not the logits) so the
  logits stay one contiguous tensor: `labels = F.pad(labels[:, 1:], (0, 1), value=-100)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kd.fast_paths import FastTerms, difficulty_
# The method lists are the registry's (re-exported: the scripts import them from here).
from kd.methods import (KD_METHODS, METHODS, ON_POLICY_METHODS, REGISTRY, SELECTING_METHODS,  # noqa: F401
                        TARGET_MIX_METHODS, LossConfig)

# chunk_size=None (the default) picks the tokens per chunk of the lean path from the vocabulary:
# as many as fit CHUNK_ELEMENTS logits, so the ~8 float32 [chunk, V] buffers of a chunk stay small.
# On CPU 2**22 elements (16 MiB per buffer) stays under glibc's mmap threshold (32 MiB), so the
# buffers are reused instead of being page-faulted in anew for every chunk (2-3x faster here).
# On CUDA the caching allocator reuses memory anyway and larger chunks mean fewer kernel launches.
DEFAULT_CHUNK_SIZE = None
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}


def config_of(method, settings: dict) -> LossConfig:
    """The LossConfig of an entry point's arguments: a LossConfig, or a method name and keywords."""
    if isinstance(method, LossConfig):
        if settings:
            raise ValueError(f"pass the settings inside the LossConfig, not as keywords: {sorted(settings)}")
        return method
    return LossConfig(method, **settings)


# ----------------------------------------------------------------------------- vocabulary alignment


def shared_vocab_size(student_vocab: int, teacher_vocab: int) -> int:
    """The vocabulary size that student and teacher share.

    Equal sizes are returned as they are. Sizes that differ only by padding rows are cut to the
    smaller one; "padding rows" means the larger vocabulary has at most max(1, smaller // 64) extra
    rows appended at the end (one added pad token as in 32000 vs 32001, or an embedding matrix
    padded to a multiple of 64/128 as in Qwen2's 151936 vs 152064). Anything else (32000 vs 50257:
    a different tokenizer) raises ValueError naming both sizes.
    """
    for name, size in (("student", student_vocab), ("teacher", teacher_vocab)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} vocabulary size must be a positive int, got {size!r}")
    smaller, larger = sorted((student_vocab, teacher_vocab))
    if larger - smaller > max(1, smaller // 64):
        raise ValueError(
            f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ by "
            f"{larger - smaller} entries, more than padding rows (at most max(1, {smaller} // 64)); "
            "distillation needs the same tokenizer")
    return smaller


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None, *, ignore_index: int = -100):
    """Cut student and teacher logits [..., V] to their shared vocabulary (views, no copy).

    If labels are given, every counted label must lie inside the shared vocabulary.
    Returns (student_logits, teacher_logits).
    """
    vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1])
    if labels is not None:
        _check_labels(labels, vocab, ignore_index)
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        raise ValueError(f"label {bad} lies outside the (shared) vocabulary of size {vocab} "
                         f"and is not ignore_index ({ignore_index})")


def _log_probs(logits: torch.Tensor, out: Optional[torch.Tensor] = None,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log-softmax in float32 (float64 stays float64), into `out` when given; the teacher's
    log-probabilities take the dtype of the student's (`like`)."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32) if like is None else like.dtype
    if out is None:
        return torch.log_softmax(logits.to(compute_dtype), dim=-1)
    return torch.log_softmax(logits.to(compute_dtype), dim=-1, out=out)


def _top_k_hard(difficulty: torch.Tensor, top_k: float) -> torch.Tensor:
    """The round(top_k·N) tokens of largest d are hard (Python's round: ties go to even)."""
    n_hard = int(round(top_k * difficulty.numel()))
    hard = torch.zeros(difficulty.shape, dtype=torch.bool, device=difficulty.device)
    hard[torch.topk(difficulty, n_hard).indices] = True
    return hard


def _hard_tokens(config: LossConfig, difficulty: Optional[torch.Tensor], n: int, device,
                 scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hard set of n tokens: the method's selection (Eq. 8: d > Γ, or top-K by d; or its own rule on
    its scores), all, or none."""
    method = REGISTRY[config.method]
    if method.hard == "selected":
        if method.select is not None:
            return method.select(scores, config)
        return _top_k_hard(difficulty, config.top_k) if config.top_k is not None else difficulty > config.gamma
    return torch.full((n,), method.hard == "all", dtype=torch.bool, device=device)


def _scores(config: LossConfig, log_q, log_p, targets) -> Optional[torch.Tensor]:
    """A method's own hardness scores of the tokens (no gradient), or None (selfevo's d decides)."""
    score = REGISTRY[config.method].score
    if score is None:
        return None
    with torch.no_grad():
        return score(log_q.detach(), log_p, targets, config)


def _selects_over_the_call(config: LossConfig) -> bool:
    """Whether the hard set needs every token of the call first (top-K, or a rule of the method's own)."""
    method = REGISTRY[config.method]
    return method.hard == "selected" and (config.top_k is not None or method.select is not None)


def _difficulty(log_q: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor, config: LossConfig):
    """d = KL(ỹ‖q) per token for the methods that build ỹ, else None (no gradient; inputs kept)."""
    if not REGISTRY[config.method].target_mix:
        return None
    return difficulty_(log_q.detach(), log_p.clone(), targets, config.target_mix)


def _formula_loss(config: LossConfig, log_q, log_p, targets, hard) -> torch.Tensor:
    """The entry's per-token loss, checked to be one value per token."""
    loss = REGISTRY[config.method].formula(log_q, log_p, targets, hard, config)
    if not torch.is_tensor(loss) or tuple(loss.shape) != (log_q.shape[0],):
        raise ValueError(f"method {config.method!r}: its formula must return one loss per token, shape "
                         f"({log_q.shape[0]},), got {tuple(loss.shape) if torch.is_tensor(loss) else type(loss)}")
    return loss


def _check_finite(config: LossConfig, losses: list, inputs: Callable[[int], tuple]) -> None:
    """A non-finite loss on finite inputs is the formula's fault: an error naming the method.
    losses: the per-token losses of each chunk; inputs(i): (student logits, teacher logits) of chunk i."""
    bad = [i for i, flag in enumerate(torch.stack([~torch.isfinite(loss).all() for loss in losses]).tolist()) if flag] \
        if losses else []
    for i in bad:
        student, teacher = inputs(i)
        finite_inputs = bool(torch.isfinite(student).all()) and (teacher is None or bool(
            (~torch.isnan(teacher) & (teacher != math.inf)).all() and (teacher > -math.inf).any(-1).all()))
        if finite_inputs:
            row = int((~torch.isfinite(losses[i])).nonzero()[0])
            raise ValueError(f"method {config.method!r}: its formula gave a non-finite loss "
                             f"({float(losses[i][row])}) on finite inputs (row {row} of chunk {i}); "
                             "check the formula in kd/methods.py")


@dataclass
class _Report:
    """What the stats are built from: the counted rows and their d / hard flags."""
    counted_rows: torch.Tensor          # indices into the flattened labels
    difficulty: Optional[torch.Tensor]  # [n] or None
    hard: torch.Tensor                  # [n] bool


# ----------------------------------------------------------------------------- plain path


def _plain_loss(config, student_logits, teacher_logits, labels, vocab):
    """The readable form: select the counted rows, per-token losses, autograd does the rest."""
    counted = labels != config.ignore_index
    counted_rows = counted.nonzero().squeeze(1)
    if counted_rows.numel() == labels.numel():  # every position counts: no gather copy needed
        student_rows, teacher_rows = student_logits, teacher_logits
    else:
        student_rows = student_logits[counted_rows]
        teacher_rows = None if teacher_logits is None else teacher_logits[counted_rows]
    log_q = _log_probs(student_rows[:, :vocab])
    log_p = None if teacher_rows is None else _log_probs(teacher_rows[:, :vocab].detach(), like=log_q)
    targets = labels[counted_rows]
    difficulty = _difficulty(log_q, log_p, targets, config)
    hard = _hard_tokens(config, difficulty, targets.numel(), targets.device, _scores(config, log_q, log_p, targets))
    token_losses = _formula_loss(config, log_q, log_p, targets, hard)
    _check_finite(config, [token_losses.detach()], lambda i: (student_rows[:, :vocab].detach(),
                                                              None if teacher_rows is None else teacher_rows[:, :vocab]))
    loss = token_losses.sum()
    if config.reduction == "mean" and counted_rows.numel():
        loss = loss / counted_rows.numel()
    return loss, _Report(counted_rows, difficulty, hard)


# ----------------------------------------------------------------------------- chunked path


def _auto_chunk_tokens(device: torch.device, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // vocab)


def _autograd_terms(config: LossConfig, logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                    targets: torch.Tensor, hard: Optional[torch.Tensor], scale: float) -> FastTerms:
    """A chunk's per-token loss and scale·∂loss/∂z by autograd of the entry's formula."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        log_q = _log_probs(z)
        log_p = None if teacher_logits is None else _log_probs(teacher_logits, like=log_q)
        difficulty = _difficulty(log_q, log_p, targets, config)
        if hard is None:
            hard = _hard_tokens(config, difficulty, targets.numel(), targets.device,
                                _scores(config, log_q, log_p, targets))
        loss = _formula_loss(config, log_q, log_p, targets, hard)
        (grad,) = torch.autograd.grad(loss.sum() * scale, z)
    return FastTerms(loss.detach(), difficulty, hard, grad)


def _run_chunks(config: LossConfig, labels: torch.Tensor, vocab: int,
                student_chunk: Callable[[torch.Tensor], torch.Tensor],
                teacher_chunk: Optional[Callable[[torch.Tensor], torch.Tensor]],
                write_grad: Callable[[torch.Tensor, torch.Tensor], None],
                log_q_buffer: Optional[Callable[[slice], Optional[torch.Tensor]]] = None):
    """Loss and ∂loss/∂z chunk by chunk over the counted tokens (no [N, V] buffer).

    student_chunk(rows) / teacher_chunk(rows) return the logits [len(rows), V] of those rows;
    write_grad(rows, grad) receives ∂loss/∂z for them (already divided by N for "mean").
    log_q_buffer(rows), if given, returns where to compute log q (the fast paths turn it into
    the gradient in place, so the gradient store itself can serve and no copy is needed).
    """
    counted_rows = (labels != config.ignore_index).nonzero().squeeze(1)
    n = counted_rows.numel()
    scale = 1.0 / n if config.reduction == "mean" and n else 1.0
    chunk = config.chunk_size or _auto_chunk_tokens(labels.device, vocab)
    if n == labels.numel():  # every row counts: chunks are slices (views), not gathered copies
        chunks = [(start, slice(start, min(start + chunk, n))) for start in range(0, n, chunk)]
    else:
        chunks = [(start, counted_rows[start:start + chunk]) for start in range(0, n, chunk)]
    fast = REGISTRY[config.method].fast if config.fast_path else None

    def log_probs_of(rows, into_buffer=False):
        out = log_q_buffer(rows) if into_buffer and log_q_buffer is not None else None
        log_q = _log_probs(student_chunk(rows), out=out)
        return log_q, (None if teacher_chunk is None else _log_probs(teacher_chunk(rows), like=log_q))

    forced_hard = None
    if _selects_over_the_call(config):
        # top-K (or a method's own rule) ranks the tokens of the whole call: every score before any loss
        parts = []
        for _, rows in chunks:
            log_q, log_p = log_probs_of(rows)
            own = _scores(config, log_q, log_p, labels[rows])
            parts.append(own if own is not None else difficulty_(log_q, log_p, labels[rows], config.target_mix))
        every = torch.cat(parts) if parts else torch.zeros(0, device=labels.device)
        forced_hard = (REGISTRY[config.method].select(every, config) if REGISTRY[config.method].select is not None
                       else _top_k_hard(every, config.top_k))

    loss_sum, token_losses, difficulty_parts, hard_parts = 0.0, [], [], []
    for start, rows in chunks:
        targets = labels[rows]
        hard = None if forced_hard is None else forced_hard[start:start + targets.numel()]
        if fast is not None:
            log_q, log_p = log_probs_of(rows, into_buffer=True)
            terms = fast(config, log_q, log_p, targets, hard, scale)
        else:
            terms = _autograd_terms(config, student_chunk(rows), None if teacher_chunk is None else teacher_chunk(rows),
                                    targets, hard, scale)
        write_grad(rows, terms.grad_logits)
        loss_sum = loss_sum + terms.loss.sum()
        token_losses.append(terms.loss)
        difficulty_parts.append(terms.difficulty)
        hard_parts.append(terms.hard)
    _check_finite(config, token_losses, lambda i: (student_chunk(chunks[i][1]),
                                                   None if teacher_chunk is None else teacher_chunk(chunks[i][1])))

    device = labels.device
    has_difficulty = REGISTRY[config.method].target_mix
    difficulty = (torch.cat(difficulty_parts) if chunks else torch.zeros(0, device=device)) if has_difficulty else None
    hard = torch.cat(hard_parts) if chunks else torch.zeros(0, dtype=torch.bool, device=device)
    loss = torch.as_tensor(loss_sum * scale, device=device)
    return loss, _Report(counted_rows, difficulty, hard)


def _uses_fast_path(config: LossConfig) -> bool:
    return config.fast_path and REGISTRY[config.method].fast is not None


class _ChunkedLossOnLogits(torch.autograd.Function):
    """Loss from student logits; the gradient is computed in forward and stored (logits-sized)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, config, vocab, report_out):
        every_entry_written = vocab == student_logits.shape[1] and bool((labels != config.ignore_index).all())
        grad_store = (torch.empty_like if every_entry_written else torch.zeros_like)(student_logits)

        def write_grad(rows, grad):
            if not compute_in_store:  # else the gradient was built in grad_store[rows] already
                grad_store[rows, :vocab] = grad.to(grad_store.dtype)

        # When every entry is written, the store has the compute dtype (float32/64 logits) and a fast
        # path runs, log q is computed straight into the store's rows and turned into the gradient there.
        compute_in_store = every_entry_written and _uses_fast_path(config) and grad_store.dtype == torch.promote_types(
            grad_store.dtype, torch.float32)
        loss, report = _run_chunks(
            config, labels, vocab,
            lambda rows: student_logits[rows, :vocab],
            None if teacher_logits is None else (lambda rows: teacher_logits[rows, :vocab]),
            write_grad,
            (lambda rows: grad_store[rows]) if compute_in_store else None)
        report_out.append(report)
        ctx.grad_store = grad_store
        compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
        return loss.to(compute_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad_store
        if grad is None:
            raise RuntimeError("the chunked loss hands out its stored gradient once; for a second "
                               "backward through the same graph use chunk_size=0")
        ctx.grad_store = None  # scaled in place below: it must not be reused
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None


class _ChunkedLossOnHidden(torch.autograd.Function):
    """Loss from student hidden states [N, H] and lm_head weight [V, H]; logits built per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, teacher_hidden, teacher_weight, labels,
                config, vocab, report_out):
        grad_hidden = torch.zeros_like(hidden)
        # Accumulate the weight gradient over chunks in float32 (float64 stays float64).
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)

        def write_grad(rows, grad):
            hidden_rows = hidden[rows]
            grad_hidden[rows] = grad.to(hidden.dtype) @ weight            # ∂L/∂h = ∂L/∂z · W
            grad_weight.addmm_(grad.to(grad_weight.dtype).T, hidden_rows.to(grad_weight.dtype))  # += ∂L/∂zᵀ · h

        if teacher_logits is not None:
            teacher_chunk = lambda rows: teacher_logits[rows, :vocab]  # noqa: E731
        elif teacher_hidden is not None:
            teacher_chunk = lambda rows: teacher_hidden[rows] @ teacher_weight[:vocab].T  # noqa: E731
        else:
            teacher_chunk = None
        loss, report = _run_chunks(config, labels, vocab, lambda rows: hidden[rows] @ weight.T,
                                   teacher_chunk, write_grad)
        report_out.append(report)
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss.to(torch.promote_types(hidden.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss hands out its stored gradient once; for a second "
                               "backward through the same graph use chunk_size=0")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return (grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- public entries


def _stats(config: LossConfig, loss: torch.Tensor, report: _Report, labels_shape, token_stats: bool) -> dict:
    n = report.counted_rows.numel()
    n_hard = int(report.hard.sum())
    if REGISTRY[config.method].target_mix:
        mean_difficulty = float(report.difficulty.mean()) if n else 0.0
    else:
        mean_difficulty = math.nan
    stats = {
        "loss": float(loss.detach()),
        "tokens": float(n),
        "hard_tokens": float(n_hard),
        "hard_fraction": n_hard / n if n else 0.0,
        "mean_difficulty": mean_difficulty,
    }
    if token_stats:
        device = report.counted_rows.device
        difficulty = torch.zeros(math.prod(labels_shape), device=device)
        hard = torch.zeros(math.prod(labels_shape), dtype=torch.bool, device=device)
        if report.difficulty is not None:
            difficulty[report.counted_rows] = report.difficulty.float()
        else:
            difficulty[report.counted_rows] = math.nan
        hard[report.counted_rows] = report.hard
        stats["token_difficulty"] = difficulty.view(labels_shape)
        stats["token_hard"] = hard.view(labels_shape)
    return stats


def _flat_labels(labels: torch.Tensor, leading_shape, what: str) -> torch.Tensor:
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but {what} has leading shape "
                         f"{tuple(leading_shape)}; they must be aligned (labels[i] is the target of row i)")
    return labels.reshape(-1)


def compute_loss(method, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                 labels: torch.Tensor, *, token_stats: bool = False, **settings):
    """Loss of `method` (one of METHODS) over the counted positions, and its stats.

    `method` is a LossConfig (train_kd.py builds one from its arguments), or a method name with its
    settings as keywords: the LossConfig fields (kd_ratio=..., gamma=..., chunk_size=..., ...).

    student_logits / teacher_logits: [..., V] (teacher may be None for "sft" only; a teacher
    vocabulary that differs by padding rows is cut to the shared size, see shared_vocab_size);
    labels: [...], aligned with the logits, ignore_index where nothing counts.
    chunk_size: tokens per chunk of the memory-lean path (None: automatic, see CHUNK_ELEMENTS);
    0 = plain autograd.
    reduction: "mean" over counted tokens (0 with zero gradient when there are none) or "sum".
    Returns (loss, stats): stats has python floats loss, tokens, hard_tokens, hard_fraction,
    mean_difficulty (NaN for methods without ỹ); token_stats=True adds detached tensors
    token_difficulty and token_hard shaped like labels (0 / False at ignored positions, NaN
    difficulty at counted positions for methods without ỹ).
    """
    config = config_of(method, settings)
    method, ignore_index, chunk_size = config.method, config.ignore_index, config.chunk_size
    if not torch.is_tensor(student_logits) or not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise ValueError("student_logits must be a floating-point tensor [..., V]")
    vocab = student_logits.shape[-1]
    if REGISTRY[method].needs_teacher:
        if teacher_logits is None:
            raise ValueError(f"method {method!r} needs teacher_logits (only 'sft' runs without a teacher)")
        if not torch.is_tensor(teacher_logits) or not teacher_logits.is_floating_point():
            raise ValueError("teacher_logits must be a floating-point tensor [..., V]")
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} must have the same leading shape")
        vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1])
    else:
        teacher_logits = None  # a method without a teacher (sft) ignores one that is passed
    flat_labels = _flat_labels(labels, student_logits.shape[:-1], "student_logits")
    _check_labels(flat_labels, vocab, ignore_index)
    student_2d = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_2d = None if teacher_logits is None else teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])

    if chunk_size == 0:
        loss, report = _plain_loss(config, student_2d, teacher_2d, flat_labels, vocab)
    else:
        report_out = []
        loss = _ChunkedLossOnLogits.apply(student_2d, teacher_2d, flat_labels, config, vocab, report_out)
        report = report_out[0]
    return loss, _stats(config, loss, report, labels.shape, token_stats)


def compute_loss_from_hidden(method, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             labels: torch.Tensor, *, teacher_logits: Optional[torch.Tensor] = None,
                             teacher_hidden: Optional[torch.Tensor] = None,
                             teacher_weight: Optional[torch.Tensor] = None, token_stats: bool = False,
                             **settings):
    """Same loss as compute_loss(method, student_hidden @ student_weight.T, teacher, labels, ...).

    student_hidden: [..., H], the student's final hidden states (after the final norm) at the
    positions that labels describe; student_weight: the lm_head weight [V, H] (no bias: an lm_head
    with a bias must go through compute_loss). The teacher comes as teacher_logits [..., V'] or as
    teacher_hidden [..., Ht] + teacher_weight [V', Ht]. Weights/logits whose vocabularies differ by
    padding rows are cut to the shared size (the cut student rows get zero gradient).
    Unless chunk_size == 0, the full [N, V] student logits are never built.
    """
    config = config_of(method, settings)
    method, ignore_index, chunk_size = config.method, config.ignore_index, config.chunk_size
    if student_hidden.dim() < 1 or student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_hidden [..., H] and student_weight [V, H] do not fit: "
                         f"{tuple(student_hidden.shape)} vs {tuple(student_weight.shape)}")
    if student_hidden.dtype != student_weight.dtype:
        raise ValueError(f"student_hidden ({student_hidden.dtype}) and student_weight "
                         f"({student_weight.dtype}) must have the same dtype")
    leading = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    if not REGISTRY[method].needs_teacher:
        teacher_logits = teacher_hidden = teacher_weight = None
    else:
        if (teacher_logits is None) == (teacher_hidden is None):
            raise ValueError(f"method {method!r} needs the teacher as teacher_logits or as "
                             "teacher_hidden + teacher_weight (exactly one of the two)")
        if teacher_logits is not None:
            if teacher_weight is not None:
                raise ValueError("teacher_weight goes with teacher_hidden, not with teacher_logits")
            if teacher_logits.shape[:-1] != leading:
                raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must have the leading shape "
                                 f"{tuple(leading)} of student_hidden")
            teacher_vocab = teacher_logits.shape[-1]
            teacher_logits = teacher_logits.detach().reshape(-1, teacher_vocab)
        else:
            if teacher_weight is None or teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
                raise ValueError("teacher_hidden [..., Ht] needs teacher_weight [V', Ht]")
            if teacher_hidden.shape[:-1] != leading:
                raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have the leading shape "
                                 f"{tuple(leading)} of student_hidden")
            teacher_vocab = teacher_weight.shape[0]
            teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
            teacher_weight = teacher_weight.detach()
        vocab = shared_vocab_size(student_weight.shape[0], teacher_vocab)
    flat_labels = _flat_labels(labels, leading, "student_hidden")
    _check_labels(flat_labels, vocab, ignore_index)
    hidden_2d = student_hidden.reshape(-1, student_hidden.shape[-1])
    weight = student_weight[:vocab]  # autograd gives the cut rows zero gradient

    if chunk_size == 0:
        student_logits = hidden_2d @ weight.T
        if teacher_hidden is not None:
            teacher_logits = teacher_hidden @ teacher_weight[:vocab].T
        loss, report = _plain_loss(config, student_logits, teacher_logits, flat_labels, vocab)
    else:
        report_out = []
        loss = _ChunkedLossOnHidden.apply(hidden_2d, weight, teacher_logits, teacher_hidden, teacher_weight,
                                          flat_labels, config, vocab, report_out)
        report = report_out[0]
    return loss, _stats(config, loss, report, labels.shape, token_stats)
