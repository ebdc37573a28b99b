"""Γ without tuning (--gamma auto, kd/gamma.py): the rule by hand, Γ_2 against d computed independently
from the models, the same Γ for any micro-batching and for 2 DDP processes, exact resume, learning on
an over-fit batch, bad values refused with one line and exit status 2.

    pytest tests/test_gamma_auto.py
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_kd
from kd.data import TrainCollator, TranslationDataset
from kd.gamma import AutoGamma, quantile
from kd.io import read_jsonl
from kd.losses import compute_loss
from kd.models import load_tokenizer
from run_helpers import metric_rows, small_files, weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("gamma_files"))


def argv(models, train_file, out, *extra, method="selfevo"):
    return ["--method", method, "--student", models["student"], "--teacher", models["teacher"],
            "--train-file", str(train_file), "--output-dir", str(out), "--logging-steps", "1", "--seed", "3",
            "--gamma", "auto", *map(str, extra)]


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------

def test_quantile_is_numpys_linear_quantile():
    values = torch.tensor([0.3, 5.0, 0.1, 2.0, 0.7, 1.1, 0.0])
    for q in (0.1, 0.25, 0.5, 0.9, 0.99):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values.numpy().astype(np.float64), q)), abs=1e-12)
    assert quantile(torch.tensor([2.5]), 0.3) == 2.5
    assert quantile(torch.tensor([1.0, 3.0]), 0.5) == 2.0  # by hand: halfway between the two


def test_rule_by_hand_and_state_round_trip():
    rule = AutoGamma(quantile_q=0.5, momentum=0.75)
    assert rule.value == math.inf  # step 1: every token easy
    assert rule.update(torch.tensor([1.0, 3.0, float("nan")])) == 2.0          # the first measurement: median 2
    assert rule.update(torch.tensor([0.0, 4.0, 6.0])) == 0.75 * 2.0 + 0.25 * 4.0  # EMA: 2.5
    assert rule.update(torch.tensor([float("nan")])) == 2.5                     # nothing finite: unchanged
    state = json.loads(json.dumps(rule.state_dict()))
    other = AutoGamma(0.5, 0.75)
    other.load_state_dict(state)
    assert (other.value, other.steps_measured) == (2.5, 2)
    fresh = AutoGamma(0.5, 0.75)
    fresh.load_state_dict(json.loads(json.dumps(AutoGamma(0.5, 0.75).state_dict())))
    assert fresh.value == math.inf and fresh.steps_measured == 0
    for q, m in ((0.0, 0.9), (1.0, 0.9), (0.5, 1.0), (0.5, -0.1)):
        with pytest.raises(ValueError):
            AutoGamma(q, m)


# ---------------------------------------------------------------------------------------------
# train_kd.py --gamma auto
# ---------------------------------------------------------------------------------------------

def test_gamma_auto_learns_and_gamma_2_is_the_median_of_step_1(tiny_models, files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "auto"
    train_kd.main(argv(tiny_models, files["train8"], out, "--batch-size", 8, "--micro-batch-size", 4, "--epochs", 8,
                       "--lr", 3e-3, "--warmup-ratio", 0, "--lr-scheduler", "constant_with_warmup",
                       "--gamma-momentum", 0.5))
    rows = metric_rows(out)
    losses = [row["loss"] for row in rows]
    assert sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0], losses  # one fixed batch: it learns
    assert rows[0]["gamma"] is None and rows[0]["hard_fraction"] == 0.0  # Γ_1 = +inf: every token easy
    assert all(row["gamma"] > 0 for row in rows[1:])
    assert 0.0 < rows[1]["hard_fraction"] < 1.0

    # Independent: d = KL(ỹ‖q) of the initial student on the step-1 batch, its median is Γ_2.
    tokenizer = load_tokenizer(tiny_models["student"])
    dataset = TranslationDataset(read_jsonl(files["train8"]), tokenizer, 512)
    batch = TrainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    targets = train_kd.shifted_targets(batch["labels"])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tiny_models[role]).double()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for role in ("student", "teacher")]
    _, stats = compute_loss("noevo", logits[0], logits[1], targets, target_mix=0.5, chunk_size=0, token_stats=True)
    d = stats["token_difficulty"][targets != -100]
    assert rows[1]["gamma"] == pytest.approx(float(np.quantile(d.numpy(), 0.5)), rel=1e-4)
    # Γ_3 = 0.5·Γ_2 + 0.5·median(d at step 2): between the two, and recorded with the run
    config = json.loads((out / "config.json").read_text())
    assert (config["gamma"], config["gamma_quantile"], config["gamma_momentum"]) == ("auto", 0.5, 0.5)


def test_gamma_auto_does_not_depend_on_micro_batching(tiny_models, files, tmp_path):
    run = ("--batch-size", 8, "--max-steps", 3, "--lr", 3e-3, "--warmup-ratio", 0)
    gammas, finals = {}, {}
    for micro in (8, 2):
        out = tmp_path / f"m{micro}"
        train_kd.main(argv(tiny_models, files["train16"], out, *run, "--micro-batch-size", micro))
        gammas[micro] = [row["gamma"] for row in metric_rows(out)]
        finals[micro] = weights(out / "final")
    assert gammas[8][0] is None and gammas[2][0] is None
    assert gammas[2][1:] == pytest.approx(gammas[8][1:], rel=1e-5)
    for name, value in finals[8].items():
        torch.testing.assert_close(finals[2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_gamma_auto_resume_is_exact(tiny_models, files, tmp_path):
    run = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 5, "--lr", 3e-3, "--save-steps", 2,
           "--save-total-limit", 0, "--method", "selfevo_token")
    full = tmp_path / "full"
    train_kd.main(argv(tiny_models, files["train16"], full, *run))
    state = json.loads((full / "step_2" / train_kd.TRAINER_STATE).read_text())
    assert state["auto_gamma"]["steps_measured"] == 2 and state["auto_gamma"]["gamma"] > 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_2", stopped / "step_2")
    train_kd.main(argv(tiny_models, files["train16"], stopped, *run, "--resume-from-checkpoint", "latest"))
    resumed, uninterrupted = weights(stopped / "final"), weights(full / "final")
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    full_rows = {row["step"]: row["gamma"] for row in metric_rows(full)}
    assert {row["step"]: row["gamma"] for row in metric_rows(stopped)} == {s: full_rows[s] for s in (3, 4, 5)}


@pytest.mark.parametrize("extra, message", [
    (("--method", "forward"), "--gamma auto with --method forward: sets the threshold of selfevo and selfevo_token"),
    (("--top-k", "0.5"), "--gamma auto with --method selfevo and --top-k: sets the threshold"),
    (("--gamma-quantile", "1.5"), "arguments: --gamma-quantile must lie in (0, 1), got 1.5"),
    (("--gamma-momentum", "1"), "arguments: --gamma-momentum must lie in [0, 1), got 1.0"),
])
def test_bad_values_are_one_line_with_exit_status_2(extra, message, tiny_models, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_kd.main(argv(tiny_models, files["train8"], tmp_path / "out", "--batch-size", 8, *extra))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train_kd.py: {message}") and "\n" not in err, err


def test_gamma_options_without_auto_and_a_bad_gamma_are_refused(tiny_models, files, tmp_path, capsys):
    base = argv(tiny_models, files["train8"], tmp_path / "out", "--batch-size", 8)
    fixed = [item for item in base if item != "auto"]
    fixed[fixed.index("--gamma")] = "--gamma-quantile"
    fixed.insert(fixed.index("--gamma-quantile") + 1, "0.3")
    with pytest.raises(SystemExit) as stop:
        train_kd.main(fixed)
    assert stop.value.code == 2 and "only apply to --gamma auto" in capsys.readouterr().err
    bad = list(base)
    bad[bad.index("auto")] = "often"
    with pytest.raises(SystemExit) as stop:
        train_kd.main(bad)
    assert stop.value.code == 2 and "expected a number or 'auto', got 'often'" in capsys.readouterr().err


@pytest.mark.slow
def test_gamma_auto_two_ddp_processes_match_one(tiny_models, files, tmp_path):
    import os

    run = ("--batch-size", 8, "--max-steps", 3, "--lr", 3e-3, "--warmup-ratio", 0)
    ddp = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", "--num_cpu_threads_per_process",
               "1", str(REPO / "train_kd.py"), *argv(tiny_models, files["train16"], ddp, *run, "--micro-batch-size", 2)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    single = tmp_path / "single"
    train_kd.main(argv(tiny_models, files["train16"], single, *run, "--micro-batch-size", 8))
    ddp_gammas = [row["gamma"] for row in metric_rows(ddp)]
    single_gammas = [row["gamma"] for row in metric_rows(single)]
    assert ddp_gammas[0] is None and ddp_gammas[1:] == pytest.approx(single_gammas[1:], rel=1e-5)
