"""On-policy distillation (train_kd.py --on-policy-ratio, kd/onpolicy.py): the choice of micro-batches,
the sampled micro-batches, one step checked against an independent recomputation (tokens and loss),
learning on an over-fit batch, exact resume, refusals, and the launch paths (DDP, ZeRO-3).

    pytest tests/test_onpolicy.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_kd
from kd.data import IGNORE_INDEX, TrainCollator, TranslationDataset
from kd.io import read_jsonl
from kd.losses import compute_loss
from kd.models import load_tokenizer
from kd.onpolicy import is_on_policy, prompt_lengths, sample_micro_batch, sampling_seed
from run_helpers import metric_rows, small_files, weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("onpolicy_files"))


def argv(models, train_file, out, *extra, method="jsd"):
    return ["--method", method, "--student", models["student"], "--teacher", models["teacher"],
            "--train-file", str(train_file), "--output-dir", str(out), "--logging-steps", "1", "--seed", "3",
            "--on-policy-max-new-tokens", "12", *map(str, extra)]


def first_batch(models, train_file, size):
    """The first micro-batch of step 1 as train_kd.py draws it (EpochSampler, seed 3, epoch 0)."""
    tokenizer = load_tokenizer(models["student"])
    dataset = TranslationDataset(read_jsonl(train_file), tokenizer, 512)
    sampler = train_kd.EpochSampler(dataset.lengths(), seed=3)
    sampler.set_epoch(0)
    return tokenizer, TrainCollator(tokenizer.pad_token_id)([dataset[i] for i in list(sampler)[:size]])


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------

def test_choice_of_micro_batches_is_deterministic_with_the_asked_share():
    draws = [is_on_policy(3, step, index, 0.3) for step in range(500) for index in range(4)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.04
    assert draws == [is_on_policy(3, step, index, 0.3) for step in range(500) for index in range(4)]
    assert draws != [is_on_policy(4, step, index, 0.3) for step in range(500) for index in range(4)]
    assert not any(is_on_policy(3, s, 0, 0.0) for s in range(100)) and all(is_on_policy(3, s, 0, 1.0) for s in range(100))


def test_sampled_micro_batch_keeps_prompts_and_is_reproducible(tiny_models, files):
    from transformers import AutoModelForCausalLM

    tokenizer, batch = first_batch(tiny_models, files["train8"], 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=12,
                  max_length=512, temperature=1.0)
    before = torch.get_rng_state()
    sampled = sample_micro_batch(model, batch, seed=sampling_seed(3, 0, 0, 0), **kwargs)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is not advanced
    again = sample_micro_batch(model, batch, seed=sampling_seed(3, 0, 0, 0), **kwargs)
    other = sample_micro_batch(model, batch, seed=sampling_seed(3, 1, 0, 0), **kwargs)
    assert all(torch.equal(sampled[k], again[k]) for k in sampled)
    assert not torch.equal(sampled["input_ids"], other["input_ids"])
    assert torch.equal(sampled["direction"], batch["direction"])
    for row, length in enumerate(prompt_lengths(batch["labels"])):
        assert prompt_lengths(sampled["labels"])[row] == length
        assert torch.equal(sampled["input_ids"][row, :length], batch["input_ids"][row, :length])
        response = sampled["labels"][row][sampled["labels"][row] != IGNORE_INDEX].tolist()
        assert 1 <= len(response) <= 12
        assert tokenizer.eos_token_id not in response[:-1]  # cut at (and including) the first EOS
        assert torch.equal(sampled["input_ids"][row, length:length + len(response)], torch.tensor(response))
    # --max-length caps the response: prompt + response fit
    longest_prompt = max(prompt_lengths(batch["labels"]))
    short = sample_micro_batch(model, batch, seed=1, **{**kwargs, "max_length": longest_prompt + 2})
    assert short["input_ids"].shape[1] <= longest_prompt + 2


def test_one_on_policy_step_equals_an_independent_recomputation(tiny_models, files, tmp_path):
    """Step 1 with every micro-batch on-policy: the tokens counted are the sampled ones, and the loss is
    jsd with λ = 1 on them (recomputed here from the models, the sample and compute_loss)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "one"
    train_kd.main(argv(tiny_models, files["train8"], out, "--batch-size", 4, "--micro-batch-size", 4, "--max-steps", 1,
                       "--on-policy-ratio", 1.0, "--kd-ratio", 0.5, "--jsd-beta", 0.3))
    row = metric_rows(out)[0]
    assert row["on_policy_fraction"] == 1.0

    tokenizer, batch = first_batch(tiny_models, files["train8"], 4)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    sampled = sample_micro_batch(student, batch, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, max_new_tokens=12, max_length=512,
                                 temperature=1.0, seed=sampling_seed(3, 0, 0, 0))
    targets = train_kd.shifted_targets(sampled["labels"])
    with torch.no_grad():
        logits = [m(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
                  for m in (student, teacher)]
    loss, stats = compute_loss("jsd", logits[0].double(), logits[1].double(), targets, kd_ratio=1.0, jsd_beta=0.3,
                               chunk_size=0)
    assert row["tokens"] == stats["tokens"] == int((targets != IGNORE_INDEX).sum())
    # JSD ≈ 4e-3 here is a difference of O(1) terms, each carrying float32's ~1e-7 rounding in training
    assert row["loss"] == pytest.approx(loss.item(), rel=0, abs=2e-6)
    assert loss.item() > 1e-4  # not trivially zero


@pytest.mark.parametrize("method", ["jsd", "reverse"])
def test_on_policy_learns_on_an_over_fit_batch(method, tiny_models, files, tmp_path):
    out = tmp_path / method
    train_kd.main(argv(tiny_models, files["train8"], out, "--batch-size", 8, "--micro-batch-size", 4, "--epochs", 10,
                       "--lr", 3e-3, "--warmup-ratio", 0, "--lr-scheduler", "constant_with_warmup",
                       "--on-policy-ratio", 1.0, method=method))
    losses = [row["loss"] for row in metric_rows(out)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_on_policy_resume_is_exact(tiny_models, files, tmp_path):
    run = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 5, "--lr", 3e-3, "--save-steps", 2,
           "--save-total-limit", 0, "--on-policy-ratio", 0.5, "--on-policy-temperature", 0.8)
    full = tmp_path / "full"
    train_kd.main(argv(tiny_models, files["train16"], full, *run, method="skew_teacher"))
    fractions = [row["on_policy_fraction"] for row in metric_rows(full)]
    assert 0.0 < sum(fractions) / len(fractions) < 1.0, fractions  # both kinds of micro-batches ran
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_2", stopped / "step_2")
    train_kd.main(argv(tiny_models, files["train16"], stopped, *run, "--resume-from-checkpoint", "latest",
                       method="skew_teacher"))
    resumed, uninterrupted = weights(stopped / "final"), weights(full / "final")
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    full_rows = {row["step"]: (row["loss"], row["tokens"]) for row in metric_rows(full)}
    assert {row["step"]: (row["loss"], row["tokens"]) for row in metric_rows(stopped)} == {s: full_rows[s] for s in (3, 4, 5)}


@pytest.mark.parametrize("extra, method, message", [
    (("--on-policy-ratio", "0.5"), "selfevo", "--on-policy-ratio 0.5 with --method selfevo: needs a loss that is "
                                              "defined on sampled tokens: forward, reverse, skew_teacher, jsd"),
    (("--on-policy-ratio", "0.5"), "noevo", "--on-policy-ratio 0.5 with --method noevo"),
    (("--on-policy-ratio", "1.5"), "jsd", "--on-policy-ratio 1.5: is a share of the micro-batches"),
    (("--on-policy-ratio", "1", "--on-policy-temperature", "0"), "jsd", "--on-policy-temperature 0.0"),
    (("--on-policy-ratio", "1", "--on-policy-max-new-tokens", "0"), "forward", "--on-policy-temperature 1.0 / "
                                                                               "--on-policy-max-new-tokens 0"),
    (("--jsd-beta", "1.2"), "jsd", "arguments: --jsd-beta must be a number in [0, 1], got 1.2"),
])
def test_bad_values_are_one_line_with_exit_status_2(extra, method, message, tiny_models, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_kd.main(argv(tiny_models, files["train8"], tmp_path / "out", "--batch-size", 8, *extra, method=method))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train_kd.py: {message}") and "\n" not in err, err


# ---------------------------------------------------------------------------------------------
# launch paths
# ---------------------------------------------------------------------------------------------

def launch(config, num_processes, args, log):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
               "--num_processes", str(num_processes), "--num_cpu_threads_per_process", "1", str(REPO / "train_kd.py"),
               *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config, processes", [("cpu.yaml", 2), ("deepspeed_zero3.yaml", 2)], ids=["ddp", "zero3"])
def test_on_policy_under_ddp_and_zero3(config, processes, tiny_models, files, tmp_path):
    out = tmp_path / "run"
    output = launch(config, processes, argv(tiny_models, files["train16"], out, "--batch-size", 8, "--micro-batch-size",
                                            2, "--max-steps", 2, "--lr", 3e-3, "--on-policy-ratio", 0.5),
                    tmp_path / "log.txt")
    if config.startswith("deepspeed"):
        assert "loss path: student logits" in output  # ZeRO-3: generation with synced_gpus, 2 ranks in step
        assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    rows = metric_rows(out)
    assert [row["step"] for row in rows] == [1, 2] and all(row["loss"] == row["loss"] for row in rows)
    assert (out / "COMPLETED").is_file()
