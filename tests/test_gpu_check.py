"""bench/gpu_check.py in its CPU mode (--device cpu --tiny): the same code paths as the GPU check,
tiny models, so the script cannot rot between the rare GPU sessions.

Part 2 runs under `accelerate launch` with accelerate_configs/cpu.yaml here: FSDP needs an
accelerator device and DeepSpeed on a CPU takes minutes (tests/test_train_launch.py covers ZeRO-3);
the GPU run uses deepspeed_zero3.yaml and fsdp.yaml.
"""

import json
import sys
from pathlib import Path

import pytest

from kd.losses import METHODS

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_gpu_check_cpu_tiny_runs_every_part(tmp_path):
    import gpu_check

    out = tmp_path / "check"
    report = gpu_check.main([str(out), "--device", "cpu", "--tiny", "--launch-configs", "cpu.yaml"])
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["parts"].keys() == {"train", "launch", "losses", "generate"}
    assert not (out / "work").exists()
    parts = report["parts"]
    for name, part in parts.items():
        assert "error" not in part, (name, part.get("traceback"))

    train = parts["train"]
    assert list(train["methods"]) == list(METHODS)
    ideal = 1 + 2 * train["p_teacher_compute"] / (6 * train["p_student_compute"])
    assert train["ideal_kd_times_sft"] == pytest.approx(ideal)
    for method, run in train["methods"].items():
        assert "error" not in run, (method, run.get("traceback"))
        assert run["step_seconds"] > 0 and run["loss_path"] == "hidden"
        assert run["ratio_to_ideal"] == pytest.approx(run["step_seconds"] / train["methods"]["sft"]["step_seconds"]
                                                      / (1.0 if method == "sft" else ideal))
    assert saved["data"]["max_tokens"] <= saved["settings"]["length"]

    launched = parts["launch"]["cpu.yaml"]
    assert launched["runs"], launched.get("error")
    # Same seed, same data, one process: the launched run's first step is part 1's.
    assert launched["same_loss"] and launched["first_loss"] == pytest.approx(
        train["methods"]["selfevo"]["first_loss"], rel=1e-4)

    losses = parts["losses"]
    assert len(losses["rows"]) == 2 * 2 * len(METHODS)
    for row in losses["rows"]:
        assert "error" not in row, row
        assert row["loss_lean"] == pytest.approx(row["loss_naive"], rel=1e-3, abs=1e-3), row
    assert set(losses["best_chunk_elements"]) == {"logits", "hidden"}

    runs = parts["generate"]["runs"]
    assert [run["batch_size"] for run in runs] == list(saved["settings"]["gen_batches"])
    assert all(run["new_tokens"] > 0 for run in runs)
    assert all(run["identical_to_batch1"] == "2/2" for run in runs)

    table = (out / "gpu_check.md").read_text()
    for heading in ("## 1. Training", "## 2. selfevo under accelerate launch", "## 3. kd/losses.py", "## 4. generate.py"):
        assert heading in table
    assert "FAILED" not in table
