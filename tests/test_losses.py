"""Tests of kd/losses.py against an independent float64 reference and hand-computed cases.

The reference below is written position by position straight from the equations of GUIDE.md
section 1 (it imports nothing from kd.losses); its gradient comes from autograd in float64.
"""

import math

import pytest
import torch

from kd.losses import (KD_METHODS, METHODS, align_vocab, compute_loss, compute_loss_from_hidden,
                       shared_vocab_size)

IGNORE = -100
NEG_INF = float("-inf")
HYPER = dict(kd_ratio=0.5, target_mix=0.5, beta=0.5, gamma=0.4, skew_beta=0.9)


# ----------------------------------------------------------------------------- float64 reference


def _log_or_neg_inf(x):
    return math.log(x) if x > 0 else NEG_INF


def ref_kl(log_a, log_b):
    """KL(a‖b) = Σ_v a_v (log a_v − log b_v) over the support of a (a_v = 0 contributes 0)."""
    support = log_a > NEG_INF
    return (log_a[support].exp() * (log_a[support] - log_b[support])).sum()


def ref_log_mix(weight, log_a, log_b):
    """log(weight·a + (1−weight)·b) as a log-sum-exp of the two weighted log-probabilities."""
    return torch.logsumexp(torch.stack([_log_or_neg_inf(weight) + log_a,
                                        _log_or_neg_inf(1 - weight) + log_b]), dim=0)


