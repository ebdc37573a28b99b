"""train_kd.py --best-metric bleu|chrf: selection and early stopping by a translation metric of the
validation set, what it logs, that it resumes exactly, that its score is generate.py's, and the bad
input it refuses before any model loads.

chrF is used where the tests need scores that differ between validations: the tiny models translate
badly, so their BLEU is 0 at almost every validation, while chrF (character n-grams) moves."""

import json
from pathlib import Path

import pytest
import torch

import train_kd
from kd.io import read_jsonl
from kd.metrics import corpus_chrf
from run_helpers import metric_rows, small_files, weights

DECODE = ("--valid-max-new-tokens", 8, "--valid-decode-batch-size", 3)
RUN = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 6, "--lr", 3e-3, "--eval-steps", 1,
       "--lr-scheduler", "constant_with_warmup", "--warmup-ratio", 0, "--logging-steps", 2)


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("selection_files"))


def train(models, files, output_dir, *extra, method="forward", valid=True):
    argv = ["--method", method, "--student", models["student"], "--train-file", files["train12"],
            "--output-dir", str(output_dir), "--seed", "4", *map(str, extra)]
    if method != "sft":
        argv += ["--teacher", models["teacher"]]
    if valid:
        argv += ["--valid-file", files["valid"]]
    return train_kd.main(argv)


def test_decode_subset_takes_the_first_rows_of_each_direction_in_equal_shares():
    rows = [{"id": i, "direction": d} for i, d in enumerate(["de-en", "en-de", "de-en", "cs-en", "en-de", "de-en"])]
    assert [r["id"] for r in train_kd.decode_subset(rows, 4)] == [0, 2, 1, 3]   # 2 de-en, 1 en-de, 1 cs-en
    assert [r["id"] for r in train_kd.decode_subset(rows, 3)] == [0, 1, 3]
    assert [r["id"] for r in train_kd.decode_subset(rows, 100)] == [0, 2, 5, 1, 4, 3]
    assert train_kd.decode_subset(rows, None) == rows


def test_best_checkpoint_and_early_stopping_follow_the_chosen_metric(tiny_models, files, tmp_path):
    out = tmp_path / "chrf"
    # 5 steps: here chrF peaks early while the loss falls to the end (best/ by the loss would be step 5)
    results = train(tiny_models, files, out, *RUN, *DECODE, "--max-steps", 5, "--best-metric", "chrf",
                    "--save-steps", 1, "--save-total-limit", 0)
    valid = metric_rows(out, "valid")
    directions = sorted({row["direction"] for row in read_jsonl(files["valid"])})
    for row in valid:
        assert {"valid_loss", "valid_bleu", "valid_chrf", "decoded_rows", "decode_seconds"} <= set(row)
        assert {f"valid_{m}/{d}" for m in ("bleu", "chrf") for d in directions} <= set(row)
        assert row["decoded_rows"] == len(read_jsonl(files["valid"]))  # every row (no --valid-decode-rows)
        assert row["valid_chrf"] == pytest.approx(sum(row[f"valid_chrf/{d}"] for d in directions) / len(directions))
    scores = [row["valid_chrf"] for row in valid]
    assert len(set(scores)) > 1, scores  # the scores move, so the choice below means something
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first maximum: a tie is no improvement
    assert results["best_metric"] == "chrf" and results["best_score"] == scores[best]
    assert results["best_step"] == valid[best]["step"] and results["final_score"] == scores[-1]
    assert results["best_valid_loss"] == min(row["valid_loss"] for row in valid)
    # best/ holds the weights of that step (its checkpoint's)
    checkpoint = dict(train_kd.list_checkpoints(out))[valid[best]["step"]]  # step_N or epoch_N
    best_weights, at_step = weights(out / "best"), weights(checkpoint)
    assert all(torch.equal(best_weights[name], at_step[name]) for name in at_step)

    # Early stopping counts the validations without a better chrF (patience 2), not the loss's.
    stopped = train(tiny_models, files, tmp_path / "stopped", *RUN, *DECODE, "--best-metric", "chrf",
                    "--early-stopping-patience", 2)
    valid = metric_rows(tmp_path / "stopped", "valid")
    best_so_far, without, expected_stop = -1.0, 0, None
    for row in valid:
        if row["valid_chrf"] > best_so_far:
            best_so_far, without = row["valid_chrf"], 0
        else:
            without += 1
        if without >= 2:
            expected_stop = row["step"]
            break
    assert stopped["stopped_early"] == (expected_stop is not None)
    assert stopped["steps"] == (expected_stop or 6)


