"""mechanism.py: the per-token gradient norms equal the closed-form gradients of the losses, the
frequency buckets and the d bins partition the measured tokens, and the script runs end to end on
the tiny Llamas (train_kd.py in-process) writing a complete mechanism.json and mechanism.png."""

import json
import math

import numpy as np
import pytest
import torch

import mechanism
from kd.losses import METHODS

ALPHA, BETA, GAMMA, LAM = 0.5, 0.5, 0.4, 0.5


# ----------------------------------------------------------------------------- independent reference


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_gradients(method, z, teacher, targets, alpha=ALPHA, beta=BETA, gamma=GAMMA, lam=LAM):
    """∂ℓ_t/∂z_t per row in float64, written from the equations (no autograd, no kd.losses).

    With L = KL(a‖b(q)) and g = ∂L/∂log q = −r, ∂L/∂z = q·Σr − r:
      noevo   KL(ỹ‖q):  r = ỹ                     → q − ỹ
      skew    KL(ỹ‖q̂):  r = ỹ·βq/q̂, q̂ = βq+(1−β)ỹ → q·Σr − r
      selfevo skew's gradient where d = KL(ỹ‖q) > Γ, noevo's elsewhere
      forward (1−λ)(q − y) + λ(q − p)
      selfevo_token: hard rows KL(sg(βq+(1−β)ỹ)‖q) → q − (βq+(1−β)ỹ) = (1−β)(q − ỹ)
    """
    q, p = softmax(z), softmax(teacher)
    y = np.eye(z.shape[1])[targets]
    y_mix = (1 - alpha) * y + alpha * p
    d = (y_mix * (np.log(y_mix) - np.log(q))).sum(1)
    plain = q - y_mix
    q_hat = beta * q + (1 - beta) * y_mix
    r = y_mix * beta * q / q_hat
    skewed = q * r.sum(1, keepdims=True) - r
    hard = (d > gamma)[:, None]
    grads = {
        "noevo": plain,
        "skew": skewed,
        "selfevo": np.where(hard, skewed, plain),
        "forward": (1 - lam) * (q - y) + lam * (q - p),
        "selfevo_token": np.where(hard, (1 - beta) * plain, plain),
    }
    return grads[method], d


def random_case(seed, n=24, vocab=7):
    generator = np.random.default_rng(seed)
    z = generator.normal(scale=2.0, size=(n, vocab))
    teacher = generator.normal(scale=3.0, size=(n, vocab))
    targets = generator.integers(0, vocab, size=n)
    return z, teacher, targets


@pytest.mark.parametrize("method", [m for m in ("noevo", "skew", "selfevo", "forward", "selfevo_token") if m in METHODS])
def test_token_gradient_norms_equal_closed_form(method):
    z, teacher, targets = random_case(0)
    expected, d = reference_gradients(method, z, teacher, targets)
    assert 0 < (d > GAMMA).sum() < len(d), "the case must hold hard and easy tokens"
    got = mechanism.token_gradients(method, torch.tensor(z), torch.tensor(teacher), torch.tensor(targets),
                                    kd_ratio=LAM, target_mix=ALPHA, beta=BETA, gamma=GAMMA)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.linalg.norm(expected, axis=1), rtol=1e-10, atol=1e-14)
    d_got = mechanism.token_difficulty(torch.tensor(z), torch.tensor(teacher), torch.tensor(targets), target_mix=ALPHA)
    np.testing.assert_allclose(d_got.numpy(), d, rtol=1e-6)  # compute_loss's token_stats are float32


def test_hand_computed_two_token_vocabulary():
    """V = 2, student and teacher uniform, target 0, α = β = 1/2: q = p = (1/2, 1/2), ỹ = (3/4, 1/4).
    noevo: q − ỹ = (−1/4, 1/4), norm √2/4. skew: q̂ = (5/8, 3/8), r = ỹ·q/(2q̂) = (3/10, 1/6),
    q·Σr − r = (−1/15, 1/15), norm √2/15. d = 3/4·log(3/2) + 1/4·log(1/2) ≈ 0.131 < Γ: selfevo = noevo."""
    z = torch.zeros(1, 2, dtype=torch.float64)
    targets = torch.tensor([0])
    norms = {m: float(mechanism.token_gradients(m, z, z, targets, kd_ratio=LAM, target_mix=ALPHA, beta=BETA,
                                                gamma=GAMMA)[0]) for m in ("noevo", "skew", "selfevo")}
    assert norms["noevo"] == pytest.approx(math.sqrt(2) / 4, rel=1e-12)
    assert norms["skew"] == pytest.approx(math.sqrt(2) / 15, rel=1e-12)
    assert norms["selfevo"] == pytest.approx(math.sqrt(2) / 4, rel=1e-12)
    d = float(mechanism.token_difficulty(z, z, targets, target_mix=ALPHA)[0])
    assert d == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)  # token_stats: float32


