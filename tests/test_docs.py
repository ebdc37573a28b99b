"""The generated tables of the documentation (make_docs.py) match their sources."""

import pytest

import make_docs
import summarize_study


def test_every_generated_table_is_up_to_date(capsys):
    assert make_docs.main(["--check"]) == 0, capsys.readouterr().err


def test_the_methods_table_is_in_the_readme_and_in_the_registry(repo_root):
    from kd.methods import REGISTRY, equations_table

    table = equations_table()
    assert all(f"| `{name}` |" in table for name in REGISTRY)
    for document in ("README.md", "kd/methods.py"):
        assert table in (repo_root / document).read_text(), document


def test_a_stale_or_broken_table_is_found():
    fresh = make_docs.regenerate("a\n<!-- table:methods (x) -->\nold\n<!-- end table:methods -->\nb\n", "doc.md")
    assert "old" not in fresh and "| `selfevo` |" in fresh and fresh.startswith("a\n") and fresh.endswith("\nb\n")
    with pytest.raises(SystemExit, match="doc.md: unknown table 'nope'"):
        make_docs.regenerate("<!-- table:nope -->\nx\n<!-- end table:nope -->\n", "doc.md")
    with pytest.raises(SystemExit, match="doc.md: table:methods has no '<!-- end table:methods -->'"):
        make_docs.regenerate("<!-- table:methods -->\nx\n", "doc.md")


def test_every_generated_table_is_used_by_a_document():
    used = set()
    for path in make_docs.documents():
        used.update(make_docs.OPENING.findall(path.read_text(encoding="utf-8")))
    unused = sorted(set(make_docs.TABLES) - used)
    assert not unused, f"tables no document shows (place their markers, see docs/development.md): {unused}"


def test_a_name_with_colons_is_one_table_and_its_prefix_another():
    text = ("<!-- table:study:Rx (from x) -->\nold\n<!-- end table:study:Rx -->\n"
            "<!-- table:study:Rx_cap80 -->\nold\n<!-- end table:study:Rx_cap80 -->\n")
    assert make_docs.OPENING.findall(text) == ["study:Rx", "study:Rx_cap80"]
    assert [m.group("name") for m in make_docs.BLOCK.finditer(text)] == ["study:Rx", "study:Rx_cap80"]


def _entry(seeds, bleu, **more):
    """A system of a summary.json as summarize_study writes it (mean ± std over the seeds)."""
    avg = summarize_study.mean_std(bleu)
    return {"seeds": seeds, "bleu": {"de-en": avg, "avg": avg}, "chrf": {"avg": avg},
            "teacher_bleu": None, "best_valid_loss": summarize_study.mean_std([1.0] * len(seeds)),
            "best_epoch": summarize_study.mean_std([5.0] * len(seeds)),
            "epochs_trained": summarize_study.mean_std([9.0] * len(seeds)),
            "stopped_early": [True] * len(seeds), "did_not_learn": {}, **more}


def _summary():
    """A small hand-made summary.json: two seeds, a system tested against forward, one with a seed at the
    cap, one incomplete."""
    significance = {"avg": {"delta": 1.5, "p_value": 0.01}, "de-en": {"delta": 1.5, "p_value": 0.01}}
    return {"regime": "Rx", "baseline": "forward", "checkpoint": "best", "directions": ["de-en"],
            "teacher": {"bleu": {"de-en": 40.0, "avg": 40.0}, "chrf": {"avg": 60.0}},
            "systems": {
                "forward": _entry([1, 2], [30.0, 31.0]),
                "selfevo": _entry([1, 2], [31.0, 33.0], significance=significance, seeds_beating_baseline=2,
                                  hard_fraction_start=summarize_study.mean_std([0.8, 0.8]),
                                  hard_fraction_end=summarize_study.mean_std([0.1, 0.1])),
                "selfevo_gammaauto": _entry([1, 2], [29.0, 32.5], stopped_early=[False, True]),
                "skew": {"seeds": [1, 2], "incomplete": {2: "skew-s2 has no COMPLETED"}},
            }}