def test_the_logged_score_is_generate_py_s_score_of_the_same_rows(tiny_models, files, tmp_path):
    """The last validation translates with the final weights: generate.py on final/ and kd.metrics give
    the same chrF per direction for the same --valid-decode-rows rows."""
    import generate

    out = tmp_path / "run"
    train(tiny_models, files, out, *RUN, *DECODE, "--best-metric", "chrf", "--valid-decode-rows", 3)
    last = metric_rows(out, "valid")[-1]
    assert last["step"] == 6 and last["decoded_rows"] == 3
    chosen = train_kd.decode_subset(read_jsonl(files["valid"]), 3)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chosen))
    generate.main(["--model", str(out / "final"), "--input", str(tmp_path / "rows.jsonl"), "--output",
                   str(tmp_path / "hyps"), "--max-new-tokens", "8", "--batch-size", "2"])
    hyps = read_jsonl(tmp_path / "hyps" / "rows.jsonl")
    for direction in {row["direction"] for row in chosen}:
        pairs = [(h["hypothesis"], r["reference"]) for h, r in zip(hyps, chosen) if r["direction"] == direction]
        assert last[f"valid_chrf/{direction}"] == pytest.approx(corpus_chrf(*zip(*pairs))[0], abs=1e-9)


class Killed(Exception):
    pass


def test_resume_with_selection_by_chrf_is_the_uninterrupted_run(tiny_models, files, tmp_path, monkeypatch):
    full = tmp_path / "full"
    run = (*RUN, *DECODE, "--best-metric", "chrf", "--early-stopping-patience", 3, "--save-steps", 2)
    train(tiny_models, files, full, *run)

    # The same run killed after step 3 (its step-3 validation done, best/ as it was then, step_2 the
    # newest checkpoint), then resumed.
    record_step = train_kd.record_step

    def killed_after_step_3(run, state, step):
        row = record_step(run, state, step)
        if state.global_step == 3:
            raise Killed
        return row

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(train_kd, "record_step", killed_after_step_3)
    with pytest.raises(Killed):
        train(tiny_models, files, stopped, *run)
    monkeypatch.setattr(train_kd, "record_step", record_step)
    assert [p.name for p in stopped.glob("step_*")] == ["step_2"]
    resumed = train(tiny_models, files, stopped, *run, "--resume-from-checkpoint", "latest")

    def untimed(folder):
        return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "decode_seconds")}
                for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert untimed(stopped) == untimed(full)
    assert resumed["best_step"] == json.loads((full / "all_results.json").read_text())["best_step"]
    for folder in ("best", "final"):
        a, b = weights(full / folder), weights(stopped / folder)
        assert all(torch.equal(a[name], b[name]) for name in a), folder


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_kd, "load_model", refuse)


@pytest.mark.parametrize("extra, valid, message", [
    (("--best-metric", "bleu"), False, "--best-metric bleu: scores translations of the validation set; pass "
                                       "--valid-file"),
    (("--valid-decode-rows", "0"), True, "--valid-decode-rows 0: is a number of validation rows to translate"),
    (("--valid-decode-rows", "4"), False, "--valid-decode-rows 4: is a number of validation rows to translate"),
    (("--best-metric", "chrf", "--valid-max-new-tokens", "0"), True, "--valid-max-new-tokens 0 /"),
])
def test_bad_selection_arguments_stop_before_any_model_loads(extra, valid, message, tiny_models, files, tmp_path,
                                                             no_model_loading, capsys):
    with pytest.raises(SystemExit) as stop:
        train(tiny_models, files, tmp_path / "out", *extra, valid=valid)
    assert stop.value.code == 2
    assert str(stop.value).startswith(f"train_kd.py: {message}") and "\n" not in str(stop.value)
    assert not (tmp_path / "out").exists()


