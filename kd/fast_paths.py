"""Hand-derived gradients: the optional fast path of the methods that have one (kd/methods.py).

A method's entry in kd/methods.py is its per-token formula; the memory-lean paths of kd/losses.py
take a chunk's gradient by autograd of that formula. For today's methods the derivative is also
written out here, in place and without autograd: it saves the autograd graph of a chunk (a few
[chunk, V] buffers) and about a third of the time (bench/bench_losses.py, "autograd" rows).
tests/test_losses.py checks every function here against autograd of its entry's formula
(float64, 1e-6 relative), so the two cannot drift apart.

Every loss here is ce_weight·(−log q_t) plus a divergence whose derivative w.r.t. log q is −r for
a nonnegative "pull" r (p for KL(p‖q), ỹ for KL(ỹ‖q), ỹ·βq/q̂ for KL(ỹ‖q̂), ...); with
g = ∂L/∂log q = −r − ce_weight·y the gradient w.r.t. the logits is
∂L/∂z = g − q·Σ_v g_v = q·(Σr + ce_weight) − r − ce_weight·y.

Each function takes (config, log_q, log_p, targets, hard, scale): the chunk's student and teacher
log-probabilities [n, V] (both are overwritten: they are scratch space here), the reference tokens
[n], selfevo's hard set when it was made outside (top-K over the whole call; None: select here by
d > Γ), and the factor the gradient is multiplied by. It returns FastTerms(loss [n], d [n] or
None, hard [n], scale·∂loss/∂z [n, V]).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class FastTerms(NamedTuple):
    loss: torch.Tensor                   # [n] per-token loss
    difficulty: Optional[torch.Tensor]   # [n] d = KL(ỹ‖q), methods with ỹ only
    hard: torch.Tensor                   # [n] bool, took the skewed branch
    grad_logits: torch.Tensor            # [n, V] scale·∂loss/∂z


# ----------------------------------------------------------------------------- in-place pieces


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v·b_v per row, as a batched dot product (no [n, V] temporary)."""
    return torch.einsum("nv,nv->n", a, b)


def finite_floor_(log_x: torch.Tensor) -> torch.Tensor:
    """Replace −inf by the lowest finite number, in place: exp() still gives exactly 0, and the
    terms 0·log x of a sum become 0 instead of NaN, so no mask is needed."""
    return log_x.clamp_(min=torch.finfo(log_x.dtype).min)


def log_target_mix_(log_p: torch.Tensor, targets: torch.Tensor, target_mix: float) -> torch.Tensor:
    """log ỹ for ỹ = (1−α)·y + α·p (Eq. 4), exact in log space; overwrites log_p (no gradient).

    Off the target, log ỹ_v = log α + log p_v; at the target, logaddexp(log(1−α), log α + log p_t).
    """
    log_mix = log_p.add_(_log(target_mix))
    at_target = log_mix.gather(1, targets[:, None])
    return log_mix.scatter_(1, targets[:, None],
                            torch.logaddexp(at_target, torch.full_like(at_target, _log(1 - target_mix))))


def difficulty_(log_q: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor, target_mix: float) -> torch.Tensor:
    """d = KL(ỹ‖q) per token (Eq. 5), no gradient; overwrites log_p."""
    log_y = finite_floor_(log_target_mix_(log_p, targets, target_mix))
    y_mix = log_y.exp()
    return row_dot(y_mix, log_y) - row_dot(y_mix, log_q)


