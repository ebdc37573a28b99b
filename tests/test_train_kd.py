"""train_kd.py in-process (main([...])) on the tiny Llamas: every method learns, the files promised
are written, micro-batching does not change the update, resume is exact, bad input fails early."""

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import train_kd
from kd.data import IGNORE_INDEX, TrainCollator, TranslationDataset
from kd.io import read_jsonl
from kd.losses import KD_METHODS, METHODS, TARGET_MIX_METHODS
from kd.methods import HYPERPARAMETERS, methods_reading, range_text
from kd.models import load_tokenizer, tiny_llama, train_tokenizer
from run_helpers import metric_rows, small_files, weights

TRAIN_KEYS = {"type", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "steps_in_window"}
RESULT_KEYS = {"method", "hyperparameters", "changed_args", "final_valid_loss", "best_valid_loss", "best_step", "steps", "epochs",
               "train_tokens", "train_seconds", "tokens_per_s", "dropped_too_long", "final_dir", "best_dir",
               "stopped_early", "trainable_parameters", "total_parameters", "best_metric", "best_score", "final_score",
               "collapse_warning"}


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    """Small train/valid files: 8 training examples (one fixed batch), 12, and 8 validation examples."""
    return small_files(demo_data, tmp_path_factory.mktemp("train_kd_files"))


def train(models, train_file, output_dir, method="sft", *extra, valid_file=None):
    argv = ["--method", method, "--student", models["student"], "--train-file", str(train_file),
            "--output-dir", str(output_dir), "--logging-steps", "1", "--seed", "3", *map(str, extra)]
    if method != "sft":
        argv += ["--teacher", models["teacher"]]
    if valid_file:
        argv += ["--valid-file", str(valid_file)]
    return train_kd.main(argv)


def checkpoints(output_dir):
    return sorted(p.name for p in Path(output_dir).iterdir() if train_kd.CHECKPOINT_NAME.match(p.name))


