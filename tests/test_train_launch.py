"""train_kd.py under the real launcher: `accelerate launch` with 2 CPU processes (DDP on gloo), and
DeepSpeed ZeRO-3 in one CPU process with the teacher as a second DeepSpeed plugin.

Each launch is checked against an in-process run of the same configuration: DDP must give the same
one-step update as one process (exact token weighting across processes), and DeepSpeed's "logits"
loss path the same losses as the single-device "hidden" path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_kd
from kd.io import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420  # seconds per launch; DeepSpeed builds its CPU comm op once per machine (minutes)


@pytest.fixture(scope="module")
def small_files(demo_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch_files")
    out = {}
    for name, source, per_direction in (("train", "train.jsonl", 4), ("valid", "valid.jsonl", 2)):
        kept, counts = [], {}
        for row in read_jsonl(demo_data / source):
            if counts.get(row["direction"], 0) < per_direction:
                counts[row["direction"]] = counts.get(row["direction"], 0) + 1
                kept.append(row)
        (folder / source).write_text("".join(json.dumps(row) + "\n" for row in kept))
        out[name] = str(folder / source)
    return out


def arguments(models, files, output_dir, *extra):
    return ["--method", "selfevo", "--student", models["student"], "--teacher", models["teacher"],
            "--train-file", files["train"], "--valid-file", files["valid"], "--output-dir", str(output_dir),
            "--logging-steps", "1", "--seed", "5", *map(str, extra)]


def launch(config, num_processes, argv, log):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
               "--num_processes", str(num_processes), "--num_cpu_threads_per_process", "1", str(REPO / "train_kd.py"), *argv]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def check_outputs(output_dir, steps):
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    assert (output_dir / "COMPLETED").is_file()
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["steps"] == steps and results["method"] == "selfevo"
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["type"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, steps + 1))
    assert all({"loss", "hard_fraction", "mean_difficulty", "beta"} <= set(row) for row in train_rows)
    assert any(row["type"] == "valid" for row in rows)
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    return model, train_rows


def final_weights(output_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def test_ddp_two_cpu_processes_match_one_process(tiny_models, small_files, tmp_path):
    # One optimizer step whose update shows the gradient (see test_train_kd.ONE_STEP): 8 examples as
    # 2 processes x 2 micro-batches x 2 examples, against 1 process x 1 micro-batch x 8.
    one_step = ("--batch-size", 8, "--max-steps", 1, "--lr", 1e3, "--adam-epsilon", 1e3, "--warmup-ratio", 0,
                "--max-grad-norm", 0)
    ddp_dir = tmp_path / "ddp"
    output = launch("cpu.yaml", 2, arguments(tiny_models, small_files, ddp_dir, *one_step, "--micro-batch-size", 2),
                    tmp_path / "ddp.log")
    assert "MULTI_CPU" in output
    config = json.loads((ddp_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and config["gradient_accumulation_steps"] == 2
    check_outputs(ddp_dir, steps=1)

    single_dir = tmp_path / "single"
    train_kd.main(arguments(tiny_models, small_files, single_dir, *one_step, "--micro-batch-size", 8))
    ddp, single = final_weights(ddp_dir), final_weights(single_dir)
    assert set(ddp) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-6, msg=name)


def test_deepspeed_zero3_with_teacher_plugin(tiny_models, small_files, tmp_path):
    run = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 3, "--lr", 3e-3, "--save-steps", 2)
    ds_dir = tmp_path / "zero3"
    output = launch("deepspeed_zero3.yaml", 1, arguments(tiny_models, small_files, ds_dir, *run), tmp_path / "ds.log")
    assert "loss path: student logits, teacher logits" in output
    config = json.loads((ds_dir / "config.json").read_text())
    assert config["distributed_type"] == "DistributedType.DEEPSPEED" and config["zero_stage"] == 3
    model, ds_rows = check_outputs(ds_dir, steps=3)

    # The checkpoint holds the student's engine only: the teacher (a second engine) is never saved.
    checkpoint = ds_dir / "step_2"
    assert (checkpoint / train_kd.TRAINER_STATE).is_file()
    engines = sorted(p.name for p in checkpoint.iterdir() if p.is_dir())
    assert engines == ["pytorch_model"], engines
    saved = torch.load(next((checkpoint / "pytorch_model").glob("*model_states.pt")), weights_only=False)
    assert saved["ds_config"]["zero_optimization"]["stage"] == 3
    student_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    saved_shapes = {name: tuple(shape) for group in saved["param_shapes"] for name, shape in group.items()}
    assert saved_shapes and all(student_shapes[name] == shape for name, shape in saved_shapes.items())
    assert tuple(model.lm_head.weight.shape) in saved_shapes.values()  # the student's lm_head, not the teacher's

    # Same losses as the single-device hidden-state path (same seed, same batches).
    single_dir = tmp_path / "single"
    train_kd.main(arguments(tiny_models, small_files, single_dir, *run))
    single_rows = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    single_losses = [row["loss"] for row in single_rows if row["type"] == "train"]
    assert [row["loss"] for row in ds_rows] == pytest.approx(single_losses, rel=1e-4)


@pytest.mark.parametrize("config, processes", [("cpu.yaml", 2), ("deepspeed_zero3.yaml", 1)], ids=["ddp", "zero3"])
def test_selection_by_a_translation_metric_under_the_launcher(config, processes, tiny_models, small_files, tmp_path):
    """--best-metric chrf: each process translates its share of the validation rows (ZeRO-3: in step,
    synced_gpus); the gathered score of the last validation is generate.py's chrF of final/ on them."""
    import generate
    from kd.metrics import corpus_chrf

    out = tmp_path / "run"
    launch(config, processes, arguments(tiny_models, small_files, out, "--batch-size", 4, "--micro-batch-size", 2,
                                        "--max-steps", 2, "--lr", 3e-3, "--best-metric", "chrf",
                                        "--valid-decode-rows", 3, "--valid-max-new-tokens", 6,
                                        "--valid-decode-batch-size", 1), tmp_path / "launch.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if row["type"] == "valid"][-1]
    assert last["step"] == 2 and last["decoded_rows"] == 3
    chosen = train_kd.decode_subset(read_jsonl(small_files["valid"]), 3)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chosen))
    generate.main(["--model", str(out / "final"), "--input", str(tmp_path / "rows.jsonl"), "--output",
                   str(tmp_path / "hyps"), "--max-new-tokens", "6"])
    hyps = read_jsonl(tmp_path / "hyps" / "rows.jsonl")
    for direction in {row["direction"] for row in chosen}:
        pairs = [(h["hypothesis"], r["reference"]) for h, r in zip(hyps, chosen) if r["direction"] == direction]
        assert last[f"valid_chrf/{direction}"] == pytest.approx(corpus_chrf(*zip(*pairs))[0], abs=1e-9)
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_metric"] == "chrf" and results["final_score"] == last["valid_chrf"]