def _cross_entropy(log_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -log_q.gather(1, targets[:, None]).squeeze(1)


def _no_hard(log_q: torch.Tensor) -> torch.Tensor:
    return torch.zeros(log_q.shape[0], dtype=torch.bool, device=log_q.device)


def _grad_logits(log_q: torch.Tensor, targets: torch.Tensor, pull: Optional[torch.Tensor], ce_weight: float,
                 scale: float) -> torch.Tensor:
    """scale·(q·(Σr + w) − r − w·y), built in log q's memory (log q is not needed any more)."""
    total_pull = ce_weight if pull is None else pull.sum(1, keepdim=True).add_(ce_weight)
    grad = log_q.exp_().mul_(total_pull * scale)
    if pull is not None:
        grad.sub_(pull, alpha=scale)
    if ce_weight:
        grad.scatter_add_(1, targets[:, None], torch.full_like(grad[:, :1], -ce_weight * scale))
    return grad


# ----------------------------------------------------------------------------- one function per method


def sft(config, log_q, log_p, targets, hard, scale):
    """−log q_t: r = 0, ∂/∂z = q − y."""
    cross_entropy = _cross_entropy(log_q, targets)
    return FastTerms(cross_entropy, None, _no_hard(log_q), _grad_logits(log_q, targets, None, 1.0, scale))


def forward(config, log_q, log_p, targets, hard, scale):
    """KL(p‖q) = Σ p log p − Σ p log q;  r = p."""
    lam = config.kd_ratio
    cross_entropy = _cross_entropy(log_q, targets)
    p = log_p.exp()
    forward_kl = row_dot(p, finite_floor_(log_p)) - row_dot(p, log_q)
    loss = (1 - lam) * cross_entropy + lam * forward_kl
    return FastTerms(loss, None, _no_hard(log_q), _grad_logits(log_q, targets, p.mul_(lam), 1 - lam, scale))


def reverse(config, log_q, log_p, targets, hard, scale):
    """KL(q‖p) = Σ_{p>0} q (log q − log p);  r_v = −q_v (log q_v − log p_v + 1)."""
    lam = config.kd_ratio
    cross_entropy = _cross_entropy(log_q, targets)
    outside = log_p == -math.inf
    q = log_q.exp()
    log_ratio = torch.sub(log_q, log_p).masked_fill_(outside, 0.0)
    reverse_kl = row_dot(q, log_ratio)
    pull = log_ratio.add_(1.0).mul_(q).masked_fill_(outside, 0.0).mul_(-lam)
    loss = (1 - lam) * cross_entropy + lam * reverse_kl
    return FastTerms(loss, None, _no_hard(log_q), _grad_logits(log_q, targets, pull, 1 - lam, scale))


def skew_teacher(config, log_q, log_p, targets, hard, scale):
    """KL(p‖m), m = β'q + (1−β')p;  r_v = p_v·β'q_v/m_v."""
    lam = config.kd_ratio
    cross_entropy = _cross_entropy(log_q, targets)
    p = log_p.exp()
    p_log_p = row_dot(p, finite_floor_(log_p))
    student_part = log_q + _log(config.skew_beta)                       # log β'q
    log_m = torch.logaddexp(student_part, log_p.add_(_log(1 - config.skew_beta)), out=log_p)
    skew_kl = p_log_p - row_dot(p, log_m)
    pull = student_part.sub_(log_m).exp_().mul_(p).mul_(lam)            # λ·p·β'q/m
    loss = (1 - lam) * cross_entropy + lam * skew_kl
    return FastTerms(loss, None, _no_hard(log_q), _grad_logits(log_q, targets, pull, 1 - lam, scale))


def jsd(config, log_q, log_p, targets, hard, scale):
    """B·KL(p‖M) + (1−B)·KL(q‖M); ∂/∂q_v = (1−B)(log q_v − log M_v): r_v = −(1−B)·q_v·(that).
    At B = 0 / 1 the forward / reverse KL (their limits)."""
    b, lam = config.jsd_beta, config.kd_ratio
    if b == 0.0:
        return forward(config, log_q, log_p, targets, hard, scale)
    if b == 1.0:
        return reverse(config, log_q, log_p, targets, hard, scale)
    cross_entropy = _cross_entropy(log_q, targets)
    p = log_p.exp()
    p_log_p = row_dot(p, finite_floor_(log_p))
    log_m = torch.logaddexp(log_p.add_(_log(b)), log_q + _log(1 - b), out=log_p)  # log M
    q = log_q.exp()
    log_ratio = torch.sub(log_q, log_m)                                               # log q − log M
    divergence = b * (p_log_p - row_dot(p, log_m)) + (1 - b) * row_dot(q, log_ratio)
    pull = log_ratio.mul_(q).mul_(-(1 - b) * lam)
    loss = (1 - lam) * cross_entropy + lam * divergence
    return FastTerms(loss, None, _no_hard(log_q), _grad_logits(log_q, targets, pull, 1 - lam, scale))


def _target_mix_methods(config, log_q, log_p, targets, hard, scale, method):
    """noevo, skew, selfevo, selfevo_token. KL(ỹ‖q) = Σ ỹ log ỹ − Σ ỹ log q;  r = ỹ."""
    log_y = finite_floor_(log_target_mix_(log_p, targets, config.target_mix))
    y_mix = log_y.exp()
    y_log_y = row_dot(y_mix, log_y)
    kl_to_student = y_log_y - row_dot(y_mix, log_q)
    difficulty = kl_to_student
    no_hard = _no_hard(log_q)

    def skewed(rows):
        """KL(ỹ‖q̂), q̂ = βq + (1−β)ỹ, and its pull ỹ·βq/q̂ on the rows (all when None); overwrites log_y."""
        lq, ly, ym = (log_q, log_y, y_mix) if rows is None else (log_q[rows], log_y[rows], y_mix[rows])
        student_part = lq + _log(config.beta)                                 # log βq
        log_q_hat = torch.logaddexp(student_part, ly.add_(_log(1 - config.beta)), out=ly)
        loss_rows = (y_log_y if rows is None else y_log_y[rows]) - row_dot(ym, log_q_hat)
        return loss_rows, student_part.sub_(log_q_hat).exp_().mul_(ym)

    if method == "noevo":
        return FastTerms(kl_to_student, difficulty, no_hard, _grad_logits(log_q, targets, y_mix, 0.0, scale))
    if method == "skew":
        loss, pull = skewed(None)
        return FastTerms(loss, difficulty, torch.ones_like(no_hard), _grad_logits(log_q, targets, pull, 0.0, scale))
    if hard is None:  # selfevo, selfevo_token: Eq. 8
        hard = difficulty > config.gamma
    hard_rows = hard.nonzero().squeeze(1)
    loss, pull = kl_to_student, y_mix  # easy rows: KL(ỹ‖q), r = ỹ
    if hard_rows.numel() and method == "selfevo_token":
        # KL(m‖q) = Σ m log m − Σ m log q with m = βq + (1−β)ỹ held fixed: r = m (on copies of the rows)
        lq = log_q[hard_rows]
        log_m = finite_floor_(torch.logaddexp(lq + _log(config.beta), log_y[hard_rows] + _log(1 - config.beta)))
        m = log_m.exp()
        loss = kl_to_student.index_put((hard_rows,), row_dot(m, log_m) - row_dot(m, lq))
        pull[hard_rows] = m
    elif hard_rows.numel():
        hard_loss, hard_pull = skewed(hard_rows)  # works on copies of the hard rows
        loss = kl_to_student.index_put((hard_rows,), hard_loss)
        pull[hard_rows] = hard_pull
    return FastTerms(loss, difficulty, hard, _grad_logits(log_q, targets, pull, 0.0, scale))


def noevo(config, log_q, log_p, targets, hard, scale):
    """KL(ỹ‖q): r = ỹ."""
    return _target_mix_methods(config, log_q, log_p, targets, hard, scale, "noevo")


def skew(config, log_q, log_p, targets, hard, scale):
    """KL(ỹ‖q̂) on every token: r = ỹ·βq/q̂."""
    return _target_mix_methods(config, log_q, log_p, targets, hard, scale, "skew")


def selfevo(config, log_q, log_p, targets, hard, scale):
    """Hard tokens KL(ỹ‖q̂) (r = ỹ·βq/q̂), easy ones KL(ỹ‖q) (r = ỹ)."""
    return _target_mix_methods(config, log_q, log_p, targets, hard, scale, "selfevo")


def selfevo_token(config, log_q, log_p, targets, hard, scale):
    """Hard tokens KL(sg(q̂)‖q) (r = q̂ held fixed), easy ones KL(ỹ‖q) (r = ỹ)."""
    return _target_mix_methods(config, log_q, log_p, targets, hard, scale, "selfevo_token")
