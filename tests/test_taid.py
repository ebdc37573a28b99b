"""TAID's moving t (--method taid, kd/taid.py): the rule by hand, its ends (t = 0: nothing to learn;
t = 1: forward KL), the t of a real run replayed from its logged losses, the same t for any
micro-batching, exact resume, bad values refused before a model loads.

    pytest tests/test_taid.py
"""

import json
import math
import shutil

import pytest
import torch

import train_kd
from kd.losses import compute_loss
from kd.taid import TaidSchedule
from run_helpers import metric_rows, small_files, weights
from test_losses import make_batch, reference


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("taid_files"))


def argv(models, train_file, out, *extra):
    return ["--method", "taid", "--student", models["student"], "--teacher", models["teacher"],
            "--train-file", str(train_file), "--output-dir", str(out), "--logging-steps", "1", "--seed", "3",
            *map(str, extra)]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------

def test_rule_by_hand_floor_adaptive_cap_and_state_round_trip():
    # α = 0.1: the linear floor binds. Step 1 stores J_1 only; step 2: δ = (2 − 1)/2, m = ½·0 + ½·½ = ¼,
    # floor 0.4 + 0.6·2/10 = 0.52 > 0.4 + 0.1·σ(¼)·0.6 = 0.434
    slow = TaidSchedule(t_start=0.4, t_end=1.0, alpha=0.1, momentum=0.5)
    assert slow.update(2.0, 1, 10) == 0.4
    assert slow.update(1.0, 2, 10) == pytest.approx(0.52, abs=1e-12)
    assert slow.momentum_value == pytest.approx(0.25, abs=1e-12)
    # α = 1: the adaptive step binds, then the cap t_end = 0.9
    fast = TaidSchedule(t_start=0.4, t_end=0.9, alpha=1.0, momentum=0.5)
    fast.update(2.0, 1, 10)
    t2 = 0.4 + sigmoid(0.25) * 0.6
    assert fast.update(1.0, 2, 10) == pytest.approx(t2, abs=1e-12)                          # 0.737 > floor 0.52
    t3 = t2 + sigmoid(0.375) * (1 - t2)                                                     # m = ½·¼ + ½·½
    assert fast.update(0.5, 3, 10) == pytest.approx(t3, abs=1e-12)
    assert fast.update(0.25, 4, 10) == 0.9                                                  # t3 + ... > 0.9: the cap
    assert fast.update(math.nan, 5, 10) == 0.9 and fast.previous_loss == 0.25               # a bad step: unchanged
    # a rising loss (δ < 0) slows the adaptive step but never lowers t
    rising = TaidSchedule(0.4, 1.0, 1.0, 0.0)
    rising.update(1.0, 1, 100)
    assert rising.update(3.0, 2, 100) == pytest.approx(0.4 + sigmoid(-2.0) * 0.6, abs=1e-12)
    state = json.loads(json.dumps(fast.state_dict()))
    other = TaidSchedule(0.4, 0.9, 1.0, 0.5)
    other.load_state_dict(state)
    assert other.state_dict() == fast.state_dict()


@pytest.mark.parametrize("chunk_size", [0, 4, None])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_taid_at_every_t_matches_the_reference_and_its_ends(t, chunk_size):
    """Against the float64 reference (interpolated raw logits); t = 1 is forward KL with λ = 1, t = 0 gives
    zero loss and zero gradient (the target is the detached student itself)."""
    student, teacher, labels = make_batch()
    student = student.clone().requires_grad_(True)
    loss, _ = compute_loss("taid", student, teacher, labels, taid_t=t, chunk_size=chunk_size)
    loss.backward()
    ref_loss, ref_grad, _, _ = reference("taid", student, teacher, labels, taid_t=t)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(student.grad, ref_grad, rtol=1e-6, atol=1e-12)
    if t == 1.0:
        other = student.detach().clone().requires_grad_(True)
        forward, _ = compute_loss("forward", other, teacher, labels, kd_ratio=1.0, chunk_size=chunk_size)
        forward.backward()
        torch.testing.assert_close(loss.detach(), forward.detach(), rtol=1e-10, atol=0)
        torch.testing.assert_close(student.grad, other.grad, rtol=1e-9, atol=1e-12)
    if t == 0.0:
        assert abs(loss.item()) < 1e-12 and student.grad.abs().max() < 1e-12