# ---------------------------------------------------------------------------------------------
# every method learns, and the outputs are what other scripts read
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_writes_outputs(method, tiny_models, files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    # 8 examples = one batch: every step sees the same batch, so the loss must go down. taid's target
    # moves with t (tests/test_taid.py): held at t_start here, so that its losses compare across steps.
    fixed_t = ("--taid-t-end", 0.4) if method == "taid" else ()
    results = train(tiny_models, files["train8"], out, method, "--batch-size", 8, "--micro-batch-size", 4,
                    "--epochs", 8, "--lr", 3e-3, "--warmup-ratio", 0, "--lr-scheduler", "constant_with_warmup",
                    "--save-total-limit", 2, *fixed_t, valid_file=files["valid"])

    train_rows = metric_rows(out, "train")
    assert [row["step"] for row in train_rows] == list(range(1, 9))
    losses = [row["loss"] for row in train_rows]
    assert sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0], losses

    directions = sorted({row["direction"] for row in read_jsonl(files["train8"])})
    for row in train_rows:
        expected = set(TRAIN_KEYS)
        if method in KD_METHODS:
            expected |= {"beta", "hard_fraction"} | {f"hard_fraction/{d}" for d in directions}
        if method in TARGET_MIX_METHODS:
            expected |= {"mean_difficulty"} | {f"mean_difficulty/{d}" for d in directions}
        if method in train_kd.HARD_TOKEN_METHODS:  # skew and the selecting methods: d of the hard tokens
            expected |= {"mean_difficulty_hard"}
        if method == "taid":
            expected |= {"taid_t"}
            assert row["taid_t"] == 0.4
        assert set(row) == expected
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["grad_norm"] > 0
        assert row["steps_in_window"] == 1  # --logging-steps 1
    if method == "skew":
        assert all(row["hard_fraction"] == 1.0 for row in train_rows)
    if method == "atkd":  # the median split: at least half of each call's tokens (the lower median's ties), not all
        assert all(0.5 <= row["hard_fraction"] < 1.0 for row in train_rows)
    if method in ("forward", "reverse", "noevo", "skew_teacher"):
        assert all(row["hard_fraction"] == 0.0 for row in train_rows)

    valid_rows = metric_rows(out, "valid")  # one per epoch end (8 epochs of one step)
    assert [row["step"] for row in valid_rows] == list(range(1, 9))
    valid_directions = sorted({row["direction"] for row in read_jsonl(files["valid"])})
    assert set(valid_rows[0]) == {"type", "step", "epoch", "valid_loss"} | {f"valid_loss/{d}" for d in valid_directions}

    saved = json.loads((out / "all_results.json").read_text())
    assert set(saved) == RESULT_KEYS and saved == json.loads(json.dumps(results))
    assert saved["method"] == method and saved["steps"] == 8 and saved["epochs"] == 8.0
    assert saved["final_valid_loss"] == valid_rows[-1]["valid_loss"]
    assert saved["best_valid_loss"] == min(row["valid_loss"] for row in valid_rows)
    # --best-metric loss (the default): best/ is the lowest validation loss
    assert saved["best_metric"] == "loss" and saved["best_score"] == saved["best_valid_loss"]
    assert saved["final_score"] == saved["final_valid_loss"]
    assert saved["train_tokens"] == sum(row["tokens"] for row in train_rows)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["gradient_accumulation_steps"] == 2
    assert config["student_loss_path"] == "hidden"
    assert (out / "COMPLETED").is_file()

    # final/ and best/ load with transformers; the checkpoints hold the student only
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    student_keys = set(model.state_dict())
    assert set(weights(out / "best")) == set(weights(out / "final")) == student_keys
    assert checkpoints(out) == ["epoch_7", "epoch_8"]  # --save-total-limit 2
    for checkpoint in ("epoch_7", "epoch_8"):
        assert sorted(p.name for p in (out / checkpoint).glob("model*")) == ["model.safetensors"]
        assert set(weights(out / checkpoint)) <= student_keys
        shapes = {k: tuple(v.shape) for k, v in weights(out / checkpoint).items()}
        assert shapes == {k: tuple(v.shape) for k, v in weights(out / "final").items() if k in shapes}


def test_progressive_beta_schedule(tiny_models, files, tmp_path):
    assert train_kd.beta_at(0, 5, 0.5, 0.0) == 0.5
    assert train_kd.beta_at(2, 5, 0.5, 0.0) == 0.25
    assert train_kd.beta_at(4, 5, 0.5, 0.0) == 0.0
    assert train_kd.beta_at(3, 5, 0.2, 1.0) == pytest.approx(0.8)
    assert train_kd.beta_at(3, 5, 0.5) == 0.5
    assert train_kd.beta_at(0, 1, 0.5, 0.0) == 0.5

    out = tmp_path / "beta"
    train(tiny_models, files["train8"], out, "selfevo", "--batch-size", 4, "--micro-batch-size", 4, "--epochs", 2,
          "--beta", 0.5, "--beta-end", 0.0)
    assert [row["beta"] for row in metric_rows(out, "train")] == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])


# ---------------------------------------------------------------------------------------------
# exact gradient accumulation
# ---------------------------------------------------------------------------------------------

# With AdamW's first step, w' = w - lr * g / (|g| + eps); with eps = lr = 1e3 and |g| << eps, the
# update is (almost exactly) -g: the weights after one step show the gradient itself.
ONE_STEP = ("--batch-size", 8, "--max-steps", 1, "--lr", 1e3, "--adam-epsilon", 1e3, "--warmup-ratio", 0,
            "--max-grad-norm", 0, "--weight-decay", 0)


def one_step_update(models, train_file, out, method, micro):
    train(models, train_file, out, method, *ONE_STEP, "--micro-batch-size", micro)
    return weights(out / "final")