def test_a_validation_file_without_references_is_refused_naming_it(tiny_models, files, tmp_path, no_model_loading):
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "reference"}) + "\n"
                            for row in read_jsonl(files["valid"])))
    files = {**files, "valid": str(bare)}
    with pytest.raises(SystemExit) as stop:
        train(tiny_models, files, tmp_path / "out", "--best-metric", "bleu")
    assert "bare.jsonl:1" in str(stop.value) and "reference" in str(stop.value)
    assert Path(bare).is_file() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the collapse warning
# ---------------------------------------------------------------------------------------------

def windows(hard, loss, difficulty):
    return [(10 * (i + 1), l, d, h) for i, (h, l, d) in enumerate(zip(hard, loss, difficulty))]


def test_collapse_signature_fires_on_the_collapse_and_not_on_a_healthy_run():
    # the collapse (R5's selfevo, seed 1, steps 40-80): the hard tokens' d and the mean d climb while the loss falls
    collapse = windows(hard=[3.84, 4.02, 4.49, 5.10, 5.47], loss=[0.442, 0.430, 0.421, 0.402, 0.407],
                       difficulty=[2.65, 2.70, 2.95, 3.11, 3.39])
    message = train_kd.collapse_signature(collapse, "selfevo", beta=0.5)
    assert message.startswith("selfevo: the mean difficulty d = KL(ỹ‖q) of the hard tokens rose 3.84 -> 5.47 "
                              "over the last 5 logging windows (steps 10-50) while the training loss fell 0.442 -> "
                              "0.407 and the mean d of all tokens rose too (2.65 -> 3.39)")
    assert "-log(1-β) = 0.69" in message
    # a transient rise of a run that learned (the quickstart's skew: every token hard, +12 %): no warning
    transient = windows(hard=[2.50, 2.55, 2.62, 2.70, 2.80], loss=[0.50, 0.49, 0.48, 0.47, 0.46],
                        difficulty=[2.50, 2.55, 2.62, 2.70, 2.80])
    assert train_kd.collapse_signature(transient, "skew") is None
    # healthy: d of every token falls (the hard set shrinks to the hardest tokens, whose mean d may rise)
    healthy = windows(hard=[3.3, 3.5, 3.7, 3.9, 4.2], loss=[0.60, 0.57, 0.55, 0.52, 0.50],
                      difficulty=[3.0, 2.6, 2.1, 1.7, 1.2])
    assert train_kd.collapse_signature(healthy) is None
    assert train_kd.collapse_signature(collapse[:4]) is None                                  # too few windows
    rising_loss = windows([3.3, 3.5, 3.7, 3.9, 4.2], [0.50, 0.52, 0.55, 0.57, 0.60], [3.0, 3.2, 3.4, 3.6, 3.8])
    assert train_kd.collapse_signature(rising_loss) is None                                   # no learning at all
    noisy = windows([3.3, 4.2, 3.4, 4.3, 4.1], [0.60, 0.57, 0.55, 0.52, 0.50], [3.0, 3.2, 3.4, 3.6, 3.8])
    assert train_kd.collapse_signature(noisy) is None                                         # no steady rise
    assert train_kd.collapse_signature(windows([None] * 5, [0.6] * 5, [3.0] * 5)) is None    # no hard token


def test_a_healthy_selfevo_run_gives_no_collapse_warning(tiny_models, files, tmp_path, recwarn):
    results = train(tiny_models, files, tmp_path / "run", *RUN, "--logging-steps", 1, method="selfevo")
    assert results["collapse_warning"] is None
    assert not [w for w in recwarn if "collapse" in str(w.message)]
    rows = metric_rows(tmp_path / "run", "train")
    assert all("mean_difficulty_hard" in row for row in rows)
