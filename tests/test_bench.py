"""The bench scripts run on the installed stack (the pinned one and the newest: .ci/run runs both):
smallest settings, real scripts, a results JSON. Not timings. (bench_train_step.py is left out: even
at one step it builds and trains its own models per method, over 10 minutes on a busy 2-core machine.)

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
              "--steps", "1", "--sweep-steps", "1", "--gammas", "0.4", "--batch-size", "8", "--out", out)
    report = json.loads(out.read_text())
    trained = report["setups"][f"trained teacher {tiny_models['teacher']}"]
    assert {row["top_k"] for row in trained["truncation"]} == {8}
    assert trained["cost"]["cache_step_over_sft"] > 0 and trained["sweep"]["runs"] == 1
