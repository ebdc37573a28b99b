"""Every distillation loss of the paper, exact, numerically stable and memory-lean.

Notation for one counted target position (label != ignore_index; prompt positions never count):
z = student logits, q = softmax(z), p = softmax(teacher logits), t = the reference token,
y = one-hot(t), KL(a‖b) = Σ_v a_v (log a_v − log b_v), a true divergence (entropy included, so d
below is on the scale of the paper's Γ = 0.4). λ = `kd_ratio`, α = `target_mix`, β = `beta`,
β' = `skew_beta`, Γ = `gamma`, B = `jsd_beta`.

| method         | per-token loss                                            | paper      |
|----------------|-----------------------------------------------------------|------------|
| `sft`          | −log q_t                                                  | Eq. 2      |
| `forward`      | (1−λ)(−log q_t) + λ KL(p‖q)                               | Eq. 3      |
| `reverse`      | (1−λ)(−log q_t) + λ KL(q‖p)                               | Sec. 4.3   |
| `noevo`        | KL(ỹ‖q),  ỹ = (1−α) y + α p                               | Eq. 4      |
| `skew`         | KL(ỹ‖q̂),  q̂ = β q + (1−β) ỹ   (every token)               | Eq. 6-7    |
| `selfevo`      | d = KL(ỹ‖q) (no gradient); KL(ỹ‖q̂) if d > Γ else KL(ỹ‖q)  | Eq. 5, 7-9 |
| `selfevo`+top_k| the round(top_k·N) tokens of largest d in the call are hard | Sec. 5.2.1 |
| `skew_teacher` | (1−λ)(−log q_t) + λ KL(p‖β' q + (1−β') p)                 | Eq. 10     |
| `selfevo_token`| as selfevo, but hard tokens: KL(sg(q̂)‖q), q̂ = βq + (1−β)ỹ  | NOT the paper |
| `jsd`          | (1−λ)(−log q_t) + λ JSD_B(p‖q)                            | GKD (beyond) |
| stored teacher | every row with p → p̃: p̃_v = p_v for the K stored v, and    | (cache)    |
|  (any method)  | p̃_v = (1 − Σ_K p)/(V − K) for the other V − K tokens       |            |

`jsd` is the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), as TRL's GKD
trainer computes it: with M = B·p + (1−B)·q, JSD_B(p‖q) = B·KL(p‖M) + (1−B)·KL(q‖M) for 0 < B < 1,
and at the ends the divergences it interpolates between: B = 0 is the forward KL(p‖q) (the limit of
JSD_B/B), B = 1 the reverse KL(q‖p) (the limit of JSD_B/(1−B)), so jsd at B = 0 / 1 equals
`forward` / `reverse`. Its derivative w.r.t. q_v is (1−B)(log q_v − log M_v) (the terms from M
cancel), and M > 0 wherever q > 0, so masked teacher entries need no special case for 0 < B < 1.
With λ = 1 (`--kd-ratio 1`) it is GKD's loss without the cross-entropy term.

A stored teacher (train_kd.py --teacher-cache, kd/teacher_cache.py) is passed as teacher_logits =
log p̃. log-softmax leaves log-probabilities as they are, so every formula here runs unchanged on p̃
(a distribution with every p̃_v > 0: every KL stays finite); with the full distribution stored
(`--top-k all`) p̃ = p and the loss is the live teacher's (tests/test_teacher_cache.py).

`selfevo_token` is NOT the paper's Eq. 7. It is the token-level self-evolution target of the work
the paper builds on (hard tokens learn toward the detached mixture, as a soft label), kept as a
clearly labelled reading to compare against. Its gradient is worth knowing: with m = sg(q̂),
∂KL(m‖q)/∂z = q − m = (1−β)·(q − ỹ), i.e. noevo's gradient scaled by (1−β) on the hard tokens,
uniformly over the vocabulary; the paper's KL(ỹ‖q̂) instead pulls each v with ỹ_v·βq_v/q̂_v, and
where q_v ≪ ỹ_v (q̂_v ≈ (1−β)ỹ_v) that is ≈ βq_v/(1−β): almost nothing where the token is hardest.

In code: `_token_losses` writes each row of this table as it stands (autograd differentiates);
`_token_losses_and_grads` computes the same values together with their derivatives, written out
next to each loss; ỹ is `_log_target_mix_`, the selection `_select_hard` / `_top_k_hard`.

The loss of a call is the mean over its counted tokens (Eq. 9 divides by N, easy and hard tokens
together), or their sum with reduction="sum" (train_kd.py divides that by the token count of the
whole effective batch, so gradient accumulation over micro-batches and processes is exact).

Conventions worth knowing:
- The teacher and ỹ get no gradient; the student gets gradient through q everywhere, including
  inside q̂ and inside β' q + (1−β') p. The hard/easy choice is a gradient-free decision re-made at
  every call.
- Everything is computed in log space (log ỹ and log q̂ are log-sum-exps of log-probabilities), in
  float32 for bf16/fp16 inputs (float64 inputs stay float64).
- Masked vocabulary (teacher logit −inf, so p_v = 0): terms with p_v = 0 contribute 0 to every
  divergence. For KL(p‖q) and KL(ỹ‖q) that is the exact value; for the reverse KL(q‖p), whose
  true value would be +inf, it means the sum runs over the teacher's support only. Every teacher
  row needs at least one finite logit; student logits must be finite.
- `hard_fraction` is 1.0 for `skew`, the selected share for `selfevo` and `selfevo_token`, 0.0 for
  everything else.
  `mean_difficulty` is the mean of d = KL(ỹ‖q) for the methods that build ỹ (noevo, skew,
  selfevo) and NaN for the others (no ỹ exists there); with no counted token it is 0.0.
- top_k selects within one call: with gradient accumulation it is per micro-batch.
- The caller shifts: labels[i] is the target of logits[i]. Shift the labels (not the logits) so the
  logits stay one contiguous tensor: `labels = F.pad(labels[:, 1:], (0, 1), value=-100)`.

Three entries with identical values (tests/test_losses.py checks them against each other and
against an independent float64 reference):
- `compute_loss(..., chunk_size=0)`: the plain autograd form, for reading. Autograd keeps several
  float32 [N, V] tensors alive (the "naive" baseline of bench/bench_losses.py).
- `compute_loss(...)` (default chunk_size): a torch.autograd.Function that, chunk by chunk over the
  counted tokens, computes the loss AND its gradient w.r.t. the student logits inside forward (as
  Liger-Kernel's chunked losses do) and stores only that gradient; extra memory is the gradient
  plus a few [chunk, V] buffers. Every loss is ce_weight·(−log q_t) plus a divergence whose
  derivative w.r.t. log q is −r ("pull": p, ỹ, ỹ·βq/q̂, p·β'q/m, ...), so
  ∂L/∂z = q·(Σ_v r_v + ce_weight) − r − ce_weight·y (`_token_losses_and_grads`).
- `compute_loss_from_hidden(...)`: the same from the student's final hidden states and lm_head
  weight; per chunk it builds the logits, the loss, the gradient w.r.t. the chunk's hidden states
  and accumulates the weight gradient, so the full [N, V] student logits never exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

METHODS = ("sft", "forward", "reverse", "noevo", "skew", "selfevo", "skew_teacher", "selfevo_token", "jsd")
KD_METHODS = tuple(m for m in METHODS if m != "sft")
# Methods that build the target mixture ỹ and therefore report the difficulty d = KL(ỹ‖q).
TARGET_MIX_METHODS = ("noevo", "skew", "selfevo", "selfevo_token")
# Methods that split the tokens into hard and easy ones by d (Γ or top-K).
SELECTING_METHODS = ("selfevo", "selfevo_token")
# chunk_size=None (the default) picks the tokens per chunk of the lean path from the vocabulary:
# as many as fit CHUNK_ELEMENTS logits, so the ~8 float32 [chunk, V] buffers of a chunk stay small.
# On CPU 2**22 elements (16 MiB per buffer) stays under glibc's mmap threshold (32 MiB), so the
# buffers are reused instead of being page-faulted in anew for every chunk (2-3x faster here).
# On CUDA the caching allocator reuses memory anyway and larger chunks mean fewer kernel launches.
DEFAULT_CHUNK_SIZE = None
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}
REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LossConfig:
    method: str
    kd_ratio: float = 0.5
    target_mix: float = 0.5
    beta: float = 0.5
    gamma: float = 0.4
    top_k: Optional[float] = None
    skew_beta: float = 0.9
    ignore_index: int = -100
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE
    reduction: str = "mean"
    jsd_beta: float = 0.5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        for name in ("kd_ratio", "target_mix", "beta", "skew_beta", "jsd_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or math.isnan(self.gamma):
            raise ValueError(f"gamma must be a number, got {self.gamma!r}")
        if self.top_k is not None:
            if self.method not in SELECTING_METHODS:
                raise ValueError(f"top_k selects hard tokens for {' and '.join(SELECTING_METHODS)} only, "
                                 f"not for {self.method!r}")
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)) or not 0.0 < self.top_k <= 1.0:
                raise ValueError(f"top_k is a fraction of the tokens in (0, 1], got {self.top_k!r}")
        if self.chunk_size is not None and (
                isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0):
            raise ValueError(f"chunk_size must be None (automatic), 0 (plain autograd) or a number of tokens > 0, "
                             f"got {self.chunk_size!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


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


# ----------------------------------------------------------------------------- shared pieces


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _log_probs(logits: torch.Tensor, out: Optional[torch.Tensor] = None,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log-softmax in float32 (float64 stays float64), into `out` when given; the teacher's
    log-probabilities take the dtype of the student's (`like`)."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32) if like is None else like.dtype
    if out is None:
        return torch.log_softmax(logits.to(compute_dtype), dim=-1)
    return torch.log_softmax(logits.to(compute_dtype), dim=-1, out=out)


def _log_target_mix_(log_p: torch.Tensor, targets: torch.Tensor, target_mix: float) -> torch.Tensor:
    """log ỹ for ỹ = (1−α)·y + α·p (Eq. 4), exact in log space; overwrites log_p (no gradient).

    Off the target, log ỹ_v = log α + log p_v; at the target, logaddexp(log(1−α), log α + log p_t).
    """
    log_mix = log_p.add_(_log(target_mix))
    at_target = log_mix.gather(1, targets[:, None])
    return log_mix.scatter_(1, targets[:, None],
                            torch.logaddexp(at_target, torch.full_like(at_target, _log(1 - target_mix))))


def _top_k_hard(difficulty: torch.Tensor, top_k: float) -> torch.Tensor:
    """The round(top_k·N) tokens of largest d are hard (Python's round: ties go to even)."""
    n_hard = int(round(top_k * difficulty.numel()))
    hard = torch.zeros(difficulty.shape, dtype=torch.bool, device=difficulty.device)
    hard[torch.topk(difficulty, n_hard).indices] = True
    return hard


def _select_hard(config: LossConfig, difficulty: torch.Tensor) -> torch.Tensor:
    """The gradient-free hard/easy decision of selfevo (Eq. 8): d > Γ, or top-K by d."""
    if config.top_k is not None:
        return _top_k_hard(difficulty, config.top_k)
    return difficulty > config.gamma


def _effective_method(config: LossConfig) -> str:
    """The formula that computes config.method: jsd at B = 0 / 1 is forward / reverse (see above)."""
    if config.method == "jsd" and config.jsd_beta in (0.0, 1.0):
        return "forward" if config.jsd_beta == 0.0 else "reverse"
    return config.method


@dataclass
class _TokenTerms:
    loss: torch.Tensor                   # [n] per-token loss
    difficulty: Optional[torch.Tensor]   # [n] d = KL(ỹ‖q), methods with ỹ only
    hard: torch.Tensor                   # [n] bool, took the skewed branch
    grad_logits: Optional[torch.Tensor] = None  # [n, V] ∂loss/∂z (lean form only)


# ----------------------------------------------------------------------------- the formulas (autograd)


def _log_mixture(weight_on_a: float, log_a: torch.Tensor, log_b: torch.Tensor,
                 support_b: torch.Tensor) -> torch.Tensor:
    """log(w·a + (1−w)·b) = logaddexp(log w + log a, log(1−w) + log b).

    Only read where b > 0 (support_b); elsewhere a finite stand-in for log b keeps autograd free
    of NaN (logaddexp(−inf, −inf) has a NaN derivative, which would reach the student when w = 0).
    """
    log_b_weighted = torch.where(support_b, log_b + _log(1 - weight_on_a), torch.zeros_like(log_b))
    return torch.logaddexp(log_a + _log(weight_on_a), log_b_weighted)


def _kl_sum(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, support_a: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v (log a_v − log b_v) per row; terms with a_v = 0 are exactly 0 (never 0·inf = NaN)."""
    return torch.where(support_a, a * (log_a - log_b), torch.zeros_like(log_b)).sum(-1)


def _token_losses(config: LossConfig, log_q: torch.Tensor, log_p: Optional[torch.Tensor],
                  targets: torch.Tensor) -> _TokenTerms:
    """Per-token loss of `config.method`, written as in the table above; autograd differentiates.

    log_q [n, V] carries the student's gradient; log_p [n, V] is the teacher's (no gradient).
    """
    method, lam = _effective_method(config), config.kd_ratio
    no_hard = torch.zeros(log_q.shape[0], dtype=torch.bool, device=log_q.device)
    cross_entropy = -log_q.gather(1, targets[:, None]).squeeze(1)
    if method == "sft":
        return _TokenTerms(cross_entropy, None, no_hard)

    teacher_support = log_p > -math.inf  # p_v > 0; masked vocabulary is outside
    if method == "forward":
        forward_kl = _kl_sum(log_p.exp(), log_p, log_q, teacher_support)
        return _TokenTerms((1 - lam) * cross_entropy + lam * forward_kl, None, no_hard)
    if method == "reverse":
        log_p_finite = torch.where(teacher_support, log_p, torch.zeros_like(log_p))
        reverse_kl = _kl_sum(log_q.exp(), log_q, log_p_finite, teacher_support)
        return _TokenTerms((1 - lam) * cross_entropy + lam * reverse_kl, None, no_hard)
    if method == "skew_teacher":
        log_m = _log_mixture(config.skew_beta, log_q, log_p, teacher_support)  # m = β'q + (1−β')p
        skew_kl = _kl_sum(log_p.exp(), log_p, log_m, teacher_support)
        return _TokenTerms((1 - lam) * cross_entropy + lam * skew_kl, None, no_hard)
    if method == "jsd":  # 0 < B < 1: B·KL(p‖M) + (1−B)·KL(q‖M), M = B·p + (1−B)·q
        b = config.jsd_beta
        log_m = torch.logaddexp(log_p + _log(b), log_q + _log(1 - b))
        jsd = (b * _kl_sum(log_p.exp(), log_p, log_m, teacher_support)
               + (1 - b) * (log_q.exp() * (log_q - log_m)).sum(-1))
        return _TokenTerms((1 - lam) * cross_entropy + lam * jsd, None, no_hard)

    # noevo, skew, selfevo: the target mixture ỹ (no gradient) and the difficulty d = KL(ỹ‖q).
    log_y = _log_target_mix_(log_p, targets, config.target_mix)
    y_mix, y_support = log_y.exp(), log_y > -math.inf
    kl_to_student = _kl_sum(y_mix, log_y, log_q, y_support)  # KL(ỹ‖q): Eq. 4, selfevo's easy branch
    difficulty = kl_to_student.detach()

    def skewed(rows):  # KL(ỹ‖q̂), q̂ = β·q + (1−β)·ỹ (Eq. 6-7), on the given rows
        log_q_hat = _log_mixture(config.beta, log_q[rows], log_y[rows], y_support[rows])
        return _kl_sum(y_mix[rows], log_y[rows], log_q_hat, y_support[rows])

    if method == "noevo":
        return _TokenTerms(kl_to_student, difficulty, no_hard)
    if method == "skew":
        return _TokenTerms(skewed(slice(None)), difficulty, torch.ones_like(no_hard))
    hard = _select_hard(config, difficulty)  # selfevo, Eq. 8-9
    hard_rows = hard.nonzero().squeeze(1)
    if method == "selfevo_token":  # hard rows: KL(m‖q) with m = sg(β·q + (1−β)·ỹ), a soft label
        log_m = torch.logaddexp(log_q[hard_rows].detach() + _log(config.beta),
                                log_y[hard_rows] + _log(1 - config.beta))
        hard_loss = _kl_sum(log_m.exp(), log_m, log_q[hard_rows], log_m > -math.inf)
        return _TokenTerms(kl_to_student.index_put((hard_rows,), hard_loss), difficulty, hard)
    loss = kl_to_student.index_put((hard_rows,), skewed(hard_rows))
    return _TokenTerms(loss, difficulty, hard)


# ----------------------------------------------------------------------------- the formulas (lean)
# The same losses with their derivatives written out, for the chunked path (no autograd, in place).
# With g = ∂L/∂log q, the gradient w.r.t. the logits is ∂L/∂z_u = g_u − q_u·Σ_v g_v.


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v·b_v per row, as a batched dot product (no [n, V] temporary)."""
    return torch.einsum("nv,nv->n", a, b)


def _finite_floor_(log_x: torch.Tensor) -> torch.Tensor:
    """Replace −inf by the lowest finite number, in place: exp() still gives exactly 0, and the
    terms 0·log x of a sum become 0 instead of NaN, so no mask is needed."""
    return log_x.clamp_(min=torch.finfo(log_x.dtype).min)


def _difficulty(log_q: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor, target_mix: float):
    """d = KL(ỹ‖q) per token (Eq. 5), no gradient; overwrites log_p (for selfevo's top-K pass)."""
    log_y = _finite_floor_(_log_target_mix_(log_p, targets, target_mix))
    y_mix = log_y.exp()
    return _row_dot(y_mix, log_y) - _row_dot(y_mix, log_q)


def _token_losses_and_grads(config: LossConfig, log_q: torch.Tensor, log_p: Optional[torch.Tensor],
                            targets: torch.Tensor, hard: Optional[torch.Tensor], scale: float) -> _TokenTerms:
    """Per-token loss and scale·∂loss/∂z. Overwrites log_q and log_p. `hard` (optional) is selfevo's
    selection made outside (top-K over all chunks); otherwise it is made here.

    Every loss here is ce_weight·(−log q_t) + a divergence whose derivative w.r.t. log q is −r for a
    nonnegative "pull" r (p for KL(p‖q), ỹ for KL(ỹ‖q), ỹ·βq/q̂ for KL(ỹ‖q̂), ...); then
    g = −r − ce_weight·y and ∂L/∂z = q·(Σr + ce_weight) − r − ce_weight·y.
    """
    method, lam = _effective_method(config), config.kd_ratio
    target_col = targets[:, None]
    cross_entropy = -log_q.gather(1, target_col).squeeze(1)
    no_hard = torch.zeros(log_q.shape[0], dtype=torch.bool, device=log_q.device)

    def grad_logits(pull: Optional[torch.Tensor], ce_weight: float) -> torch.Tensor:
        total_pull = ce_weight if pull is None else pull.sum(1, keepdim=True).add_(ce_weight)
        grad = log_q.exp_().mul_(total_pull * scale)  # q·(Σr + w); log q is not needed any more
        if pull is not None:
            grad.sub_(pull, alpha=scale)
        if ce_weight:
            grad.scatter_add_(1, target_col, torch.full_like(grad[:, :1], -ce_weight * scale))
        return grad

    if method == "sft":  # −log q_t: r = 0, ∂/∂z = q − y
        return _TokenTerms(cross_entropy, None, no_hard, grad_logits(None, 1.0))

    if method == "forward":  # KL(p‖q) = Σ p log p − Σ p log q;  r = p
        p = log_p.exp()
        forward_kl = _row_dot(p, _finite_floor_(log_p)) - _row_dot(p, log_q)
        loss = (1 - lam) * cross_entropy + lam * forward_kl
        return _TokenTerms(loss, None, no_hard, grad_logits(p.mul_(lam), 1 - lam))

    if method == "reverse":  # KL(q‖p) = Σ_{p>0} q (log q − log p);  r_v = −q_v (log q_v − log p_v + 1)
        outside = log_p == -math.inf
        q = log_q.exp()
        log_ratio = torch.sub(log_q, log_p).masked_fill_(outside, 0.0)
        reverse_kl = _row_dot(q, log_ratio)
        pull = log_ratio.add_(1.0).mul_(q).masked_fill_(outside, 0.0).mul_(-lam)
        loss = (1 - lam) * cross_entropy + lam * reverse_kl
        return _TokenTerms(loss, None, no_hard, grad_logits(pull, 1 - lam))

    if method == "skew_teacher":  # KL(p‖m), m = β'q + (1−β')p;  r_v = p_v·β'q_v/m_v
        p = log_p.exp()
        p_log_p = _row_dot(p, _finite_floor_(log_p))
        student_part = log_q + _log(config.skew_beta)                       # log β'q
        log_m = torch.logaddexp(student_part, log_p.add_(_log(1 - config.skew_beta)), out=log_p)
        skew_kl = p_log_p - _row_dot(p, log_m)
        pull = student_part.sub_(log_m).exp_().mul_(p).mul_(lam)            # λ·p·β'q/m
        loss = (1 - lam) * cross_entropy + lam * skew_kl
        return _TokenTerms(loss, None, no_hard, grad_logits(pull, 1 - lam))

    if method == "jsd":  # B·KL(p‖M) + (1−B)·KL(q‖M); ∂/∂q_v = (1−B)(log q_v − log M_v): r_v = −(1−B)·q_v·(that)
        b = config.jsd_beta
        p = log_p.exp()
        p_log_p = _row_dot(p, _finite_floor_(log_p))
        log_m = torch.logaddexp(log_p.add_(_log(b)), log_q + _log(1 - b), out=log_p)  # log M
        q = log_q.exp()
        log_ratio = torch.sub(log_q, log_m)                                               # log q − log M
        jsd = b * (p_log_p - _row_dot(p, log_m)) + (1 - b) * _row_dot(q, log_ratio)
        pull = log_ratio.mul_(q).mul_(-(1 - b) * lam)
        loss = (1 - lam) * cross_entropy + lam * jsd
        return _TokenTerms(loss, None, no_hard, grad_logits(pull, 1 - lam))

    # noevo, skew, selfevo. KL(ỹ‖q) = Σ ỹ log ỹ − Σ ỹ log q;  r = ỹ
    log_y = _finite_floor_(_log_target_mix_(log_p, targets, config.target_mix))
    y_mix = log_y.exp()
    y_log_y = _row_dot(y_mix, log_y)
    kl_to_student = y_log_y - _row_dot(y_mix, log_q)
    difficulty = kl_to_student

    def skewed(rows):
        """KL(ỹ‖q̂), q̂ = βq + (1−β)ỹ, and its pull ỹ·βq/q̂ on the rows (all when None); overwrites log_y."""
        lq, ly, ym = (log_q, log_y, y_mix) if rows is None else (log_q[rows], log_y[rows], y_mix[rows])
        student_part = lq + _log(config.beta)                                 # log βq
        log_q_hat = torch.logaddexp(student_part, ly.add_(_log(1 - config.beta)), out=ly)
        loss_rows = (y_log_y if rows is None else y_log_y[rows]) - _row_dot(ym, log_q_hat)
        return loss_rows, student_part.sub_(log_q_hat).exp_().mul_(ym)

    if method == "noevo":
        return _TokenTerms(kl_to_student, difficulty, no_hard, grad_logits(y_mix, 0.0))
    if method == "skew":
        loss, pull = skewed(None)
        return _TokenTerms(loss, difficulty, torch.ones_like(no_hard), grad_logits(pull, 0.0))
    if hard is None:  # selfevo, selfevo_token
        hard = _select_hard(config, difficulty)
    hard_rows = hard.nonzero().squeeze(1)
    loss, pull = kl_to_student, y_mix  # easy rows: KL(ỹ‖q), r = ỹ
    if hard_rows.numel() and method == "selfevo_token":
        # KL(m‖q) = Σ m log m − Σ m log q with m = βq + (1−β)ỹ held fixed: r = m (on copies of the rows)
        lq = log_q[hard_rows]
        log_m = _finite_floor_(torch.logaddexp(lq + _log(config.beta), log_y[hard_rows] + _log(1 - config.beta)))
        m = log_m.exp()
        loss = kl_to_student.index_put((hard_rows,), _row_dot(m, log_m) - _row_dot(m, lq))
        pull[hard_rows] = m
    elif hard_rows.numel():
        hard_loss, hard_pull = skewed(hard_rows)  # works on copies of the hard rows
        loss = kl_to_student.index_put((hard_rows,), hard_loss)
        pull[hard_rows] = hard_pull
    return _TokenTerms(loss, difficulty, hard, grad_logits(pull, 0.0))


# ----------------------------------------------------------------------------- plain path


@dataclass
class _Report:
    """What the stats are built from: the counted rows and their d / hard flags."""
    counted_rows: torch.Tensor          # indices into the flattened labels
    difficulty: Optional[torch.Tensor]  # [n] or None
    hard: torch.Tensor                  # [n] bool


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
    terms = _token_losses(config, log_q, log_p, labels[counted_rows])
    loss = terms.loss.sum()
    if config.reduction == "mean" and counted_rows.numel():
        loss = loss / counted_rows.numel()
    return loss, _Report(counted_rows, terms.difficulty, terms.hard)


# ----------------------------------------------------------------------------- chunked path


def _auto_chunk_tokens(device: torch.device, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // vocab)


def _run_chunks(config: LossConfig, labels: torch.Tensor, vocab: int,
                student_chunk: Callable[[torch.Tensor], torch.Tensor],
                teacher_chunk: Optional[Callable[[torch.Tensor], torch.Tensor]],
                write_grad: Callable[[torch.Tensor, torch.Tensor], None],
                log_q_buffer: Optional[Callable[[slice], Optional[torch.Tensor]]] = None):
    """Loss and ∂loss/∂z chunk by chunk over the counted tokens (no autograd, no [N, V] buffer).

    student_chunk(rows) / teacher_chunk(rows) return the logits [len(rows), V] of those rows;
    write_grad(rows, grad) receives ∂loss/∂z for them (already divided by N for "mean").
    log_q_buffer(rows), if given, returns where to compute log q (the lean formulas turn it into
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

    def log_probs_of(rows, into_buffer=False):
        out = log_q_buffer(rows) if into_buffer and log_q_buffer is not None else None
        log_q = _log_probs(student_chunk(rows), out=out)
        return log_q, (None if teacher_chunk is None else _log_probs(teacher_chunk(rows), like=log_q))

    forced_hard = None
    if config.method in SELECTING_METHODS and config.top_k is not None:
        # top-K ranks d over the whole call, so d of every token is needed before any loss.
        difficulties = []
        for _, rows in chunks:
            log_q, log_p = log_probs_of(rows)
            difficulties.append(_difficulty(log_q, log_p, labels[rows], config.target_mix))
        forced_hard = _top_k_hard(torch.cat(difficulties) if difficulties else torch.zeros(0, device=labels.device),
                                  config.top_k)

    loss_sum, difficulty_parts, hard_parts = 0.0, [], []
    for start, rows in chunks:
        log_q, log_p = log_probs_of(rows, into_buffer=True)
        hard = None if forced_hard is None else forced_hard[start:start + log_q.shape[0]]
        terms = _token_losses_and_grads(config, log_q, log_p, labels[rows], hard, scale)
        write_grad(rows, terms.grad_logits)
        loss_sum = loss_sum + terms.loss.sum()
        difficulty_parts.append(terms.difficulty)
        hard_parts.append(terms.hard)

    device = labels.device
    has_difficulty = config.method in TARGET_MIX_METHODS
    difficulty = (torch.cat(difficulty_parts) if chunks else torch.zeros(0, device=device)) if has_difficulty else None
    hard = torch.cat(hard_parts) if chunks else torch.zeros(0, dtype=torch.bool, device=device)
    loss = torch.as_tensor(loss_sum * scale, device=device)
    return loss, _Report(counted_rows, difficulty, hard)


class _ChunkedLossOnLogits(torch.autograd.Function):
    """Loss from student logits; the gradient is computed in forward and stored (logits-sized)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, config, vocab, report_out):
        every_entry_written = vocab == student_logits.shape[1] and bool((labels != config.ignore_index).all())
        grad_store = (torch.empty_like if every_entry_written else torch.zeros_like)(student_logits)

        def write_grad(rows, grad):
            if not compute_in_store:  # else the gradient was built in grad_store[rows] already
                grad_store[rows, :vocab] = grad.to(grad_store.dtype)

        # When every entry is written and the store has the compute dtype (float32/64 logits), log q
        # is computed straight into the store's rows and turned into the gradient there.
        compute_in_store = every_entry_written and grad_store.dtype == torch.promote_types(
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
    if config.method in TARGET_MIX_METHODS:
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


def compute_loss(method: str, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                 labels: torch.Tensor, *, kd_ratio: float = 0.5, target_mix: float = 0.5,
                 beta: float = 0.5, gamma: float = 0.4, top_k: Optional[float] = None,
                 skew_beta: float = 0.9, ignore_index: int = -100,
                 chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, reduction: str = "mean",
                 token_stats: bool = False, jsd_beta: float = 0.5):
    """Loss of `method` (one of METHODS) over the counted positions, and its stats.

    `method` may also be a LossConfig (train_kd.py builds one from its arguments); then it holds
    every hyperparameter and the keyword arguments kd_ratio ... reduction, jsd_beta are not used.

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
    config = method if isinstance(method, LossConfig) else LossConfig(
        method, kd_ratio, target_mix, beta, gamma, top_k, skew_beta, ignore_index, chunk_size, reduction, jsd_beta)
    method, ignore_index, chunk_size = config.method, config.ignore_index, config.chunk_size
    if not torch.is_tensor(student_logits) or not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise ValueError("student_logits must be a floating-point tensor [..., V]")
    vocab = student_logits.shape[-1]
    if method != "sft":
        if teacher_logits is None:
            raise ValueError(f"method {method!r} needs teacher_logits (only 'sft' runs without a teacher)")
        if not torch.is_tensor(teacher_logits) or not teacher_logits.is_floating_point():
            raise ValueError("teacher_logits must be a floating-point tensor [..., V]")
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} must have the same leading shape")
        vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1])
    else:
        teacher_logits = None  # sft ignores a teacher if one is passed
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


def compute_loss_from_hidden(method: str, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             labels: torch.Tensor, *, teacher_logits: Optional[torch.Tensor] = None,
                             teacher_hidden: Optional[torch.Tensor] = None,
                             teacher_weight: Optional[torch.Tensor] = None,
                             kd_ratio: float = 0.5, target_mix: float = 0.5, beta: float = 0.5,
                             gamma: float = 0.4, top_k: Optional[float] = None, skew_beta: float = 0.9,
                             ignore_index: int = -100, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
                             reduction: str = "mean", token_stats: bool = False, jsd_beta: float = 0.5):
    """Same loss as compute_loss(method, student_hidden @ student_weight.T, teacher, labels, ...).

    student_hidden: [..., H], the student's final hidden states (after the final norm) at the
    positions that labels describe; student_weight: the lm_head weight [V, H] (no bias: an lm_head
    with a bias must go through compute_loss). The teacher comes as teacher_logits [..., V'] or as
    teacher_hidden [..., Ht] + teacher_weight [V', Ht]. Weights/logits whose vocabularies differ by
    padding rows are cut to the shared size (the cut student rows get zero gradient).
    Unless chunk_size == 0, the full [N, V] student logits are never built.
    """
    config = method if isinstance(method, LossConfig) else LossConfig(
        method, kd_ratio, target_mix, beta, gamma, top_k, skew_beta, ignore_index, chunk_size, reduction, jsd_beta)
    method, ignore_index, chunk_size = config.method, config.ignore_index, config.chunk_size
    if student_hidden.dim() < 1 or student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_hidden [..., H] and student_weight [V, H] do not fit: "
                         f"{tuple(student_hidden.shape)} vs {tuple(student_weight.shape)}")
    if student_hidden.dtype != student_weight.dtype:
        raise ValueError(f"student_hidden ({student_hidden.dtype}) and student_weight "
                         f"({student_weight.dtype}) must have the same dtype")
    leading = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    if method == "sft":
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