def test_gradient_accumulation_is_exact_sft(tiny_models, files, tmp_path):
    from transformers import AutoModelForCausalLM

    updates = {micro: one_step_update(tiny_models, files["train12"], tmp_path / f"m{micro}", "sft", micro)
               for micro in (8, 1, 2)}  # 1x8, 8x1, 4x2 micro-batches
    for micro in (1, 2):
        for name, value in updates[8].items():
            torch.testing.assert_close(updates[micro][name], value, rtol=0, atol=1e-6, msg=f"{micro}: {name}")

    # Independent reference: the gradient of the mean token CE over the step's 8 examples.
    tokenizer = load_tokenizer(tiny_models["student"])
    dataset = TranslationDataset(read_jsonl(files["train12"]), tokenizer, 512)
    sampler = train_kd.EpochSampler(dataset.lengths(), seed=3)
    sampler.set_epoch(0)
    batch = TrainCollator(tokenizer.pad_token_id)([dataset[i] for i in list(sampler)[:8]])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = train_kd.shifted_targets(batch["labels"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    changed = 0
    for name, param in model.named_parameters():
        expected = param.detach() - 1e3 * param.grad / (param.grad.abs() + 1e3)
        torch.testing.assert_close(updates[8][name], expected, rtol=0, atol=2e-6, msg=name)
        changed += int((updates[8][name] != param.detach()).sum())
    assert changed > 1000


def test_gradient_accumulation_is_exact_kd(tiny_models, files, tmp_path):
    big = one_step_update(tiny_models, files["train12"], tmp_path / "m8", "selfevo", 8)
    small = one_step_update(tiny_models, files["train12"], tmp_path / "m1", "selfevo", 1)
    for name, value in big.items():
        torch.testing.assert_close(small[name], value, rtol=0, atol=1e-6, msg=name)
    initial = weights(tiny_models["student"])
    assert sum(int((big[name] != value).sum()) for name, value in initial.items()) > 1000


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

def test_resume_gives_the_uninterrupted_weights(tiny_models, files, tmp_path):
    # 12 examples, batch 4: 3 steps per epoch; 5 steps cross the epoch boundary after the resume point.
    args = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 5, "--lr", 3e-3, "--save-steps", 2,
            "--save-total-limit", 0)
    full = tmp_path / "full"
    train(tiny_models, files["train12"], full, "selfevo", *args, valid_file=files["valid"])
    assert checkpoints(full) == ["epoch_1", "step_2", "step_4"]

    # A run that stopped after step 2: only its checkpoint is left.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_2", stopped / "step_2")
    results = train(tiny_models, files["train12"], stopped, "selfevo", *args, "--resume-from-checkpoint", "latest",
                    valid_file=files["valid"])
    assert results["steps"] == 5
    resumed, uninterrupted = weights(stopped / "final"), weights(full / "final")
    assert set(resumed) == set(uninterrupted)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    full_rows = {row["step"]: row["loss"] for row in metric_rows(full, "train")}
    assert {row["step"]: row["loss"] for row in metric_rows(stopped, "train")} == {s: full_rows[s] for s in (3, 4, 5)}

    # `latest` on a completed run does nothing and returns its results
    again = train(tiny_models, files["train12"], stopped, "selfevo", *args, "--resume-from-checkpoint", "latest")
    assert again == json.loads((stopped / "all_results.json").read_text())


def test_early_stopping_stops_after_patience_validations_and_stays_stopped(tiny_models, files, tmp_path):
    # lr 0: the validation loss never improves after the first validation; patience 2 with a
    # validation every step stops at step 3, the end of epoch 1, whatever --epochs says.
    args = ("--batch-size", 4, "--micro-batch-size", 4, "--epochs", 10, "--lr", 0.0, "--eval-steps", 1,
            "--early-stopping-patience", 2)
    out = tmp_path / "stopped"
    results = train(tiny_models, files["train12"], out, "selfevo_token", *args, valid_file=files["valid"])
    assert (results["steps"], results["stopped_early"], results["best_step"]) == (3, True, 1)
    assert [row["step"] for row in metric_rows(out, "valid")] == [1, 2, 3]
    # killed after the stopping epoch's checkpoint: the resumed run stops again at once
    shutil.rmtree(out / "final")
    (out / "COMPLETED").unlink()
    again = train(tiny_models, files["train12"], out, "selfevo_token", *args, "--resume-from-checkpoint", "latest",
                  valid_file=files["valid"])
    assert (again["steps"], again["stopped_early"]) == (3, True)
    # without patience the same run goes on to the end
    full = train(tiny_models, files["train12"], tmp_path / "full", "sft", "--batch-size", 4, "--micro-batch-size", 4, "--epochs", 2,
                 "--lr", 0.0, "--eval-steps", 1, valid_file=files["valid"])
    assert (full["steps"], full["stopped_early"]) == (6, False)
    # not before --early-stopping-min-epochs: patience is exhausted at step 3, the stop waits for epoch 2
    late = train(tiny_models, files["train12"], tmp_path / "late", "sft", *args, "--early-stopping-min-epochs", 2,
                 valid_file=files["valid"])
    assert (late["steps"], late["stopped_early"], late["best_step"]) == (6, True, 1)


TIMING = ("tokens_per_s",)


def untimed(output_dir):
    """Every metrics.jsonl row, in order, without its timing fields."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def full_run(tiny_models, files, tmp_path_factory):
    """An uninterrupted selfevo run: 6 steps over two epochs of 3, a row every 4 steps, step_2/step_4 saved."""
    out = tmp_path_factory.mktemp("full_run") / "run"
    train(tiny_models, files["train12"], out, "selfevo", *RESUMABLE, valid_file=files["valid"])
    return out


RESUMABLE = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 6, "--lr", 3e-3, "--save-steps", 2,
             "--save-total-limit", 0, "--logging-steps", 4, "--lr-scheduler", "constant_with_warmup",
             "--warmup-ratio", 0)


def stopped_copy(full, dest, checkpoint, rows_up_to=None, tail=""):
    """The run folder as a kill would leave it: one checkpoint, metrics rows up to a step (+ a torn tail)."""
    dest.mkdir()
    shutil.copytree(full / checkpoint, dest / checkpoint)
    shutil.copy(full / "config.json", dest / "config.json")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if rows_up_to is None or json.loads(line)["step"] <= rows_up_to]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept) + tail)
    return dest


def test_kill_during_final_save_then_resume_logs_the_uninterrupted_rows(tiny_models, files, tmp_path, full_run):
    # Killed while writing final/: every checkpoint and every row is there, the results are not.
    stopped = tmp_path / "stopped"
    shutil.copytree(full_run, stopped, ignore=shutil.ignore_patterns("final", "all_results.json", "COMPLETED"))
    results = train(tiny_models, files["train12"], stopped, "selfevo", *RESUMABLE, "--resume-from-checkpoint",
                    "latest", valid_file=files["valid"])
    assert untimed(stopped) == untimed(full_run)  # no second valid row at the last step
    assert results["final_valid_loss"] == json.loads((full_run / "all_results.json").read_text())["final_valid_loss"]


def test_resume_inside_a_logging_window_logs_the_uninterrupted_rows(tiny_models, files, tmp_path, full_run, capsys):
    # Killed after step 3 (rows up to step 3 written; the last line cut by the kill): resume from step_2,
    # inside the window of steps 1-4, whose row must still cover 4 steps.
    stopped = stopped_copy(full_run, tmp_path / "stopped", "step_2", rows_up_to=3, tail='{"type": "train", "st')
    train(tiny_models, files["train12"], stopped, "selfevo", *RESUMABLE, "--resume-from-checkpoint", "latest",
          valid_file=files["valid"])
    assert "metrics.jsonl:" in capsys.readouterr().err  # the torn line was dropped with a notice
    rows = untimed(stopped)
    assert rows == untimed(full_run)
    assert [row["steps_in_window"] for row in rows if row["type"] == "train"] == [4, 2]


def test_resume_with_changed_arguments_is_an_error_unless_allowed(tiny_models, files, tmp_path, full_run, capsys):
    stopped = stopped_copy(full_run, tmp_path / "stopped", "step_2", rows_up_to=2)
    changed = [*RESUMABLE, "--lr", 1e-3]
    with pytest.raises(SystemExit, match=r"step_2: saved with other arguments: --method selfevo -> forward; "
                                         r"--lr 0\.003 -> 0\.001; resume with the checkpoint's values") as stop:
        train(tiny_models, files["train12"], stopped, "forward", *changed, "--resume-from-checkpoint", "latest",
              valid_file=files["valid"])
    assert stop.value.code == 2
    assert not (stopped / "final").exists()

    results = train(tiny_models, files["train12"], stopped, "selfevo", *changed, "--resume-from-checkpoint", "latest",
                    "--allow-changed-args", valid_file=files["valid"])
    record = [{"step": 2, "changes": {"lr": [3e-3, 1e-3]}}]
    assert json.loads((stopped / "config.json").read_text())["changed_args"] == record
    assert results["changed_args"] == record
    assert "--lr 0.003 -> 0.001 from step 2 on" in capsys.readouterr().out
    assert [row["lr"] for row in metric_rows(stopped, "train")] == [1e-3, 1e-3]  # steps 3 and 4 used the new lr
    assert [row["lr"] for row in metric_rows(full_run, "train")] == [3e-3, 3e-3]


def test_default_keeps_only_the_latest_checkpoint(tiny_models, files, tmp_path):
    out = tmp_path / "run"
    train(tiny_models, files["train8"], out, "sft", "--batch-size", 4, "--micro-batch-size", 4, "--epochs", 3,
          valid_file=files["valid"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "epoch_3", "final"]


def test_configuration_error_is_one_line_with_exit_code_2(tiny_models, files, tmp_path, repo_root):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(repo_root / "train_kd.py"), "--method", "forward", "--student", tiny_models["student"],
         "--train-file", str(files["train12"]), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("train_kd.py: --method forward: distils from a teacher; "
                                     "pass --teacher PATH or --teacher-cache DIR (only sft runs without one)")
    result = subprocess.run(
        [sys.executable, str(repo_root / "train_kd.py"), "--method", "sft", "--student", tiny_models["student"],
         "--train-file", str(files["train12"]), "--output-dir", str(tmp_path / "out"), "--kd-ratio", "1.5"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("train_kd.py: arguments: --kd-ratio must be a number in [0, 1], got 1.5; "
                                     "see train_kd.py --help")


# ---------------------------------------------------------------------------------------------
# faults and bad input
# ---------------------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_models, files, tmp_path):
    out = tmp_path / "nan"
    # lr 1e30: the first step is finite and throws the weights to ~1e30; every later loss is NaN/inf.
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(RuntimeError, match="non-finite steps in a row"):
        train(tiny_models, files["train8"], out, "sft", "--batch-size", 4, "--micro-batch-size", 4,
              "--max-steps", 10, "--lr", 1e30, "--warmup-ratio", 0, "--save-steps", 1, "--max-bad-steps", 2)
    assert checkpoints(out) == ["step_1"]  # no checkpoint after a bad step
    assert (out / "step_1" / train_kd.TRAINER_STATE).is_file()
    assert not (out / "COMPLETED").exists() and not (out / "final").exists()
    assert [row["step"] for row in metric_rows(out, "train")] == [1]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_kd, "load_model", refuse)


@pytest.fixture(scope="module")
def foreign_teacher(tmp_path_factory):
    """A tiny Llama whose tokenizer was trained on other text (a different vocabulary)."""
    folder = tmp_path_factory.mktemp("foreign_teacher")
    tokenizer = train_tokenizer(["completely different words here", "zebra quartz fjord"] * 50, 300)
    tiny_llama(tokenizer, 1, 32, 2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", [
    "missing_student", "missing_teacher_path", "kd_without_teacher", "missing_train_file", "malformed_train_file",
    "empty_train_file", "missing_valid_file", "indivisible_batch", "batch_larger_than_data", "foreign_teacher",
    "bad_resume_path", "resume_with_another_batch_size", "output_dir_holds_a_run"])
def test_bad_input_fails_early_naming_the_argument(case, tiny_models, files, tmp_path, no_model_loading,
                                                   foreign_teacher):
    student, teacher = tiny_models["student"], tiny_models["teacher"]
    train_file, out = str(files["train12"]), str(tmp_path / "out")
    base = {"--method": "selfevo", "--student": student, "--teacher": teacher, "--train-file": train_file,
            "--output-dir": out, "--batch-size": "4", "--micro-batch-size": "2"}
    code, pattern = 2, None  # 2: a wrong command line; 1: a bad input file (as every script)
    if case == "missing_student":
        base["--student"], pattern = str(tmp_path / "nope"), "--student"
    elif case == "missing_teacher_path":
        base["--teacher"], pattern = str(tmp_path / "nope"), "--teacher"
    elif case == "kd_without_teacher":
        del base["--teacher"]
        pattern = "--teacher"
    elif case == "missing_train_file":
        base["--train-file"], code, pattern = str(tmp_path / "none.jsonl"), 1, "--train-file .*none.jsonl: no such file"
    elif case == "malformed_train_file":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(Path(train_file).read_text().splitlines()[0] + "\n{not json\n")
        base["--train-file"], code, pattern = str(bad), 1, r"--train-file .*bad\.jsonl:2: invalid JSON"
    elif case == "empty_train_file":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        base["--train-file"], code, pattern = str(empty), 1, "--train-file .*empty.jsonl: no rows"
    elif case == "missing_valid_file":
        base["--valid-file"], code, pattern = str(tmp_path / "none.jsonl"), 1, "--valid-file"
    elif case == "indivisible_batch":
        base["--batch-size"], base["--micro-batch-size"], pattern = "6", "4", "--batch-size 6: .*--micro-batch-size 4"
    elif case == "batch_larger_than_data":
        base["--batch-size"], pattern = "16", "--batch-size 16"
    elif case == "foreign_teacher":
        base["--teacher"], pattern = foreign_teacher, "--teacher .*tokenizer"
    elif case == "bad_resume_path":
        base["--resume-from-checkpoint"], pattern = str(tmp_path), "--resume-from-checkpoint"
    elif case == "resume_with_another_batch_size":
        checkpoint = Path(out) / "step_2"
        checkpoint.mkdir(parents=True)
        (checkpoint / train_kd.TRAINER_STATE).write_text(json.dumps(
            {"global_step": 2, "batch_size": 8, "seed": 42, "train_examples": 12}))
        base["--resume-from-checkpoint"], base["--seed"] = "latest", "42"
        pattern = "--resume-from-checkpoint .*step_2: saved with other arguments: --batch-size 8 -> 4; batch_size"
    elif case == "output_dir_holds_a_run":
        (Path(out) / "final").mkdir(parents=True)
        pattern = "--output-dir"
    argv = [item for pair in base.items() for item in pair]
    with pytest.raises(SystemExit, match=pattern) as stop:
        train_kd.main(argv)
    assert str(stop.value).startswith("train_kd.py: ") and "\n" not in str(stop.value)
    assert getattr(stop.value, "code") == (str(stop.value) if code == 1 else code)


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_every_hyperparameter_out_of_its_range_is_refused_before_a_model_loads(name, tiny_models, files, tmp_path,
                                                                             no_model_loading):
    """Each flag of kd/methods.py's LossConfig, set just outside its range, stops with the flag and the range."""
    meta = HYPERPARAMETERS[name].metadata
    if meta["low"] == -math.inf and meta["high"] == math.inf:
        bad = "nan"
    else:
        bad = f"{meta['high'] + 0.5:g}" if meta["high"] != math.inf else f"{meta['low'] - 0.5:g}"
    method = methods_reading(name)[0]
    flag = "--" + name.replace("_", "-")
    argv = ["--method", method, "--student", tiny_models["student"], "--teacher", tiny_models["teacher"],
            "--train-file", str(files["train12"]), "--output-dir", str(tmp_path / "out"), flag, bad]
    with pytest.raises(SystemExit, match=re.escape(flag) + ".*" + re.escape(bad)) as stop:
        train_kd.main(argv)
    message = str(stop.value)
    assert range_text(name) in message if range_text(name) != "any number" else "finite" in message


def test_accumulation_steps_and_help():
    assert train_kd.accumulation_steps(128, 4, 8) == 4
    with pytest.raises(SystemExit, match="--batch-size 128: .*--micro-batch-size 3"):
        train_kd.accumulation_steps(128, 3, 8)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        train_kd.parse_args(["--help"])
    help_text = " ".join(buffer.getvalue().split())
    for symbol in ("λ of Eq. 3", "λ (α) of Eq. 4", "β of Eq. 6", "Γ of Eq. 8", "β' of Eq. 10", "top K"):
        assert symbol in help_text, symbol
    assert "prose" in help_text


def test_full_disk_during_a_checkpoint_says_so_and_names_the_checkpoint_to_resume(tiny_models, files, small_tmpfs):
    # One checkpoint of the tiny student takes ~600 kB: the second one does not fit on the 1 MiB disk.
    out = small_tmpfs / "run"
    with pytest.raises(SystemExit) as stop:
        train(tiny_models, files["train12"], out, "sft", "--batch-size", 4, "--micro-batch-size", 4,
              "--max-steps", 3, "--save-steps", 1)
    message = str(stop.value)
    assert message.startswith(f"train_kd.py: checkpoint {out / 'step_2'}/: could not be written: the disk is full (")
    assert "inline_container" not in message  # torch's own words for it
    assert message.endswith(f"free some space, then --resume-from-checkpoint latest will continue from "
                            f"{out / 'step_1'} (step 1), the newest complete checkpoint")
    assert "\n" not in message
    assert checkpoints(out) == ["step_1"]  # the incomplete step_2/ was removed
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("extra, message", [
    (("--method", "jsd", "--on-policy-ratio", "1", "--on-policy-temperature", "inf"),
     "--on-policy-temperature inf: must be a finite number"),
    (("--method", "forward", "--lr", "nan"), "--lr nan: must be a finite number"),
    (("--method", "selfevo", "--gamma=-inf"), "--gamma -inf: must be a finite number"),
    (("--method", "selfevo", "--gamma", "-1"), "--gamma -1.0: is below 0: d = KL(ỹ‖q) is never negative"),
    (("--method", "sft", "--teacher-cache", "somewhere"), "--method sft with --teacher-cache: trains on the "
                                                          "references alone: the teacher would be unused"),
])
def test_values_accepted_before_without_a_word_are_refused(extra, message, tiny_models, files, tmp_path,
                                                           no_model_loading):
    argv = ["--student", tiny_models["student"], "--train-file", files["train8"], "--output-dir",
            str(tmp_path / "out"), *extra]
    if "sft" not in extra:
        argv += ["--teacher", tiny_models["teacher"]]
    with pytest.raises(SystemExit) as stop:
        train_kd.main(argv)
    assert stop.value.code == 2 and str(stop.value).startswith(f"train_kd.py: {message}"), str(stop.value)
    assert not (tmp_path / "out").exists()


def test_a_configuration_error_after_config_json_leaves_nothing(tiny_models, files, tmp_path, monkeypatch):
    """A check that needs the models fails after config.json was written: the run's folder goes again."""
    from kd.io import fail

    def not_loadable(*args, **kwargs):
        fail("--student", "cannot be loaded as asked", "a stand-in for a late configuration error", code=2)

    monkeypatch.setattr(train_kd, "load_model", not_loadable)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train(tiny_models, files["train8"], out, "sft", "--batch-size", 8)
    assert stop.value.code == 2 and not out.exists()