def test_without_a_step_t_is_t_start():
    student, teacher, labels = make_batch()
    at_start, _ = compute_loss("taid", student, teacher, labels, taid_t_start=0.3)
    explicit, _ = compute_loss("taid", student, teacher, labels, taid_t=0.3)
    assert at_start.item() == explicit.item()


# ---------------------------------------------------------------------------------------------
# train_kd.py --method taid
# ---------------------------------------------------------------------------------------------

def test_t_of_a_run_is_the_rule_replayed_on_its_logged_losses(tiny_models, files, tmp_path):
    """--logging-steps 1: each row's loss is its step's J; t of step n+1 follows from J_1..J_n."""
    out = tmp_path / "taid"
    train_kd.main(argv(tiny_models, files["train16"], out, "--batch-size", 4, "--micro-batch-size", 2,
                       "--max-steps", 8, "--lr", 3e-3, "--warmup-ratio", 0, "--taid-alpha", 0.5,
                       "--taid-momentum", 0.5))
    rows = metric_rows(out, "train")
    replay = TaidSchedule(0.4, 1.0, 0.5, 0.5)
    expected = []
    for row in rows:
        expected.append(replay.value)
        replay.update(row["loss"], row["step"], 8)
    assert [row["taid_t"] for row in rows] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["taid_t"] == rows[1]["taid_t"] == 0.4
    assert all(b >= a for a, b in zip(expected, expected[1:])) and expected[-1] > 0.4 + 0.6 * 6 / 8 - 1e-12
    config = json.loads((out / "config.json").read_text())
    assert (config["taid_t_start"], config["taid_t_end"], config["taid_alpha"], config["taid_momentum"]) == (
        0.4, 1.0, 0.5, 0.5)


def test_t_does_not_depend_on_micro_batching(tiny_models, files, tmp_path):
    run = ("--batch-size", 8, "--max-steps", 3, "--lr", 3e-3, "--warmup-ratio", 0, "--taid-alpha", 0.5)
    ts, finals = {}, {}
    for micro in (8, 2):
        out = tmp_path / f"m{micro}"
        train_kd.main(argv(tiny_models, files["train16"], out, *run, "--micro-batch-size", micro))
        ts[micro] = [row["taid_t"] for row in metric_rows(out, "train")]
        finals[micro] = weights(out / "final")
    assert ts[2] == pytest.approx(ts[8], rel=1e-5) and ts[8][2] > ts[8][1]
    for name, value in finals[8].items():
        torch.testing.assert_close(finals[2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_is_exact(tiny_models, files, tmp_path):
    run = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 5, "--lr", 3e-3, "--save-steps", 2,
           "--save-total-limit", 0, "--taid-alpha", 0.5)
    full = tmp_path / "full"
    train_kd.main(argv(tiny_models, files["train16"], full, *run))
    state = json.loads((full / "step_2" / train_kd.TRAINER_STATE).read_text())
    assert state["taid"]["t"] > 0.4 and state["taid"]["previous_loss"] > 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_2", stopped / "step_2")
    train_kd.main(argv(tiny_models, files["train16"], stopped, *run, "--resume-from-checkpoint", "latest"))
    resumed, uninterrupted = weights(stopped / "final"), weights(full / "final")
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    full_rows = {row["step"]: row["taid_t"] for row in metric_rows(full, "train")}
    assert {row["step"]: row["taid_t"] for row in metric_rows(stopped, "train")} == {s: full_rows[s] for s in (3, 4, 5)}


def test_start_above_end_is_refused_before_a_model_loads(tiny_models, files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_kd, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=r"--taid-t-start 0\.8 is above --taid-t-end 0\.5; t only rises"):
        train_kd.main(argv(tiny_models, files["train16"], tmp_path / "out", "--taid-t-start", 0.8,
                           "--taid-t-end", 0.5))
