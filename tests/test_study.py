"""The fidelity study: summarize_study.py's statistics, and pipelines/study.sh in its QUICK mode
(a few steps, one seed, every regime) so that the study cannot rot between its real runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import summarize_study
from kd import metrics

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

HYPS = ["Der Hund sieht die Katze.", "Ich habe ein Auto.", "Wir kaufen zwei Bücher.", "Sie schläft."]
REFS = ["Der Hund sieht eine Katze.", "Ich habe ein Auto gekauft.", "Wir kaufen zwei Bücher.", "Sie schläft nicht."]


def write_dir(folder, direction, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{direction}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.fixture
def tiny_test_set(tmp_path):
    refs = tmp_path / "refs"
    write_dir(refs, "en-de", [{"id": f"t{i}", "source": "x", "reference": r, "tgt_lang": "de"} for i, r in enumerate(REFS)])
    return refs


def hyps_dir(tmp_path, name, hyps):
    folder = tmp_path / name
    write_dir(folder, "en-de", [{"id": f"t{i}", "hypothesis": h} for i, h in enumerate(hyps)])
    return folder


def test_sentence_statistics_give_sacrebleu_corpus_bleu(tmp_path, tiny_test_set):
    stats = summarize_study.bleu_statistics(hyps_dir(tmp_path, "a", HYPS), tiny_test_set, ["en-de"])
    array, bleu = stats["en-de"]
    assert array.shape == (4, 10)
    from_stats = bleu._compute_score_from_stats(list(array.sum(0))).score
    assert from_stats == pytest.approx(metrics.corpus_bleu(HYPS, REFS, "de")[0], abs=1e-9)


def test_bootstrap_identical_systems_give_p_one_and_a_clear_win_gives_small_p(tmp_path, tiny_test_set):
    same = summarize_study.bleu_statistics(hyps_dir(tmp_path, "a", HYPS), tiny_test_set, ["en-de"])
    result = summarize_study.bootstrap_p([same, same], [same, same], ["en-de"])
    assert result["en-de"] == {"delta": 0.0, "p_value": 1.0}
    refs_as_hyps = summarize_study.bleu_statistics(hyps_dir(tmp_path, "b", REFS * 1), tiny_test_set, ["en-de"])
    bad = summarize_study.bleu_statistics(hyps_dir(tmp_path, "c", ["Nichts."] * 4), tiny_test_set, ["en-de"])
    result = summarize_study.bootstrap_p([refs_as_hyps], [bad], ["en-de"])
    assert result["en-de"]["delta"] == pytest.approx(100.0)
    assert result["avg"]["delta"] == pytest.approx(100.0)
    assert result["en-de"]["p_value"] == 0.0  # never on the other side in 1000 samples


def test_bootstrap_p_is_two_sided_and_symmetric(tmp_path, tiny_test_set):
    a = summarize_study.bleu_statistics(hyps_dir(tmp_path, "a", HYPS), tiny_test_set, ["en-de"])
    b = summarize_study.bleu_statistics(hyps_dir(tmp_path, "b", REFS[:2] + HYPS[2:]), tiny_test_set, ["en-de"])
    forward, backward = (summarize_study.bootstrap_p([x], [y], ["en-de"]) for x, y in ((a, b), (b, a)))
    assert forward["en-de"]["delta"] == pytest.approx(-backward["en-de"]["delta"])
    assert forward["en-de"]["p_value"] == pytest.approx(backward["en-de"]["p_value"])
    assert 0.0 <= forward["en-de"]["p_value"] <= 1.0


def test_mean_std_is_the_sample_std():
    entry = summarize_study.mean_std([1.0, 2.0, 4.0])
    assert entry["mean"] == pytest.approx(7 / 3)
    assert entry["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert summarize_study.mean_std([None]) is None


def test_table_flags_seeds_at_the_cap_and_seeds_that_never_beat_epoch_one():
    def system(best_epochs, stopped):
        entry = {"seeds": list(range(1, len(stopped) + 1)), "stopped_early": stopped,
                 "best_epoch": summarize_study.mean_std(best_epochs),
                 "epochs_trained": summarize_study.mean_std([15.0] * len(stopped))}
        entry["bleu"] = {"avg": summarize_study.mean_std([20.0] * len(stopped)), "en-de": None}
        entry["chrf"] = {"avg": summarize_study.mean_std([40.0] * len(stopped))}
        return entry

    summary = {"regime": "R1", "baseline": "forward", "checkpoint": "best", "directions": ["en-de"],
               "systems": {"stuck": system([1.0, 30.0, 1.0], [True, True, True]),
                           "capped": system([80.0, 40.0], [False, True]),
                           "fine": system([2.0], [True])}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summarize_study.make_table(summary).splitlines()}
    assert "(2/3 best at epoch 1)" in rows["stuck"] and "at the cap" not in rows["stuck"]
    assert "(1/2 at the cap)" in rows["capped"] and "epoch 1)" not in rows["capped"]
    assert "epoch 1)" not in rows["fine"] and "at the cap" not in rows["fine"]


# ---------------------------------------------------------------------------------------------
# the pipeline, QUICK mode
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.one_stack("latest")
def test_study_quick_mode_runs_every_regime_then_skips(tmp_path):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "STUDY_SYSTEMS": "student_sft forward selfevo", "OTHER_SYSTEMS": "forward selfevo",
           "REGIMES": "R1 R0 R2 R3 R4"}
    first = subprocess.run(["bash", "pipelines/study.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=1800)  # a hang guard, not a timing
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for regime in ("R0", "R1", "R2", "R3", "R4"):
        summary = json.loads((tmp_path / "study" / regime / "summary.json").read_text())
        assert summary["regime"] == regime
        # R1: STUDY_SYSTEMS, noevo and the sweep; the other regimes: OTHER_SYSTEMS
        expected = ({"student_sft", "forward", "selfevo", "noevo", "selfevo_beta0.9"} if regime == "R1"
                    else {"forward", "selfevo"})
        assert set(summary["systems"]) == expected, regime
        for name, entry in summary["systems"].items():
            assert entry["seeds"] == [1]
            assert set(entry["bleu"]) == {"de-en", "cs-en", "en-de", "en-cs", "avg"}
            if name != "forward":
                assert "p_value" in entry["significance"]["avg"]
        assert summary["systems"]["selfevo"]["hard_fraction_start"] is not None
        assert (tmp_path / "study" / regime / "table.md").read_text().count("\n| ") >= len(expected)
        assert (tmp_path / "study" / regime / "curves.png").stat().st_size > 0
        assert json.loads((tmp_path / "study" / regime / "settings.json").read_text())["REGIME"] == regime
    # R2 trained on the noisy, ambiguous data; R3's small student shares the teacher's tokenizer
    noisy_stats = json.loads((tmp_path / "data" / "study" / "noisy" / "stats.json").read_text())
    assert noisy_stats["demo"]["noise"]["probability"] == 0.1
    models = sorted((tmp_path / "data" / "study").glob("clean_models_*"))
    assert len(models) == 2
    vocabularies = [(m / "student" / "tokenizer.json").read_text() for m in models]
    assert vocabularies[0] == vocabularies[1]
    r3 = json.loads((tmp_path / "runs" / "study_R3" / "selfevo-s1" / "config.json").read_text())
    assert "clean_models_1x16x2" in r3["student"] or "study_R3/student_base" in r3["student"]
    r4 = json.loads((tmp_path / "runs" / "study_R4" / "forward-s1" / "config.json").read_text())
    assert r4["student"].endswith("clean_models_1x32x2/student")

    second = subprocess.run(["bash", "pipelines/study.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    ran = [line for line in second.stdout.splitlines() if ": running (log" in line and "summarize" not in line]
    assert ran == [], ran


@pytest.mark.one_stack("latest")
def test_study_dry_run_plans_each_run_once_and_writes_nothing(tmp_path):
    """DRY_RUN=1 of two protocols on a fresh OUT: the plan lists each training once (the teacher and
    paper's student SFT are planned by the first protocol; bleu reuses paper's KD runs and trains its
    own student SFT, stopped on the validation BLEU), and no file appears."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable,
           "REGIMES": "R2", "PROTOCOLS": "paper bleu", "SEEDS_QUICK": "1 2",
           "OTHER_SYSTEMS": "student_sft forward selfevo"}
    done = subprocess.run(["bash", "pipelines/study.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not out.exists(), "a dry run wrote files"
    planned = [line.split("step train ", 1)[1].split(":")[0] for line in done.stdout.splitlines()
               if "step train " in line and line.endswith("would run")]
    seeds = ("s1", "s2")
    assert sorted(planned) == sorted(["teacher_base", "student_base", "teacher"]
                                     + [f"{system}-{seed}" for system in ("student_sft", "forward", "selfevo")
                                        for seed in seeds]
                                     + [f"student_sft-{seed}" for seed in seeds]), planned
    train_commands = [line for line in done.stdout.splitlines() if "train_kd.py --method sft" in line
                      and "student_sft-s1 " in line]
    assert [("study_R2_paper" in c, "--best-metric bleu" in c) for c in train_commands] == [(True, False),
                                                                                          (False, True)]
    reused = [line.split("would reuse ")[1] for line in done.stdout.splitlines() if "would reuse" in line]
    assert sorted(reused) == sorted(str(out / "runs" / "study_R2_paper" / f"{system}-{seed}")
                                    for system in ("forward", "selfevo") for seed in seeds)
    assert "dry run total: 11 training run(s)" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.one_stack("latest")
def test_study_quick_r5_under_the_three_protocols(tmp_path):
    """R5 (a teacher on 4x the students' pairs) under converge, paper and bleu: the students train on the
    subset; paper's KD runs train KD_EPOCHS epochs, select by validation BLEU, are scored at final/; bleu
    reuses them (links) at best/, and its student SFT stops on the validation BLEU. R5 adds the remedy
    pre-registered for it (R5_EXTRA_SYSTEMS: selfevo_beta0.9) to the systems asked for."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "OTHER_SYSTEMS": "student_sft selfevo", "REGIMES": "R5", "PROTOCOLS": "converge paper bleu",
           "KD_EPOCHS_R5": "3"}
    done = subprocess.run(["bash", "pipelines/study.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)  # a hang guard, not a timing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = tmp_path / "data" / "study" / "rich"
    teacher_rows = (data / "train.jsonl").read_text().splitlines()
    student_rows = (data / "train_students.jsonl").read_text().splitlines()
    assert len(teacher_rows) == 4 * len(student_rows) and set(student_rows) < set(teacher_rows)
    runs = tmp_path / "runs"
    teacher = json.loads((runs / "study_rich" / "teacher" / "config.json").read_text())
    assert teacher["train_file"].endswith("rich/train.jsonl")
    for protocol, folder in (("converge", "study_R5"), ("paper", "study_R5_paper"), ("bleu", "study_R5_bleu")):
        summary = json.loads((tmp_path / "study" / ("R5" if protocol == "converge" else f"R5_{protocol}")
                              / "summary.json").read_text())
        assert set(summary["systems"]) == {"student_sft", "selfevo", "selfevo_beta0.9"}, protocol
        assert json.loads((tmp_path / "study" / ("R5" if protocol == "converge" else f"R5_{protocol}")
                           / "settings.json").read_text())["PROTOCOL"] == protocol
        selfevo = json.loads((runs / folder / "selfevo-s1" / "all_results.json").read_text())
        sft = json.loads((runs / folder / "student_sft-s1" / "all_results.json").read_text())
        config = json.loads((runs / folder / "selfevo-s1" / "config.json").read_text())
        assert config["train_file"].endswith("rich/train_students.jsonl")
        remedy = json.loads((runs / folder / "selfevo_beta0.9-s1" / "config.json").read_text())
        assert (remedy["method"], remedy["beta"], config["beta"]) == ("selfevo", 0.9, 0.5)
        if protocol == "converge":
            assert selfevo["best_metric"] == sft["best_metric"] == "loss"
        else:  # the paper protocol's KD runs: 3 epochs, no early stopping, best/ by the validation BLEU
            assert config["epochs"] == 3 and config["early_stopping_patience"] == 0
            assert selfevo["best_metric"] == "bleu" and selfevo["epochs"] == 3.0
        assert sft["best_metric"] == ("bleu" if protocol == "bleu" else "loss")
    # paper reuses converge's student SFT run, bleu reuses paper's KD runs; hypotheses from final/ and best/
    assert (runs / "study_R5_paper" / "student_sft-s1").resolve() == (runs / "study_R5" / "student_sft-s1").resolve()
    assert (runs / "study_R5_bleu" / "selfevo-s1").resolve() == (runs / "study_R5_paper" / "selfevo-s1").resolve()
    logs = tmp_path / "logs"
    assert "selfevo-s1/final" in (logs / "study_R5_paper" / "generate_selfevo-s1.log").read_text().splitlines()[2]
    assert "selfevo-s1/best" in (logs / "study_R5_bleu" / "generate_selfevo-s1.log").read_text().splitlines()[2]


# ---------------------------------------------------------------------------------------------
# summaries: a missing seed and a seed that did not learn are said in words, never averaged in
# ---------------------------------------------------------------------------------------------

def fake_regime(root, refs, runs):
    """runs: {run name: dict(valid=[(step, loss, bleu)], best_step, steps, metric, scored=True, completed=True)}."""
    for name, spec in runs.items():
        run = root / "runs" / name
        run.mkdir(parents=True)
        rows = [{"type": "valid", "step": step, "epoch": step / 2, "valid_loss": loss,
                 **({} if bleu is None else {"valid_bleu": bleu})} for step, loss, bleu in spec["valid"]]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "all_results.json").write_text(json.dumps({
            "best_valid_loss": min(loss for _, loss, _ in spec["valid"]), "epochs": spec["steps"] / 2,
            "steps": spec["steps"], "best_step": spec["best_step"], "stopped_early": False,
            "best_metric": spec.get("metric", "loss")}))
        if spec.get("completed", True):
            (run / "COMPLETED").write_text("done\n")
        if spec.get("scored", True):
            write_dir(root / "hyps" / name, "en-de", [{"id": f"t{i}", "hypothesis": h} for i, h in enumerate(HYPS)])
            (root / "results").mkdir(exist_ok=True)
            (root / "results" / f"{name}.json").write_text(json.dumps({
                "directions": {"en-de": {"bleu": 30.0, "chrf": 50.0}}, "average": {"bleu": 30.0, "chrf": 50.0}}))
    return ["--regime", "RX", "--runs", str(root / "runs"), "--hyps", str(root / "hyps"), "--results",
            str(root / "results"), "--refs", str(refs), "--out", str(root / "summary")]


def learned(**extra):
    return {"valid": [(2, 3.0, 1.0), (4, 2.0, 5.0), (6, 1.5, 9.0)], "best_step": 6, "steps": 6, **extra}


def test_a_missing_seed_is_reported_in_words_not_dropped(tmp_path, tiny_test_set):
    argv = fake_regime(tmp_path, tiny_test_set, {
        "forward-s1": learned(), "forward-s2": learned(),
        "selfevo-s1": learned(), "selfevo-s2": learned(completed=False),
        "skew-s1": learned(), "skew-s2": learned(scored=False)})
    summary = summarize_study.main(argv)
    selfevo, skew = summary["systems"]["selfevo"], summary["systems"]["skew"]
    assert selfevo["incomplete"] == {2: "selfevo-s2 has no COMPLETED (its training did not finish)"}
    assert skew["incomplete"] == {2: "skew-s2.json is missing (its generate and evaluate steps did not run)"}
    assert "bleu" not in selfevo and "significance" not in selfevo and selfevo["seeds"] == [1, 2]
    table = (tmp_path / "summary" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| selfevo |"))
    assert "incomplete: seed 2: selfevo-s2 has no COMPLETED" in row and "30.00" not in row
    assert json.loads((tmp_path / "summary" / "summary.json").read_text())["systems"]["skew"]["incomplete"]
    assert summary["systems"]["forward"]["bleu"]["avg"]["n"] == 2


def test_a_seed_that_did_not_learn_is_shown_as_such(tmp_path, tiny_test_set):
    argv = fake_regime(tmp_path, tiny_test_set, {
        "forward-s1": learned(), "selfevo-s1": learned(best_step=2),                 # best/ = first validation
        "skew-s1": {"valid": [(2, 2.0, 8.0), (4, 3.0, 4.0), (6, 4.0, 2.0)], "best_step": 2, "steps": 6,
                    "metric": "bleu"}})
    summary = summarize_study.main(argv)
    assert "first validation (step 2)" in summary["systems"]["selfevo"]["did_not_learn"][1]
    assert "significance" not in summary["systems"]["selfevo"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in (tmp_path / "summary" / "table.md").read_text().splitlines()}
    assert "did not learn in 1/1 seeds (seed 1: kept the checkpoint of its first validation" in rows["selfevo"]
    assert "30.00" not in rows["selfevo"] and "30.00" in rows["forward"]

    # KD systems scored at final/ (the paper protocol): a final validation BLEU below the first one
    summary = summarize_study.main([*argv, "--out", str(tmp_path / "final"), "--kd-checkpoint", "final"])
    assert "final validation bleu (2.00) is worse than at its first validation (8.00" in \
        summary["systems"]["skew"]["did_not_learn"][1]
    assert not summary["systems"]["forward"]["did_not_learn"] and not summary["systems"]["selfevo"]["did_not_learn"]


def test_the_three_outputs_appear_together_or_not_at_all(tmp_path, tiny_test_set, monkeypatch):
    argv = fake_regime(tmp_path, tiny_test_set, {"forward-s1": learned(), "selfevo-s1": learned()})

    def broken(*args):
        raise RuntimeError("the figure could not be drawn")

    monkeypatch.setattr(summarize_study, "plot_curves", broken)
    with pytest.raises(RuntimeError):
        summarize_study.main(argv)
    assert not (tmp_path / "summary").exists() or not any((tmp_path / "summary").iterdir())


def test_a_missing_hypotheses_file_names_the_step_that_makes_it(tmp_path, tiny_test_set):
    argv = fake_regime(tmp_path, tiny_test_set, {"forward-s1": learned(), "selfevo-s1": learned()})
    (tmp_path / "hyps" / "selfevo-s1" / "en-de.jsonl").unlink()
    with pytest.raises(SystemExit) as stop:
        summarize_study.main(argv)
    assert "selfevo-s1/en-de.jsonl" in str(stop.value) and "step 'generate selfevo-s1'" in str(stop.value)
    assert "prepare_data.py" not in str(stop.value)
