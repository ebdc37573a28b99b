"""The bench scripts run on the installed stack (the pinned one and the newest: .ci/run runs both):
smallest settings, real scripts, a results JSON. Not timings: the checks are on what the numbers are
made of (parameter counts, the ideal's formula, the ratios' bases).

    pytest tests/test_bench.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script, *argv):
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.one_stack("pinned", why="torch only: no transformers or numpy in the losses")
def test_bench_losses_runs(tmp_path):
    out = tmp_path / "losses.json"
    run_bench("bench_losses.py", "--tokens", "32", "--vocab", "64", "--hidden", "16", "--repeat", "1",
              "--methods", "forward", "selfevo", "--out", out)
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_bench_generate_runs(tiny_models, tmp_path):
    out = tmp_path / "generate.json"
    run_bench("bench_generate.py", "--model", tiny_models["teacher"], "--inputs", "4", "--batch-size", "2",
              "--max-new-tokens", "4", "--out", out)
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_bench_teacher_cache_runs(tiny_models, demo_data, tmp_path):
    out = tmp_path / "teacher_cache.json"
    run_bench("bench_teacher_cache.py", "--teacher", tiny_models["teacher"], "--student", tiny_models["student"],
              "--train-file", demo_data / "train.jsonl", "--top-k", "8", "--default-k", "8", "--examples", "8",
              "--steps", "1", "--sweep-steps", "1", "--gammas", "0.4", "--batch-size", "8", "--draws", "4",
              "--out", out)
    report = json.loads(out.read_text())
    trained = report["setups"][f"trained teacher {tiny_models['teacher']}"]
    assert {row["top_k"] for row in trained["truncation"]} == {8}
    assert trained["cost"]["cache_step_over_sft"] > 0 and trained["sweep"]["runs"] == 1
    (sampling,) = trained["sampling"]
    assert (sampling["top_k"], sampling["sampling"], sampling["draws"]) == (8, 18, 4)
    assert sampling["bytes_per_position"] == {"top_k": 36, "sampled": 36}
    for method, kinds in sampling["methods"].items():  # top-K draws nothing: its bias is its error
        assert kinds["top_k"]["grad_bias"] == pytest.approx(kinds["top_k"]["grad_error"], rel=1e-9), method
        assert ("sampled" in kinds) == (method not in ("reverse", "akl")), method


@pytest.mark.slow
def test_bench_train_step_counts_and_ratios(tmp_path):
    """bench_train_step.py at toy size: sft, forward and a LoRA forward, each in its own process.

    The ideal is 1 + 2 P_t / (6 P_s) of the non-embedding counts it reports; full fine-tuning trains
    the student's every parameter (non-embedding + vocabulary x hidden); a rank-r LoRA on every linear
    layer but the lm_head trains r (11 h + 3 I) per layer (q, k, v, o: r (h + h) each; gate, up,
    down: r (h + I) each), and its optimizer state is 2 fp32 moments per trainable parameter.
    """
    out = tmp_path / "train_step.json"
    layers, hidden, intermediate, rank = 1, 32, 64, 4   # kd/models.tiny_llama: I = hidden * 8 // 3 // 32 * 32
    done = run_bench("bench_train_step.py", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                     "--micro-batch-size", "2", "--vocab-size", "300", "--train-pairs", "20",
                     "--teacher-size", "2", "48", "2", "--student-size", layers, hidden, "2",
                     "--methods", f"forward,forward --lora-r {rank}", "--out", out)
    report = json.loads(out.read_text())
    setup, rows = report["setup"], report["methods"]
    assert setup["teacher_size"] == [2, 48, 2] and setup["student_size"] == [layers, hidden, 2]
    p_t, p_s = setup["p_teacher_non_embedding"], setup["p_student_non_embedding"]
    assert report["ideal_kd_times_sft"] == pytest.approx(1 + 2 * p_t / (6 * p_s), rel=1e-12)
    assert list(rows) == ["sft", "forward", f"forward --lora-r {rank}"]

    full = rows["sft"]["trainable_parameters"]
    assert rows["forward"]["trainable_parameters"] == full
    embedding = full - p_s                      # the input embedding: vocabulary x hidden
    assert embedding > 0 and embedding % hidden == 0 and embedding // hidden <= 300
    lora = rows[f"forward --lora-r {rank}"]
    assert lora["trainable_parameters"] == layers * rank * (11 * hidden + 3 * intermediate)
    # Timings are not checked (a difference of two CPU timings can come out <= 0 on a busy machine: the
    # bench then reports None), only what each ratio is made of.
    def ratio(a, b):
        return None if a is None or b is None else pytest.approx(a / b)

    for row in rows.values():
        assert row["optimizer_state_mib"] == pytest.approx(row["trainable_parameters"] * 8 / 2**20)
        assert row["step_seconds"] is None or row["step_seconds"] > 0
        assert len(row["wall_step_seconds"]) == 2
        assert row["times_forward"] == ratio(row["step_seconds"], rows["forward"]["step_seconds"])
        assert row["times_sft"] == ratio(row["step_seconds"], rows["sft"]["step_seconds"])
    assert rows["sft"]["ideal_times_sft"] == 1.0 and rows["sft"]["ratio_to_ideal"] in (1.0, None)
    assert rows["forward"]["ratio_to_ideal"] == ratio(rows["forward"]["times_sft"], report["ideal_kd_times_sft"])
    # the goal is judged on the plain methods only (the LoRA row is a variant), and not at all without a ratio
    forward_ratio = rows["forward"]["ratio_to_ideal"]
    assert report["goal_met"] == (None if forward_ratio is None else forward_ratio <= 1.1)
    assert "| forward --lora-r 4 |" in done.stdout and "goal (every KD method" in done.stdout


def test_bench_train_step_reports_an_unmeasurable_step_as_such():
    """A step time that is a non-positive difference of two timings comes back as None; every ratio
    built on it is None, shown as '–', and the goal is not judged (no number that looks like a result)."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_train_step

    record = dict(wall_step_seconds=[0.1, 0.1], tokens_per_step=10, peak_rss_mib=100.0, trainable_parameters=10,
                  optimizer_state_mib=0.1)
    measured = {"sft": {**record, "step_seconds": 0.5}, "forward": {**record, "step_seconds": None},
                "selfevo": {**record, "step_seconds": 1.5}}
    rows, table, met = bench_train_step.compare(measured, list(measured), ideal=1.5)
    assert met is None
    assert rows["forward"]["times_sft"] is None and rows["forward"]["ratio_to_ideal"] is None
    assert rows["selfevo"]["times_sft"] == 3.0 and rows["selfevo"]["ratio_to_ideal"] == 2.0
    assert rows["selfevo"]["times_forward"] is None and rows["sft"]["ratio_to_ideal"] == 1.0
    assert table[3].startswith("| forward | – | – | – | 1.50 | – |")
    measured["forward"]["step_seconds"] = 0.75
    rows, _, met = bench_train_step.compare(measured, list(measured), ideal=1.5)
    assert rows["forward"]["ratio_to_ideal"] == 1.0 and met is False  # selfevo: 2.0 > 1.1