def test_frequency_buckets_and_d_bins_partition():
    counts = np.array([1, 1, 2, 3, 3, 3, 8, 8, 8, 8, 50, 50, 50, 50, 50, 50])
    edges = mechanism.frequency_bucket_edges(counts, n_buckets=4)
    assert edges == sorted(edges) and len(set(edges)) == len(edges)
    bucket = mechanism.frequency_bucket_index(counts, edges)
    assert set(bucket.tolist()) <= set(range(len(edges) + 1))
    for b in range(len(edges) + 1):  # buckets are [e_{b−1}, e_b): ranges ordered and disjoint
        inside = counts[bucket == b]
        if b > 0:
            assert (inside >= edges[b - 1]).all()
        if b < len(edges):
            assert (inside < edges[b]).all()
    assert (bucket[counts == 50] == len(edges)).all() and (bucket == len(edges)).sum() == 6  # the tied top
    d_edges = mechanism.d_bin_edges(GAMMA)
    assert GAMMA in d_edges and d_edges == sorted(d_edges)
    assert np.allclose(np.diff(np.log10(d_edges)), 1 / mechanism.D_BINS_PER_DECADE)
    d = np.array([0.0, 1e-9, GAMMA, np.nextafter(GAMMA, 1), 5.0, 1e6])
    bins = mechanism.d_bin_index(d, d_edges)
    gamma_bin = d_edges.index(GAMMA)
    assert bins[2] == gamma_bin and bins[3] == gamma_bin + 1  # d = Γ is easy, just above Γ is hard
    assert bins[0] == bins[1] == 0 and bins[-1] == len(d_edges)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run(tiny_models, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mechanism") / "out"
    summary = mechanism.main([
        "--teacher", tiny_models["teacher"], "--student", tiny_models["student"],
        "--train-file", str(demo_data / "train.jsonl"), "--steps", "2", "--batches", "2", "--batch-size", "8",
        "--lr", "1e-2", "--out", str(out)])
    return {"out": out, "summary": summary}


def test_end_to_end_writes_both_files(run):
    written = json.loads((run["out"] / "mechanism.json").read_text())
    assert written == json.loads(json.dumps(run["summary"]))
    assert (run["out"] / "mechanism.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run["out"].iterdir()) == ["mechanism.json", "mechanism.png"]
    settings = written["settings"]
    assert settings["gamma"] == GAMMA and settings["beta"] == BETA and settings["target_mix"] == ALPHA
    assert settings["methods"][0] == "noevo" and set(mechanism.DEFAULT_METHODS) <= set(settings["methods"])
    for method, runs in written["methods"].items():
        assert {"start", "end", "by_start_bin"} <= set(runs), method
        assert sum(row["tokens"] for row in runs["by_start_bin"]) == settings["tokens_measured"]
    teacher = written["teacher"]
    assert teacher["tokens"] == settings["tokens_measured"]
    assert 0 < teacher["mean_p_reference"] < 1 and 0 <= teacher["share_p_reference_above_0.9"] <= 1
    assert teacher["mean_entropy"] > 0


def test_teacher_confidence_by_hand():
    """Two tokens: p = [¾, ¼] with reference 0 (p_ref ¾), and p = [0.95, 0.05] with reference 0 (above 0.9)."""
    rows = [torch.tensor([[math.log(3.0), 0.0], [math.log(19.0), 0.0]])]
    stats = mechanism.teacher_confidence(rows, [torch.tensor([0, 0])])
    entropy = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert stats["mean_p_reference"] == pytest.approx((0.75 + 0.95) / 2, rel=1e-6)
    assert stats["share_p_reference_above_0.9"] == 0.5 and stats["tokens"] == 2
    assert stats["mean_entropy"] == pytest.approx((entropy(0.75) + entropy(0.95)) / 2, rel=1e-6)


def test_bins_and_buckets_partition_the_measured_tokens(run):
    summary = run["summary"]
    n = summary["settings"]["tokens_measured"]
    assert n > 0
    buckets = summary["frequency_buckets"]
    assert sum(b["tokens"] for b in buckets) == n
    filled = [b for b in buckets if b["tokens"]]
    assert all(a["max_count"] < b["min_count"] for a, b in zip(filled, filled[1:]))  # disjoint, rarest first
    for runs in summary["methods"].values():
        for when in ("start", "end"):
            measured = runs[when]
            assert measured["tokens"] == n
            assert sum(b["tokens"] for b in measured["d_bins"]) == n
            assert sum(b["tokens"] for b in measured["frequency_buckets"]) == n
            hard_tokens = sum(b["tokens"] for b in measured["d_bins"] if b["d_low"] >= GAMMA)
            assert hard_tokens == round(measured["hard_fraction"] * n)
            shares = [b["grad_sq_share"] for b in measured["d_bins"] if b["tokens"]]
            assert sum(shares) == pytest.approx(1.0)


def test_damping_ratios_follow_the_losses(run):
    """At step 0 every method sees the same student: noevo's ratio is 1, forward's too (λ = α makes
    its gradient q − ỹ), selfevo's is 1 on easy tokens and below 1 on hard ones, skew's below 1."""
    methods = run["summary"]["methods"]
    for method in ("noevo", "forward"):
        for b in methods[method]["start"]["d_bins"]:
            if b["tokens"]:
                assert b["ratio_to_noevo_mean"] == pytest.approx(1.0, rel=1e-5), method
    start = methods["selfevo"]["start"]
    if start["ratio_to_noevo_mean_easy"] is not None:
        assert start["ratio_to_noevo_mean_easy"] == pytest.approx(1.0, rel=1e-5)
    assert start["ratio_to_noevo_mean_hard"] < 1.0
    assert methods["skew"]["start"]["ratio_to_noevo_mean_hard"] < 1.0
    assert methods["skew"]["start"]["hard_fraction"] == start["hard_fraction"]  # d does not depend on the method


def test_bad_method_stops_with_a_message(tiny_models, demo_data, tmp_path):
    with pytest.raises(SystemExit, match="--methods .*bogus"):
        mechanism.main(["--teacher", tiny_models["teacher"], "--student", tiny_models["student"],
                        "--train-file", str(demo_data / "train.jsonl"), "--methods", "noevo,bogus",
                        "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the skewed loss during training


@pytest.mark.parametrize("method", ["selfevo", "skew", "noevo"])
def test_loss_and_pull_on_the_reference_equal_the_closed_form(method):
    """The pull on the reference token t: ỹ_t for KL(ỹ‖q) (noevo, selfevo's easy tokens), ỹ_t·βq_t/q̂_t
    for the skewed KL(ỹ‖q̂) (skew, selfevo's hard tokens), whose loss never exceeds −log(1−β)."""
    z, teacher, targets = random_case(7, n=40)
    measured = mechanism.token_loss_and_pull(method, torch.tensor(z), torch.tensor(teacher), torch.tensor(targets),
                                             kd_ratio=LAM, target_mix=ALPHA, beta=BETA, gamma=GAMMA)
    q, p = softmax(z), softmax(teacher)
    rows = np.arange(len(targets))
    y_mix = (1 - ALPHA) * np.eye(z.shape[1])[targets] + ALPHA * p
    q_hat = BETA * q + (1 - BETA) * y_mix
    d = (y_mix * (np.log(y_mix) - np.log(q))).sum(1)
    skewed = {"selfevo": d > GAMMA, "skew": np.ones_like(d, dtype=bool), "noevo": np.zeros_like(d, dtype=bool)}[method]
    pull = np.where(skewed, y_mix[rows, targets] * BETA * q[rows, targets] / q_hat[rows, targets],
                    y_mix[rows, targets])
    loss = np.where(skewed, (y_mix * (np.log(y_mix) - np.log(q_hat))).sum(1), d)
    assert np.array_equal(measured["hard"].numpy(), skewed if method != "noevo" else skewed)
    np.testing.assert_allclose(measured["pull_ref"].numpy(), pull, rtol=1e-9)
    np.testing.assert_allclose(measured["loss"].numpy(), loss, rtol=1e-9)
    np.testing.assert_allclose(measured["q_ref"].numpy(), q[rows, targets], rtol=1e-9)
    assert (measured["loss"].numpy()[skewed] <= -math.log(1 - BETA) + 1e-12).all()


def test_snapshots_measure_the_skewed_methods_during_training(tiny_models, demo_data, tmp_path):
    out = tmp_path / "out"
    summary = mechanism.main([
        "--teacher", tiny_models["teacher"], "--student", tiny_models["student"],
        "--train-file", str(demo_data / "train.jsonl"), "--methods", "selfevo,forward", "--steps", "4",
        "--snapshots", "2", "--batches", "1", "--batch-size", "8", "--lr", "1e-2", "--out", str(out)])
    written = json.loads((out / "collapse.json").read_text())
    assert written == json.loads(json.dumps(summary["collapse"]))
    assert list(written["methods"]) == ["selfevo"]  # noevo and forward have no skewed loss
    rows = written["methods"]["selfevo"]
    assert [row["step"] for row in rows] == [0, 2, 4]
    for row in rows:
        assert row["loss_bound"] == pytest.approx(math.log(2.0))
        assert 0.0 <= row["hard_fraction"] <= 1.0 and row["mean_d"] > 0
        if row["hard_fraction"] > 0:
            assert 0.0 < row["hard_loss_over_bound_mean"] <= 1.0 and 0.0 < row["hard_pull_ratio_median"] < 1.0
    assert (out / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--snapshots must be between 0 and --steps"):
        mechanism.main(["--teacher", tiny_models["teacher"], "--student", tiny_models["student"],
                        "--train-file", str(demo_data / "train.jsonl"), "--steps", "2", "--snapshots", "3",
                        "--out", str(tmp_path / "bad")])