def reference(method, student, teacher, labels, *, kd_ratio=0.5, target_mix=0.5, beta=0.5,
              gamma=0.4, top_k=None, skew_beta=0.9, reduction="mean", jsd_beta=0.5, atkd_easy_weight=0.2,
              akl_mu=0.5, taid_t=0.4):
    """(loss, grad w.r.t. student, per-position d (None for methods without ỹ), hard set)."""
    student = student.detach().to(torch.float64).requires_grad_(True)
    teacher = None if teacher is None else teacher.detach().to(torch.float64)
    positions = [i for i in range(labels.shape[0]) if labels[i].item() != IGNORE]
    lam, alpha = kd_ratio, target_mix

    def parts(i):
        t = labels[i].item()
        log_q = student[i] - torch.logsumexp(student[i], 0)
        log_p = None if teacher is None else teacher[i] - torch.logsumexp(teacher[i], 0)
        log_y = torch.full_like(student[i], NEG_INF)
        log_y[t] = 0.0
        log_y_mix = None if log_p is None else ref_log_mix(1 - alpha, log_y, log_p)  # (1−α)y + αp
        return t, log_q, log_p, log_y_mix

    difficulty = {}
    selecting = method in ("selfevo", "selfevo_token")
    if method in ("noevo", "skew", "selfevo", "selfevo_token"):
        for i in positions:
            _, log_q, _, log_y_mix = parts(i)
            difficulty[i] = ref_kl(log_y_mix, log_q.detach()).item()
    if method == "skew":
        hard = set(positions)
    elif selecting and top_k is not None:
        by_difficulty = sorted(positions, key=lambda i: -difficulty[i])
        hard = set(by_difficulty[:round(top_k * len(positions))])
    elif selecting:
        hard = {i for i in positions if difficulty[i] > gamma}
    elif method == "atkd":  # hard: the teacher's uncertainty 1 − p_t at or above the lower median of the call
        uncertainty = {i: 1 - parts(i)[2][labels[i].item()].exp().item() for i in positions}
        ranked = sorted(uncertainty.values())
        hard = {i for i in positions if uncertainty[i] >= ranked[(len(ranked) - 1) // 2]} if ranked else set()
    else:
        hard = set()

    total = torch.zeros((), dtype=torch.float64)
    for i in positions:
        t, log_q, log_p, log_y_mix = parts(i)
        ce = -log_q[t]
        if method == "sft":
            loss = ce
        elif method == "forward":
            loss = (1 - lam) * ce + lam * ref_kl(log_p, log_q)
        elif method == "reverse":
            on_teacher_support = log_p > NEG_INF  # masked vocabulary contributes 0
            q = log_q.exp()
            reverse_kl = (q[on_teacher_support] * (log_q - log_p)[on_teacher_support]).sum()
            loss = (1 - lam) * ce + lam * reverse_kl
        elif method == "noevo" or (selecting and i not in hard):
            loss = ref_kl(log_y_mix, log_q)
        elif method == "selfevo_token":  # hard: KL(m‖q), m = β q + (1−β) ỹ held fixed (a soft label)
            log_m = ref_log_mix(beta, log_q.detach(), log_y_mix)
            loss = ref_kl(log_m, log_q)
        elif method in ("skew", "selfevo"):
            log_q_hat = ref_log_mix(beta, log_q, log_y_mix)  # β q + (1−β) ỹ
            loss = ref_kl(log_y_mix, log_q_hat)
        elif method == "skew_teacher":
            log_m = ref_log_mix(skew_beta, log_q, log_p)  # β' q + (1−β') p
            loss = (1 - lam) * ce + lam * ref_kl(log_p, log_m)
        elif method == "jsd":  # GKD: B=0 forward KL(p‖q), B=1 reverse KL(q‖p) (teacher's support), else
            if jsd_beta == 0:  # B·KL(p‖M) + (1−B)·KL(q‖M) with M = B p + (1−B) q
                divergence = ref_kl(log_p, log_q)
            elif jsd_beta == 1:
                on_teacher_support = log_p > NEG_INF
                divergence = (log_q.exp()[on_teacher_support] * (log_q - log_p)[on_teacher_support]).sum()
            else:
                log_m = ref_log_mix(jsd_beta, log_p, log_q)
                divergence = jsd_beta * ref_kl(log_p, log_m) + (1 - jsd_beta) * ref_kl(log_q, log_m)
            loss = (1 - lam) * ce + lam * divergence
        elif method == "tvd":  # total variation distance ½ Σ_v |p_v − q_v|
            loss = (1 - lam) * ce + lam * 0.5 * (log_p.exp() - log_q.exp()).abs().sum()
        elif method == "atkd":  # binary KL of the target probability + KL of the renormalised rest (log space)
            others = [v for v in range(log_p.shape[0]) if v != t]
            log_p_rest, log_q_rest = torch.logsumexp(log_p[others], 0), torch.logsumexp(log_q[others], 0)
            tckd = ref_kl(torch.stack([log_p[t], log_p_rest]), torch.stack([log_q[t], log_q_rest]))
            nckd = (ref_kl(log_p[others] - log_p_rest, log_q[others] - log_q_rest) if log_p_rest > NEG_INF
                    else torch.zeros((), dtype=torch.float64))
            loss = (1 - atkd_easy_weight) * (tckd + nckd) if i in hard else atkd_easy_weight * nckd
        elif method == "akl":  # w·KL(p‖q) + (1−w)·KL(q‖p), w from the gaps |p − q| on the teacher's head and tail
            p, q = log_p.exp(), log_q.exp()
            order = sorted(range(p.shape[0]), key=lambda v: -p[v].item())  # stable: ties by index
            cumulative, gap_head, gap_tail = 0.0, 0.0, 0.0
            for rank, v in enumerate(order):
                cumulative += p[v].item()
                gap = abs(p[v].item() - q[v].item())
                if rank == 0 or cumulative <= akl_mu:
                    gap_head += gap
                else:
                    gap_tail += gap
            w = gap_head / (gap_head + gap_tail) if gap_head + gap_tail > 0 else 0.5
            on_teacher_support = log_p > NEG_INF
            reverse_kl = (q[on_teacher_support] * (log_q - log_p)[on_teacher_support]).sum()
            loss = (1 - lam) * ce + lam * (w * ref_kl(log_p, log_q) + (1 - w) * reverse_kl)
        elif method == "taid":  # KL(r‖q), r = softmax of the interpolated raw logits (1−t)·sg(z_s) + t·z_t
            z = (1 - taid_t) * student[i].detach() + taid_t * teacher[i]
            loss = ref_kl(z - torch.logsumexp(z, 0), log_q)
        total = total + loss
    if reduction == "mean" and positions:
        total = total / len(positions)
    (grad,) = torch.autograd.grad(total, student) if positions else (torch.zeros_like(student),)
    return total.detach(), grad, (difficulty or None), hard


def make_batch(n=13, vocab=7, seed=0, ignored=(2, 5), masked_teacher=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    student = teacher * 0.5 + torch.randn(n, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[list(ignored)] = IGNORE
    if masked_teacher:  # masked vocabulary entries, never at the label
        for i in range(0, n, 3):
            v = (labels[i].item() + 1) % vocab
            teacher[i, v] = NEG_INF
    return student.to(dtype), teacher.to(dtype), labels


def run(method, student, teacher, labels, **kw):
    student = student.clone().requires_grad_(True)
    loss, stats = compute_loss(method, student, teacher, labels, **kw)
    loss.backward()
    return loss.detach(), student.grad, stats


# ----------------------------------------------------------------------------- against the reference

CASES = [(m, None) for m in METHODS] + [("selfevo", 0.3), ("selfevo", 1.0), ("selfevo_token", 0.3)]


@pytest.mark.parametrize("chunk_size", [0, 4, None])
@pytest.mark.parametrize("method,top_k", CASES)
def test_matches_float64_reference(method, top_k, chunk_size):
    student, teacher, labels = make_batch()
    gamma = 1.0  # splits this batch: some tokens have d above it, some below
    loss, grad, stats = run(method, student, teacher, labels, top_k=top_k, gamma=gamma,
                            chunk_size=chunk_size, token_stats=True)
    ref_loss, ref_grad, ref_d, ref_hard = reference(method, student, teacher, labels, top_k=top_k, gamma=gamma)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    counted = [i for i in range(labels.shape[0]) if labels[i] != IGNORE]
    assert stats["tokens"] == len(counted)
    assert stats["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    assert stats["hard_fraction"] == pytest.approx(len(ref_hard) / len(counted))
    assert stats["token_hard"].tolist() == [i in ref_hard for i in range(labels.shape[0])]
    if ref_d is None:
        assert math.isnan(stats["mean_difficulty"])
        assert torch.isnan(stats["token_difficulty"][counted]).all()
    else:
        assert stats["mean_difficulty"] == pytest.approx(sum(ref_d.values()) / len(counted), rel=1e-6)
        expected = [ref_d.get(i, 0.0) for i in range(labels.shape[0])]
        torch.testing.assert_close(stats["token_difficulty"].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    if method in ("selfevo", "selfevo_token", "atkd") and top_k is None:
        assert 0 < len(ref_hard) < len(counted), "the batch must have both easy and hard tokens"


def test_reference_batch_exercises_masked_teacher_entries():
    _, teacher, labels = make_batch()
    assert torch.isinf(teacher).any() and not torch.isinf(teacher[labels != IGNORE, :].gather(
        1, labels[labels != IGNORE][:, None])).any()


@pytest.mark.parametrize("method", METHODS)
def test_batched_shape_and_sum_reduction(method):
    student, teacher, labels = make_batch(n=12)
    s3, t3, l3 = student.view(3, 4, -1), teacher.view(3, 4, -1), labels.view(3, 4)
    loss_mean, grad_mean, stats = run(method, s3, t3, l3)
    loss_sum, grad_sum, stats_sum = run(method, s3, t3, l3, reduction="sum", token_stats=True)
    ref_loss, ref_grad, _, _ = reference(method, student, teacher, labels)
    torch.testing.assert_close(loss_mean, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_mean.view(12, -1), ref_grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(loss_sum, loss_mean * stats["tokens"], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_sum, grad_mean * stats["tokens"], rtol=1e-12, atol=1e-15)
    assert stats_sum["token_hard"].shape == stats_sum["token_difficulty"].shape == (3, 4)
    assert stats_sum["tokens"] == stats["tokens"] == 10


# ----------------------------------------------------------------------------- hand-computed cases

# Case A, V = 2: student logits [0, 0] -> q = [1/2, 1/2]; teacher logits [ln 3, 0] -> p = [3/4, 1/4];
# label 0 -> y = [1, 0]; λ = α = β = 1/2, β' = 0.9.
#   sft:     −ln q_0 = ln 2
#   forward: ½ ln 2 + ½ KL(p‖q), KL(p‖q) = ¾ ln(3/2) + ¼ ln(1/2)
#   reverse: ½ ln 2 + ½ KL(q‖p), KL(q‖p) = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3)
#   noevo:   ỹ = ½y + ½p = [7/8, 1/8]; KL(ỹ‖q) = ⅞ ln(7/4) + ⅛ ln(1/4)
#   skew:    q̂ = ½q + ½ỹ = [11/16, 5/16]; KL(ỹ‖q̂) = ⅞ ln(14/11) + ⅛ ln(2/5)
#   skew_teacher: m = 0.9q + 0.1p = [0.525, 0.475]; ½ ln 2 + ½ (¾ ln(0.75/0.525) + ¼ ln(0.25/0.475))
#   selfevo: d = KL(ỹ‖q) = 0.31638 < Γ = 0.4 -> easy -> the noevo value.
#   jsd (B = ½): M = ½p + ½q = [5/8, 3/8]; KL(p‖M) = ¾ ln(6/5) + ¼ ln(2/3), KL(q‖M) = ½ ln(4/5) + ½ ln(4/3);
#            ½ ln 2 + ½ (½ KL(p‖M) + ½ KL(q‖M))
CASE_A = dict(student=[[0.0, 0.0]], teacher=[[math.log(3.0), 0.0]], label=[0])
EXPECTED_A = {
    "sft": 0.6931471805599453,
    "forward": 0.41197960825054114,
    "reverse": 0.41849410839291784,
    "noevo": 0.3163770193035085,
    "skew": 0.09648045823050767,
    "selfevo": 0.3163770193035085,
    "skew_teacher": 0.40009495848544796,
    "selfevo_token": 0.3163770193035085,  # easy, as selfevo: the noevo value
    "jsd": 0.36348462806427523,
    "tvd": 0.5 * math.log(2.0) + 0.5 * 0.25,  # TV(p, q) = ½(¼ + ¼)
    # atkd: one token is its own median, so hard; TCKD = KL([¾, ¼]‖[½, ½]), NCKD = 0 (one other token); ω = 0.2
    "atkd": 0.8 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
    # akl: head = {0} (cumulative ¾ > μ, the top token always), gaps ¼ and ¼, w = ½; KL(q‖p) = ½ ln(4/3)
    "akl": 0.5 * math.log(2.0) + 0.5 * (0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) + 0.25 * math.log(4 / 3)),
    # taid (t = 0.4): r = softmax(0.6·[0, 0] + 0.4·[ln 3, 0]) = [a, 1]/(a + 1), a = 3^0.4; KL(r‖q) = Σ r ln(2r)
    "taid": sum(r * math.log(2 * r) for r in (3 ** 0.4 / (3 ** 0.4 + 1), 1 / (3 ** 0.4 + 1))),
}
# Case B, V = 3 with a masked teacher entry: student logits [ln 2, 0, 0] -> q = [1/2, 1/4, 1/4];
# teacher logits [0, 0, −inf] -> p = [1/2, 1/2, 0]; label 1.
#   sft:     −ln(1/4) = ln 4
#   forward: ½ ln 4 + ½ (½ ln 1 + ½ ln 2) = 1.25 ln 2
#   reverse: ½ ln 4 + ½ (½ ln 1 + ¼ ln(1/2)), the p_2 = 0 entry contributes 0 -> 0.875 ln 2
#   noevo:   ỹ = [1/4, 3/4, 0]; KL(ỹ‖q) = ¼ ln(1/2) + ¾ ln 3
#   skew:    q̂ = [3/8, 1/2, 1/8]; KL(ỹ‖q̂) = ¼ ln(2/3) + ¾ ln(3/2) = ½ ln(3/2)
#   selfevo: d = 0.6507 > 0.4 -> hard -> the skew value
#   skew_teacher: m = [1/2, 0.275, 0.225]; ½ ln 4 + ½ (½ ln 1 + ½ ln(0.5/0.275)) = ln 2 + ¼ ln(20/11)
#   selfevo_token: hard; m = sg(q̂) = [3/8, 1/2, 1/8]; KL(m‖q) = ⅜ ln(3/4) + ½ ln 2 + ⅛ ln(1/2) = ⅜ ln(3/2)
#   jsd (B = ½): M = [1/2, 3/8, 1/8] (> 0 at the masked entry); KL(p‖M) = ½ ln(4/3),
#            KL(q‖M) = ¼ ln(2/3) + ¼ ln 2 = ¼ ln(4/3); JSD = ⅜ ln(4/3); ½ ln 4 + ½ JSD = ln 2 + (3/16) ln(4/3)
CASE_B = dict(student=[[math.log(2.0), 0.0, 0.0]], teacher=[[0.0, 0.0, NEG_INF]], label=[1])
EXPECTED_B = {
    "sft": 1.3862943611198906,
    "forward": 0.8664339756999316,
    "reverse": 0.6065037829899521,
    "noevo": 0.6506724213610959,
    "skew": 0.2027325540540822,
    "selfevo": 0.2027325540540822,
    "skew_teacher": 0.8426064307488503,
    "selfevo_token": 0.375 * math.log(1.5),
    "jsd": math.log(2.0) + 3 / 16 * math.log(4 / 3),
    "tvd": math.log(2.0) + 0.125,  # ½ ln 4 + ½ TV, TV = ½(0 + ¼ + ¼)
    # atkd (hard): TCKD = KL([½, ½]‖[¼, ¾]) = ½ ln(4/3); NCKD over {0, 2}: [1, 0] against [⅔, ⅓] = ln(3/2)
    "atkd": 0.8 * (0.5 * math.log(4 / 3) + math.log(1.5)),
    # akl: p sorted [½ (token 0), ½ (token 1), 0], ties by index; head = {0} with gap 0, tail gaps ¼ + ¼, so w = 0:
    #      reverse KL on the teacher's support, the reverse value
    "akl": 0.875 * math.log(2.0),
    # taid (t = 0.4): r = softmax(0.6·[ln 2, 0, 0] + 0.4·[0, 0, −inf]) = [b, 1, 0]/(b + 1), b = 2^0.6;
    #      KL(r‖q) = r_0 ln(2 r_0) + r_1 ln(4 r_1)
    "taid": (2 ** 0.6 / (2 ** 0.6 + 1)) * math.log(2 * 2 ** 0.6 / (2 ** 0.6 + 1))
            + (1 / (2 ** 0.6 + 1)) * math.log(4 / (2 ** 0.6 + 1)),
}


@pytest.mark.parametrize("chunk_size", [0, None])
@pytest.mark.parametrize("case,expected", [(CASE_A, EXPECTED_A), (CASE_B, EXPECTED_B)], ids=["V2", "V3"])
@pytest.mark.parametrize("method", METHODS)
def test_hand_computed_values(method, case, expected, chunk_size):
    loss, _, stats = run(method, torch.tensor(case["student"], dtype=torch.float64),
                         torch.tensor(case["teacher"], dtype=torch.float64), torch.tensor(case["label"]),
                         chunk_size=chunk_size, **HYPER)
    assert loss.item() == pytest.approx(expected[method], rel=1e-12)
    if method in ("selfevo", "selfevo_token"):  # case A is easy (d = 0.316 < 0.4), case B hard (d = 0.651)
        assert stats["hard_fraction"] == (1.0 if case is CASE_B else 0.0)
        assert stats["mean_difficulty"] == pytest.approx(expected["noevo"], rel=1e-12)


# Gradients w.r.t. the student logits in case A (∂L/∂z = g − q Σg with g = ∂L/∂log q):
#   sft: q − y = [−1/2, 1/2]; forward: q − ½y − ½p = [−3/8, 3/8]; noevo: q − ỹ = [−3/8, 3/8];
#   skew: g_v = −ỹ_v β q_v / q̂_v = [−7/22, −1/10], Σg = −23/55, so ∂L/∂z = g + q·23/55 = [−6/55, 6/55].
#   jsd (B = ½): ∂JSD/∂q_v = (1−B)(ln q_v − ln M_v), g = q·that = [¼ ln(4/5), ¼ ln(4/3)], Σg = ¼ ln(16/15),
#        ∂JSD/∂z_0 = ¼ ln(4/5) − ⅛ ln(16/15) = ⅛ ln(3/5); total ½(q − y) + ½·[⅛ ln(3/5), −⅛ ln(3/5)].
HAND_GRADS_A = {
    "sft": [-0.5, 0.5],
    "forward": [-0.375, 0.375],
    "noevo": [-0.375, 0.375],
    "skew": [-6 / 55, 6 / 55],
    "jsd": [-0.25 + math.log(0.6) / 16, 0.25 - math.log(0.6) / 16],
    # tvd: ∂TV/∂q = ½ sign(q − p) = [−½, ½], Σ q·that = 0, so ∂TV/∂z = q·[−½, ½] = [−¼, ¼]; ½(q − y) + ½ that
    "tvd": [-0.375, 0.375],
    # atkd: 0.8 TCKD, a binary KL whose gradient is q_t − p_t = −¼ on z_0
    "atkd": [-0.2, 0.2],
    # akl (w = ½, no gradient through w): ½(q − y) + ½[½(q − p) + ½ ∂KL(q‖p)/∂z], ∂KL(q‖p)/∂z_v =
    #      q_v(ln(q_v/p_v) − KL(q‖p)) = [−¼ ln 3, ¼ ln 3]
    "akl": [-0.3125 - math.log(3) / 16, 0.3125 + math.log(3) / 16],
    # taid: r is held fixed (sg of the student inside it), so ∂KL(r‖q)/∂z = q − r, r_0 = a/(a + 1), a = 3^0.4
    "taid": [0.5 - 3 ** 0.4 / (3 ** 0.4 + 1), 3 ** 0.4 / (3 ** 0.4 + 1) - 0.5],
}


@pytest.mark.parametrize("chunk_size", [0, None])
@pytest.mark.parametrize("method", sorted(HAND_GRADS_A))
def test_hand_computed_gradients(method, chunk_size):
    _, grad, _ = run(method, torch.tensor(CASE_A["student"], dtype=torch.float64),
                     torch.tensor(CASE_A["teacher"], dtype=torch.float64), torch.tensor(CASE_A["label"]),
                     chunk_size=chunk_size, **HYPER)
    torch.testing.assert_close(grad, torch.tensor([HAND_GRADS_A[method]], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)


# ATKD's median split by hand, V = 3, label 0, student uniform (q = ⅓ each, q_t = ⅓, non-target [½, ½]), ω = 0.2:
#   T1: p = [½, ¼, ¼], 1 − p_t = ½;  T2: p = [¾, 3/16, 1/16], 1 − p_t = ¼;  T3: p = [¼, ½, ¼], 1 − p_t = ¾;
#   T4 ignored (its uncertainty, 0.9, must not move the median). Median of {½, ¼, ¾} = ½: T1, T3 hard, T2 easy.
#   T1 hard: TCKD = ½ ln(3/2) + ½ ln(3/4) = ½ ln(9/8), NCKD = KL([½, ½]‖[½, ½]) = 0
#   T2 easy: ω·NCKD, NCKD = KL([¾, ¼]‖[½, ½]) = ¾ ln(3/2) + ¼ ln(1/2)
#   T3 hard: TCKD = ¼ ln(3/4) + ¾ ln(9/8), NCKD = KL([⅔, ⅓]‖[½, ½]) = ⅔ ln(4/3) + ⅓ ln(2/3)
ATKD_CASE = dict(teacher=[[math.log(2), 0, 0], [math.log(12), math.log(3), 0], [0, math.log(2), 0], [0, math.log(9), 0]],
                 labels=[0, 0, 0, IGNORE])
ATKD_EXPECTED = (0.8 * 0.5 * math.log(9 / 8) + 0.2 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
                 + 0.8 * (0.25 * math.log(0.75) + 0.75 * math.log(9 / 8) + 2 / 3 * math.log(4 / 3)
                          + 1 / 3 * math.log(2 / 3))) / 3


@pytest.mark.parametrize("chunk_size", [0, 1, None])
def test_atkd_median_split_by_hand(chunk_size):
    """Chunks of one token still split at the median of the whole call."""
    teacher = torch.tensor(ATKD_CASE["teacher"], dtype=torch.float64)
    loss, _, stats = run("atkd", torch.zeros(4, 3, dtype=torch.float64), teacher, torch.tensor(ATKD_CASE["labels"]),
                         chunk_size=chunk_size, token_stats=True)
    assert stats["token_hard"].tolist() == [True, False, True, False]
    assert loss.item() == pytest.approx(ATKD_EXPECTED, rel=1e-12)


# AKL with a head of two tokens: p = [⅛, ¼, ⅝], q = ⅓ each, label 0, μ = 0.9: sorted p [⅝, ¼, ⅛], cumulative
# [⅝, ⅞, 1], head = {2, 1}, gaps 7/24 + 2/24 = 9/24, tail gap 5/24, w = 9/14;
# KL(p‖q) = ⅛ ln(3/8) + ¼ ln(3/4) + ⅝ ln(15/8), KL(q‖p) = ⅓(ln(8/3) + ln(4/3) + ln(8/15)).
@pytest.mark.parametrize("chunk_size", [0, None])
def test_akl_two_token_head_by_hand(chunk_size):
    forward_kl = 1 / 8 * math.log(3 / 8) + 1 / 4 * math.log(3 / 4) + 5 / 8 * math.log(15 / 8)
    reverse_kl = (math.log(8 / 3) + math.log(4 / 3) + math.log(8 / 15)) / 3
    expected = 0.5 * math.log(3) + 0.5 * (9 / 14 * forward_kl + 5 / 14 * reverse_kl)
    loss, _, _ = run("akl", torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0, math.log(2), math.log(5)]],
                     dtype=torch.float64), torch.tensor([0]), akl_mu=0.9, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # with μ = ½ the head is the top token alone: gaps 7/24 against 7/24, w = ½
    loss, _, _ = run("akl", torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0, math.log(2), math.log(5)]],
                     dtype=torch.float64), torch.tensor([0]), akl_mu=0.5, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(0.5 * math.log(3) + 0.25 * (forward_kl + reverse_kl), rel=1e-12)


# Case B for selfevo_token (hard): ∂KL(m‖q)/∂z = q − m = (1−β)(q − ỹ) = ½([½, ¼, ¼] − [¼, ¾, 0]).
@pytest.mark.parametrize("chunk_size", [0, None])
def test_selfevo_token_hand_gradient(chunk_size):
    _, grad, stats = run("selfevo_token", torch.tensor(CASE_B["student"], dtype=torch.float64),
                         torch.tensor(CASE_B["teacher"], dtype=torch.float64), torch.tensor(CASE_B["label"]),
                         chunk_size=chunk_size, **HYPER)
    assert stats["hard_fraction"] == 1.0
    torch.testing.assert_close(grad, torch.tensor([[0.125, -0.25, 0.125]], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("chunk_size", [0, 4, None])
def test_selfevo_token_hard_gradient_is_scaled_noevo(beta, chunk_size):
    """Every token hard (Γ = −∞): the gradient is exactly (1−β) times noevo's; with Γ = +∞ it is noevo's."""
    student, teacher, labels = make_batch()
    _, noevo_grad, _ = run("noevo", student, teacher, labels, chunk_size=chunk_size)
    _, hard_grad, stats = run("selfevo_token", student, teacher, labels, gamma=-math.inf, beta=beta,
                              chunk_size=chunk_size)
    assert stats["hard_fraction"] == 1.0
    torch.testing.assert_close(hard_grad, (1 - beta) * noevo_grad, rtol=1e-10, atol=1e-13)
    _, easy_grad, stats = run("selfevo_token", student, teacher, labels, gamma=math.inf, beta=beta,
                              chunk_size=chunk_size)
    assert stats["hard_fraction"] == 0.0
    torch.testing.assert_close(easy_grad, noevo_grad, rtol=0, atol=0)


def test_special_mixing_weights():
    """α = 0 makes ỹ = y (noevo = sft); α = 1 makes ỹ = p (noevo = forward with λ = 1);
    β = 1 makes q̂ = q (skew = noevo); β = 0 makes q̂ = ỹ (loss 0, gradient 0, no NaN)."""
    student, teacher, labels = make_batch()
    for chunk_size in (0, 5):
        def loss_and_grad(method, **kw):
            return run(method, student, teacher, labels, chunk_size=chunk_size, **kw)[:2]
        pairs = [(loss_and_grad("noevo", target_mix=0.0), loss_and_grad("sft")),
                 (loss_and_grad("noevo", target_mix=1.0), loss_and_grad("forward", kd_ratio=1.0)),
                 (loss_and_grad("skew", beta=1.0), loss_and_grad("noevo"))]
        for (loss, grad), (other_loss, other_grad) in pairs:
            torch.testing.assert_close(loss, other_loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, other_grad, rtol=1e-12, atol=1e-12)
        loss, grad = loss_and_grad("skew", beta=0.0)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("chunk_size", [0, 4, None])
@pytest.mark.parametrize("jsd_beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_reference_and_its_ends_are_forward_and_reverse(jsd_beta, chunk_size):
    """jsd for every B against the float64 reference (masked teacher entries included); B = 0 is
    forward KL and B = 1 reverse KL exactly (GKD's convention), also on the hidden-state entry."""
    student, teacher, labels = make_batch()
    for kd_ratio in (0.5, 1.0):
        loss, grad, stats = run("jsd", student, teacher, labels, jsd_beta=jsd_beta, kd_ratio=kd_ratio,
                                chunk_size=chunk_size)
        ref_loss, ref_grad, _, _ = reference("jsd", student, teacher, labels, jsd_beta=jsd_beta, kd_ratio=kd_ratio)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
        assert stats["hard_fraction"] == 0.0 and math.isnan(stats["mean_difficulty"])
        if jsd_beta in (0.0, 1.0):
            other = run("forward" if jsd_beta == 0.0 else "reverse", student, teacher, labels, kd_ratio=kd_ratio,
                        chunk_size=chunk_size)
            assert torch.equal(loss, other[0]) and torch.equal(grad, other[1])
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = compute_loss_from_hidden("jsd", hidden, weight, labels, teacher_logits=teacher, jsd_beta=jsd_beta,
                                       chunk_size=chunk_size)
    loss.backward()
    ref_loss, ref_grad_logits, _, _ = reference("jsd", (hidden @ weight.T).detach(), teacher, labels, jsd_beta=jsd_beta)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, ref_grad_logits @ weight.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_grad_logits.T @ hidden.detach(), rtol=1e-6, atol=1e-12)


def test_jsd_is_symmetric_at_one_half_and_zero_when_equal():
    """B = ½ is the symmetric Jensen-Shannon divergence (swapping p and q leaves it unchanged); it is
    0 with zero gradient when q = p, and never above ln 2 (its bound)."""
    student, teacher, labels = make_batch(masked_teacher=False)
    both = run("jsd", student, teacher, labels, jsd_beta=0.5, kd_ratio=1.0, chunk_size=0)[0]
    swapped = run("jsd", teacher, student, labels, jsd_beta=0.5, kd_ratio=1.0, chunk_size=0)[0]
    torch.testing.assert_close(both, swapped, rtol=1e-12, atol=0)
    assert 0.0 < both.item() <= math.log(2.0)
    for chunk_size in (0, None):
        loss, grad, _ = run("jsd", teacher, teacher, labels, jsd_beta=0.3, kd_ratio=1.0, chunk_size=chunk_size)
        assert abs(loss.item()) < 1e-12 and grad.abs().max().item() < 1e-12


def test_jsd_beta_out_of_range_is_refused():
    student, teacher, labels = make_batch(n=4, ignored=())
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="jsd_beta"):
            compute_loss("jsd", student, teacher, labels, jsd_beta=bad)


# ----------------------------------------------------------------------------- hard / easy selection


def _difficulties(student, teacher, labels):
    return reference("noevo", student, teacher, labels)[2]


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_threshold_selection_follows_difficulty(chunk_size):
    student, teacher, labels = make_batch()
    d = _difficulties(student, teacher, labels)
    ranked = sorted(d.values())
    middle = len(ranked) // 2
    gamma = (ranked[middle - 1] + ranked[middle]) / 2  # between two tokens' d, not on one
    _, _, stats = run("selfevo", student, teacher, labels, gamma=gamma, chunk_size=chunk_size, token_stats=True)
    hard = {i for i, flag in enumerate(stats["token_hard"].tolist()) if flag}
    assert hard == {i for i, value in d.items() if value > gamma}
    assert len(hard) == len(d) - middle
    # Move the hardest token's student distribution onto ỹ: its d drops to ~0, so it becomes easy,
    # while every other token keeps its decision (the choice is re-made from the current d).
    hardest = max(d, key=d.get)
    moved = student.clone()
    t = labels[hardest].item()
    p = torch.softmax(teacher[hardest], 0)
    y_mix = 0.5 * p
    y_mix[t] += 0.5
    moved[hardest] = torch.log(y_mix.clamp_min(1e-300))
    _, _, moved_stats = run("selfevo", moved, teacher, labels, gamma=gamma, chunk_size=chunk_size, token_stats=True)
    assert moved_stats["token_hard"][hardest].item() is False
    assert moved_stats["token_difficulty"][hardest].item() < 1e-6
    expected = stats["token_hard"].clone()
    expected[hardest] = False
    assert torch.equal(moved_stats["token_hard"], expected)


@pytest.mark.parametrize("chunk_size", [0, 3, None])
@pytest.mark.parametrize("top_k,n_hard", [(0.3, 3), (0.34, 3), (0.36, 4), (0.05, 0), (1.0, 10)])
def test_top_k_selects_round_k_n_largest(top_k, n_hard, chunk_size):
    # 12 positions, 2 ignored -> N = 10 counted; round(top_k·10) hard tokens, the largest d of the
    # whole call (with chunk_size 3 the chunks must not select on their own).
    student, teacher, labels = make_batch(n=12, ignored=(0, 7))
    d = _difficulties(student, teacher, labels)
    _, _, stats = run("selfevo", student, teacher, labels, top_k=top_k, chunk_size=chunk_size, token_stats=True)
    hard = {i for i, flag in enumerate(stats["token_hard"].tolist()) if flag}
    assert len(hard) == n_hard == stats["hard_tokens"]
    assert hard == set(sorted(d, key=lambda i: -d[i])[:n_hard])
    assert stats["hard_fraction"] == pytest.approx(n_hard / 10)


def test_top_k_hard_set_changes_with_difficulty():
    student, teacher, labels = make_batch(n=12, ignored=())
    d = _difficulties(student, teacher, labels)
    easiest = min(d, key=d.get)
    _, _, before = run("selfevo", student, teacher, labels, top_k=0.25, chunk_size=4, token_stats=True)
    assert not before["token_hard"][easiest]
    harder = student.clone()
    harder[easiest] = -5.0 * torch.nn.functional.one_hot(labels[easiest], student.shape[1]).double()  # q_t tiny
    _, _, after = run("selfevo", harder, teacher, labels, top_k=0.25, chunk_size=4, token_stats=True)
    assert after["token_hard"][easiest] and int(after["token_hard"].sum()) == 3 == int(before["token_hard"].sum())


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", METHODS)
def test_all_ignored_gives_zero_loss_and_zero_grad(method):
    student, teacher, labels = make_batch(n=4, ignored=())
    labels[:] = IGNORE
    for chunk_size in (0, None):
        for reduction in ("mean", "sum"):
            loss, grad, stats = run(method, student, teacher, labels, chunk_size=chunk_size, reduction=reduction)
            assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
            assert stats["tokens"] == 0 and stats["hard_fraction"] == 0.0
        hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        loss, _ = compute_loss_from_hidden(method, hidden, weight, labels, teacher_logits=teacher,
                                           chunk_size=chunk_size)
        loss.backward()
        assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("method", METHODS)
def test_huge_logit_gaps_and_masked_teacher(method):
    """Logit gaps of 1e4 (q and p underflow to 0 in places) and −inf teacher entries: finite, and
    equal to the float64 log-space reference; float32 inputs agree with it too."""
    student, teacher, labels = make_batch(n=6, vocab=5, ignored=())
    student[:, 0] += 1e4
    teacher[::2, 1] += 1e4
    teacher[1::2, 2] = NEG_INF
    labels[1::2] = 3
    ref_loss, ref_grad, _, _ = reference(method, student, teacher, labels)
    for chunk_size in (0, 4):
        loss, grad, _ = run(method, student, teacher, labels, chunk_size=chunk_size)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
        # float32: compare with the float64 value of the same rounded logits. Terms of size ~1e4
        # carry float32's ~6e-8 relative error, i.e. ~1e-3 absolute; the reverse-KL gradient
        # g − q·Σg subtracts two such terms (÷ N = 6 tokens), hence atol 5e-5 on the gradient.
        loss32, grad32, _ = run(method, student.float(), teacher.float(), labels, chunk_size=chunk_size)
        ref_loss32, ref_grad32, _, _ = reference(method, student.float(), teacher.float(), labels)
        assert torch.isfinite(loss32) and torch.isfinite(grad32).all()
        # atkd's NCKD renormalises the non-target mass, which float32 holds as log-probabilities near −1e4 (ulp
        # 2^-10): the renormalised p̂ is off by ~1e-3 relative where p_t ≈ 1, times log q̂ ≈ −1e4. The float64
        # check above holds it to 1e-6; with the gaps of real logits (< 100) float32 stays within 1e-7 of float64.
        rtol32 = 1e-4 if method == "atkd" else 1e-6
        torch.testing.assert_close(loss32.double(), ref_loss32, rtol=rtol32, atol=0)
        torch.testing.assert_close(grad32.double(), ref_grad32, rtol=1e-4, atol=5e-5)


def test_huge_gap_hand_value():
    # student [1e4, 0, 0], teacher [0, 1e4, 0], label 0: log q ≈ [0, −1e4, −1e4], p ≈ [0, 1, 0].
    # forward = ½·0 + ½·KL(p‖q) = ½·(0 − (−1e4)) = 5000; ∂/∂z = q − ½y − ½p = [½, −½, 0].
    student = torch.tensor([[1e4, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1e4, 0.0]])
    for chunk_size in (0, None):
        loss, grad, _ = run("forward", student, teacher, torch.tensor([0]), chunk_size=chunk_size)
        assert loss.item() == pytest.approx(5000.0, rel=1e-6)
        torch.testing.assert_close(grad, torch.tensor([[0.5, -0.5, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_inputs_close_to_float64(method, dtype):
    """bf16/fp16 logits are computed in float32: the loss is within rtol 1e-5 of the float64 value
    of the same (rounded) logits; the gradient comes back in the input dtype, so it carries that
    dtype's rounding (8 bits of mantissa for bf16: rtol 1e-2)."""
    student, teacher, labels = make_batch(n=9, vocab=11)
    low_student, low_teacher = student.to(dtype), teacher.to(dtype)
    ref_loss, ref_grad, _, _ = reference(method, low_student.double(), low_teacher.double(), labels)
    for chunk_size in (0, 4):
        loss, grad, _ = run(method, low_student, low_teacher, labels, chunk_size=chunk_size)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.float32, torch.bfloat16),
                                                          (torch.float64, torch.float32),
                                                          (torch.float32, torch.float64)])
def test_mixed_student_and_teacher_dtypes(student_dtype, teacher_dtype):
    """The teacher's log-probabilities are computed in the student's compute dtype; compared with
    the float64 value of the same rounded inputs (float32 arithmetic: rtol 1e-5)."""
    student, teacher, labels = make_batch()
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    for method in KD_METHODS:
        ref_loss, ref_grad, _, _ = reference(method, student.double(), teacher.double(), labels)
        for chunk_size in (0, 4):
            loss, grad, _ = run(method, student, teacher, labels, chunk_size=chunk_size)
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient_and_scaled_backward():
    student, teacher, labels = make_batch()
    for chunk_size in (0, 5):
        for method in KD_METHODS:
            s = student.clone().requires_grad_(True)
            t = teacher.clone().requires_grad_(True)
            loss, _ = compute_loss(method, s, t, labels, chunk_size=chunk_size)
            (3.0 * loss).backward()  # a scaled upstream gradient, as with loss / n_tokens
            assert t.grad is None
            _, ref_grad, _, _ = reference(method, student, teacher, labels)
            torch.testing.assert_close(s.grad, 3.0 * ref_grad, rtol=1e-6, atol=1e-12)


def test_second_backward_of_chunked_loss_fails_loudly():
    student, teacher, labels = make_batch()
    s = student.clone().requires_grad_(True)
    loss, _ = compute_loss("selfevo", s, teacher, labels, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="chunk_size=0"):
        loss.backward()


# ----------------------------------------------------------------------------- hidden-state entry


@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
@pytest.mark.parametrize("method,top_k", CASES)
def test_hidden_entry_equals_plain_path(method, top_k, teacher_as):
    g = torch.Generator().manual_seed(1)
    n, h, ht, vocab = 11, 5, 6, 9
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(n, ht, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab + 1, ht, generator=g, dtype=torch.float64)  # one padding row
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[1, 6]] = IGNORE
    teacher = (dict(teacher_logits=teacher_hidden @ teacher_weight.T) if teacher_as == "logits"
               else dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight))

    # The plain path on explicit logits (teacher cut to the student's 9 entries).
    h0, w0 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    plain_loss, plain_stats = compute_loss(method, h0 @ w0.T, teacher_hidden @ teacher_weight[:vocab].T, labels,
                                           top_k=top_k, chunk_size=0)
    plain_loss.backward()
    for chunk_size in (0, 4, None):
        h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = compute_loss_from_hidden(method, h1, w1, labels, top_k=top_k, chunk_size=chunk_size, **teacher)
        loss.backward()
        torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h1.grad, h0.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w1.grad, w0.grad, rtol=1e-10, atol=1e-12)
        assert stats["hard_fraction"] == plain_stats["hard_fraction"]


def test_hidden_entry_cuts_padded_student_weight_and_matches_reference():
    g = torch.Generator().manual_seed(2)
    n, h, vocab = 7, 4, 64
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab + 1, h, generator=g, dtype=torch.float64, requires_grad=True)  # padded to 65
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    loss, _ = compute_loss_from_hidden("selfevo", hidden, weight, labels, teacher_logits=teacher, chunk_size=3)
    loss.backward()
    logits = (hidden @ weight[:vocab].T).detach()
    ref_loss, ref_grad_logits, _, _ = reference("selfevo", logits, teacher, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, ref_grad_logits @ weight[:vocab].detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(weight.grad[:vocab], ref_grad_logits.T @ hidden.detach(), rtol=1e-6, atol=1e-12)
    assert not weight.grad[vocab:].any()  # the padding row gets no gradient


def test_hidden_entry_bf16():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(10, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    teacher = torch.randn(6, 10, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 10, (6,), generator=g)
    loss, _ = compute_loss_from_hidden("skew_teacher", hidden, weight, labels, teacher_logits=teacher, chunk_size=4)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref_loss, _ = compute_loss("skew_teacher", h64 @ w64.T, teacher.double(), labels, chunk_size=0)
    ref_loss.backward()
    # bf16 student logits (8-bit mantissa) change the loss by ~1e-2 relative; gradients likewise.
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=5e-2, atol=2e-2)


# ----------------------------------------------------------------------------- vocabulary alignment


def test_shared_vocab_size_rule():
    assert shared_vocab_size(32000, 32001) == 32000 == shared_vocab_size(32001, 32000)
    assert shared_vocab_size(151936, 152064) == 151936 == shared_vocab_size(152064, 151936)
    assert shared_vocab_size(7, 7) == 7 and shared_vocab_size(7, 8) == 7  # one added row always passes
    for student_vocab, teacher_vocab in [(32000, 50257), (32000, 32501), (7, 9)]:
        with pytest.raises(ValueError, match=f"{student_vocab}.*{teacher_vocab}"):
            shared_vocab_size(student_vocab, teacher_vocab)


def test_align_vocab_and_padded_teacher_in_compute_loss():
    student, teacher, labels = make_batch(n=5, vocab=64, ignored=(1,), masked_teacher=False)
    padded_teacher = torch.cat([teacher, torch.full((5, 1), 3.0, dtype=torch.float64)], dim=1)  # 65 entries
    s_cut, t_cut = align_vocab(student, padded_teacher, labels)
    assert s_cut.shape == t_cut.shape == (5, 64) and torch.equal(t_cut, teacher)
    for chunk_size in (0, 2):
        loss, grad, _ = run("forward", student, padded_teacher, labels, chunk_size=chunk_size)
        ref_loss, ref_grad, _, _ = reference("forward", student, teacher, labels)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    # A label that only exists in the larger vocabulary cannot be cut.
    padded_student = torch.cat([student, torch.zeros(5, 1, dtype=torch.float64)], dim=1)
    bad_labels = labels.clone()
    bad_labels[0] = 64
    with pytest.raises(ValueError, match="64"):
        align_vocab(padded_student, teacher, bad_labels)
    with pytest.raises(ValueError, match="64"):
        compute_loss("forward", padded_student, teacher, bad_labels)
    with pytest.raises(ValueError, match="64.*100"):
        compute_loss("forward", student, torch.zeros(5, 100, dtype=torch.float64), labels)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_fail_loudly():
    student, teacher, labels = make_batch(n=4, ignored=())
    with pytest.raises(ValueError, match="unknown method 'kl'"):
        compute_loss("kl", student, teacher, labels)
    for method in KD_METHODS:
        with pytest.raises(ValueError, match=method):
            compute_loss(method, student, None, labels)
    compute_loss("sft", student, None, labels)  # sft runs without a teacher
    for top_k in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="top_k"):
            compute_loss("selfevo", student, teacher, labels, top_k=top_k)
    with pytest.raises(ValueError, match="top_k"):
        compute_loss("skew", student, teacher, labels, top_k=0.5)
    with pytest.raises(ValueError, match="kd_ratio"):
        compute_loss("forward", student, teacher, labels, kd_ratio=1.5)
    with pytest.raises(ValueError, match="reduction"):
        compute_loss("forward", student, teacher, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        compute_loss("forward", student, teacher, labels, chunk_size=-1)
    with pytest.raises(ValueError, match="shape"):
        compute_loss("forward", student, teacher, labels[:3])
    with pytest.raises(ValueError, match="label 7"):
        compute_loss("sft", student, None, torch.tensor([0, 7, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        compute_loss("sft", student, None, labels.double())
    with pytest.raises(ValueError, match="exactly one"):
        compute_loss_from_hidden("forward", torch.zeros(4, 3), torch.zeros(7, 3), labels)


# ----------------------------------------------------------------------------- the registry (kd/methods.py)
# The lean paths take a chunk's gradient by autograd of the entry's formula unless the entry has a
# hand-derived fast path; each fast path must equal its autograd twin, and the autograd form alone
# must match the independent reference above.

from kd import methods as registry  # noqa: E402

FAST_CASES = ([(m, {}) for m, entry in registry.REGISTRY.items() if entry.fast is not None]
              + [("selfevo", dict(top_k=0.3)), ("selfevo_token", dict(top_k=0.3)), ("selfevo", dict(gamma=0.0)),
                 ("selfevo", dict(beta=0.0)), ("skew", dict(beta=1.0)), ("skew_teacher", dict(skew_beta=0.3)),
                 ("jsd", dict(jsd_beta=0.0)), ("jsd", dict(jsd_beta=1.0)), ("jsd", dict(jsd_beta=0.2, kd_ratio=1.0)),
                 ("forward", dict(kd_ratio=0.0)), ("noevo", dict(target_mix=1.0))])


@pytest.mark.parametrize("method,settings", FAST_CASES, ids=[f"{m}-{s}" for m, s in FAST_CASES])
def test_fast_path_equals_autograd_of_the_formula(method, settings):
    """float64, both lean entries, chunked so that chunks have mixed hard/easy rows: loss, gradient,
    d and the hard set of the hand-derived path equal those of autograd through the formula."""
    assert registry.REGISTRY[method].fast is not None
    student, teacher, labels = make_batch(n=23, vocab=11, seed=5)
    for chunk_size in (4, None):
        fast = run(method, student, teacher, labels, chunk_size=chunk_size, token_stats=True, **settings)
        auto = run(method, student, teacher, labels, chunk_size=chunk_size, token_stats=True, fast_path=False,
                   **settings)
        torch.testing.assert_close(auto[0], fast[0], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(auto[1], fast[1], rtol=1e-6, atol=1e-12)
        assert torch.equal(auto[2]["token_hard"], fast[2]["token_hard"])
        torch.testing.assert_close(auto[2]["token_difficulty"], fast[2]["token_difficulty"], rtol=1e-9, atol=1e-12,
                                   equal_nan=True)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(23, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64)
    grads = []
    for fast_path in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, _ = compute_loss_from_hidden(method, h, w, labels, teacher_logits=teacher, chunk_size=4,
                                           fast_path=fast_path, **settings)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for fast_value, auto_value in zip(*grads):
        torch.testing.assert_close(auto_value, fast_value, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("method,top_k", CASES)
def test_autograd_lean_path_matches_float64_reference(method, top_k, chunk_size):
    """Every method with its fast path switched off: the lean path is then autograd of the formula."""
    student, teacher, labels = make_batch()
    loss, grad, stats = run(method, student, teacher, labels, top_k=top_k, chunk_size=chunk_size, fast_path=False)
    ref_loss, ref_grad, ref_difficulty, ref_hard = reference(method, student, teacher, labels, top_k=top_k)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    assert stats["hard_tokens"] == len(ref_hard)
    if ref_difficulty:
        assert stats["mean_difficulty"] == pytest.approx(sum(ref_difficulty.values()) / len(ref_difficulty), rel=1e-9)


def test_method_lists_and_flags_come_from_the_registry():
    entries = registry.REGISTRY
    assert registry.METHODS == tuple(entries) and "sft" in entries
    assert registry.KD_METHODS == tuple(m for m in entries if m != "sft")
    assert set(registry.TARGET_MIX_METHODS) >= {"noevo", "skew", "selfevo", "selfevo_token"}
    assert registry.SELECTING_METHODS == ("selfevo", "selfevo_token")
    assert {"forward", "reverse", "skew_teacher", "jsd"} <= set(registry.ON_POLICY_METHODS)
    assert not set(registry.ON_POLICY_METHODS) & set(registry.TARGET_MIX_METHODS)  # a sample has no reference
    for name, entry in entries.items():
        assert set(entry.hyperparameters) <= set(registry.HYPERPARAMETERS), name
        assert entry.equation and entry.source, name
    assert registry.methods_reading("jsd_beta") == ("jsd",)
    assert set(registry.methods_reading("kd_ratio")) >= {"forward", "reverse", "skew_teacher", "jsd"}
    import train_kd  # the command line: one flag per hyperparameter, --method choices from the registry
    defaults = vars(train_kd.parse_args(["--method", "sft", "--student", "s", "--train-file", "t",
                                         "--output-dir", "o"]))
    for name, field in registry.HYPERPARAMETERS.items():
        assert defaults[name] == field.default, name
    with pytest.raises(SystemExit):
        train_kd.parse_args(["--method", "kl", "--student", "s", "--train-file", "t", "--output-dir", "o"])


def test_a_hyperparameter_out_of_range_names_the_method_the_parameter_and_the_range():
    student, teacher, labels = make_batch(n=4, ignored=())
    with pytest.raises(ValueError, match=r"method 'skew': beta must be a number in \[0, 1\], got 1\.5"):
        compute_loss("skew", student, teacher, labels, beta=1.5)
    with pytest.raises(ValueError, match=r"method 'selfevo': top_k must be a number in \(0, 1\], got 0"):
        compute_loss("selfevo", student, teacher, labels, top_k=0)
    with pytest.raises(ValueError, match=r"method 'selfevo': gamma must be a number, got nan"):
        compute_loss("selfevo", student, teacher, labels, gamma=math.nan)
    with pytest.raises(ValueError, match="unknown method 'kl'; choose one of .*selfevo"):
        registry.LossConfig("kl")
    with pytest.raises(ValueError, match="inside the LossConfig"):
        compute_loss(registry.LossConfig("forward"), student, teacher, labels, kd_ratio=0.3)


def _broken_formula(log_q, log_p, target, hard, c):
    """KL(p‖q) written with a bug: log of a difference that can be negative gives NaN."""
    return (log_p.exp() * torch.log(log_p - log_q)).sum(-1)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_a_broken_formula_is_an_error_naming_the_method(monkeypatch, chunk_size):
    monkeypatch.setitem(registry.REGISTRY, "broken_kl",
                        registry.Method("broken_kl", "KL(p‖q), with a bug", "a test", _broken_formula))
    student, teacher, labels = make_batch(masked_teacher=False)
    with pytest.raises(ValueError, match="method 'broken_kl': its formula gave a non-finite loss .*on finite inputs"):
        compute_loss("broken_kl", student.clone().requires_grad_(True), teacher, labels, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="method 'broken_kl': its formula gave a non-finite loss"):
        compute_loss_from_hidden("broken_kl", torch.randn(13, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64),
                                 labels, teacher_logits=teacher, chunk_size=chunk_size)
    monkeypatch.setitem(registry.REGISTRY, "shapeless",
                        registry.Method("shapeless", "a sum over the tokens", "a test",
                                        lambda log_q, log_p, target, hard, c: registry.kl(log_p, log_q).sum()))
    with pytest.raises(ValueError, match="method 'shapeless': its formula must return one loss per token"):
        compute_loss("shapeless", student, teacher, labels, chunk_size=chunk_size)


def test_non_finite_student_logits_give_a_non_finite_loss_not_an_error():
    """A bf16 overflow in the student is the input's fault: the loss is non-finite (train_kd.py skips
    the step), no formula is blamed."""
    student, teacher, labels = make_batch(masked_teacher=False)
    student[0, 0] = math.inf
    for chunk_size in (0, 4):
        for fast_path in (True, False):
            loss, _ = compute_loss("forward", student, teacher, labels, chunk_size=chunk_size, fast_path=fast_path)
            assert not math.isfinite(loss.item())


def test_the_pieces_of_a_formula_by_hand():
    """ce, kl, mix and target_mix on case B (V = 3, a masked teacher entry) against hand values."""
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    log_p = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    target = torch.tensor([1])
    assert registry.ce(log_q, target).item() == pytest.approx(math.log(4), rel=1e-15)
    y_mix = registry.target_mix(log_p, target, 0.5)                      # ỹ = [1/4, 3/4, 0]
    torch.testing.assert_close(y_mix.exp(), torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64))
    assert y_mix[0, 2].item() == -math.inf
    q_hat = registry.mix(0.5, log_q, y_mix)                              # q̂ = [3/8, 1/2, 1/8]
    torch.testing.assert_close(q_hat.exp(), torch.tensor([[0.375, 0.5, 0.125]], dtype=torch.float64))
    assert registry.kl(y_mix, q_hat).item() == pytest.approx(0.5 * math.log(1.5), rel=1e-12)
    assert registry.kl(log_q, log_p).item() == pytest.approx(0.25 * math.log(0.5), rel=1e-12)  # p > 0 support only
    both_zero = registry.mix(0.0, log_q.requires_grad_(True), log_p)     # w = 0 and b_2 = 0: exactly −inf
    assert both_zero[0, 2].item() == -math.inf
    both_zero[0, :2].sum().backward()
    assert torch.isfinite(log_q.grad).all() and log_q.grad.abs().sum().item() == 0.0