def test_the_study_tables_are_built_from_the_summary():
    summary = _summary()
    assert make_docs.study_table(summary) == summarize_study.make_table(summary)
    assert make_docs.versus_baseline_table({"Rx": summary}).splitlines()[2:] == [
        "| Rx | 40.00 | – | 30.50 ± 0.71 | 32.00 ± 1.41 | +1.50 (0.010) | 2/2 | +1.00, +2.00 | better |"]
    assert make_docs.variant_table({"Rx": summary}, "selfevo_gammaauto", "selfevo").splitlines()[2:] == [
        "| Rx | 30.75 ± 2.47 | 32.00 ± 1.41 | 30.50 ± 0.71 | -2.00, -0.50 | – (0.80 → 0.10) "
        "| 9.0 ± 0.0 (1/2 at the cap) (9.0 ± 0.0) |"]
    assert make_docs.variant_table({"Rx": summary}, "skew", "selfevo").splitlines()[2:] == [
        "| Rx | incomplete: seed 2: skew-s2 has no COMPLETED | – | – | – | – | – |"]
    rows = make_docs.seeds_table({"Rx": summary}).splitlines()[2:]
    assert rows[:2] == ["| Rx | forward | 30.00 | 31.00 |", "| Rx | selfevo | 31.00 (+1.00) | 33.00 (+2.00) |"]
    assert rows[3].startswith("| Rx | skew | incomplete: seed 2: skew-s2 has no COMPLETED |")
    brief = make_docs.brief_table(summary).splitlines()
    assert brief[2] == "| teacher | 40.00 | – | – | – | – | – |"
    assert brief[4] == "| selfevo | 32.00 ± 1.41 | +1.50 (0.010) | – | 1.000 ± 0.000 (5 ± 0) | 9.0 ± 0.0 | 0.80 → 0.10 |"


def test_the_benchmark_tables_are_built_from_their_json():
    step = {"methods": {"sft": {"step_seconds": 0.5, "times_sft": 1.0, "ratio_to_ideal": 1.0, "peak_rss_mib": 500.2},
                        "selfevo": {"step_seconds": 0.75, "times_sft": 1.5, "ratio_to_ideal": 0.96, "peak_rss_mib": 600}},
            "ideal_kd_times_sft": 1.5625, "machine": {"threads": 1},
            "setup": {"p_teacher_non_embedding": 3000, "p_student_non_embedding": 2000, "batch_size": 16,
                      "micro_batch_size": 8, "steps": 8}}
    assert make_docs.train_step_table(step).splitlines()[2:4] == [
        "| sft | 0.500 | 1.00 | 1.00 | 500 |", "| selfevo | 0.750 | 1.50 | 0.96 | 600 |"]
    losses = {"config": {"device": "cpu", "tokens": 8, "vocab": 10, "hidden": 4, "dtype": "float32", "threads": 1,
                         "repeat": 1}, "time_method": "CPU", "rows": [
        {"method": "forward", "path": "hidden", "naive_time_s": 2.0, "lean_time_s": 1.0, "time_ratio": 0.5,
         "memory_ratio": 0.03, "naive_peak_extra_mb": 100.0, "lean_peak_extra_mb": 3.0, "hard_fraction": 0.0}]}
    assert make_docs.losses_table(losses).splitlines()[2] == \
        "| forward | hidden | 2.000 | 1.000 | 0.50 | 0.030 | 100 → 3 | 0.00 |"
    assert "No autograd rows" in make_docs.losses_autograd_table(losses)
    losses["rows"][0].update(autograd_time_s=1.2, autograd_over_fast=1.2, autograd_peak_extra_mb=4.0,
                             autograd_memory_ratio=0.04)
    assert make_docs.losses_autograd_table(losses).splitlines()[2] == \
        "| forward | hidden | 1.000 | 1.200 | 1.20 | 4 | 0.040 |"
