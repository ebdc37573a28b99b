"""LoRA students (train_kd.py --lora-r, kd/lora.py): adapters learn on an over-fit batch, final/ is a
merged plain checkpoint equal to base + adapter, generate.py uses it, the optimizer holds the
adapters only, resume is exact, bad values are refused, and DDP / DeepSpeed ZeRO-2 / ZeRO-3 run.

    pytest tests/test_lora.py
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import train_kd
from kd.io import read_jsonl
from kd.lora import merged_state_dict
from run_helpers import metric_rows, small_files, weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("lora_files"))


def argv(models, train_file, out, *extra, method="forward"):
    return ["--method", method, "--student", models["student"], "--teacher", models["teacher"],
            "--train-file", str(train_file), "--output-dir", str(out), "--logging-steps", "1", "--seed", "3",
            "--lora-r", "4", *map(str, extra)]


def test_merge_by_hand():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # r = 1: B·A = [[3, 6], [4, 8]]
    state = {"base_model.model.layer.base_layer.weight": torch.ones(2, 2),
             "base_model.model.layer.base_layer.bias": torch.zeros(2),
             "base_model.model.layer.lora_A.default.weight": a, "base_model.model.layer.lora_B.default.weight": b,
             "base_model.model.embed.weight": torch.full((3, 2), 7.0)}
    merged = merged_state_dict(state, scaling=0.5)
    assert set(merged) == {"layer.weight", "layer.bias", "embed.weight"}
    assert torch.equal(merged["layer.weight"], torch.tensor([[2.5, 4.0], [3.0, 5.0]]))
    assert torch.equal(merged["embed.weight"], state["base_model.model.embed.weight"])


def test_lora_learns_and_final_is_a_merged_plain_checkpoint(tiny_models, files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    results = train_kd.main(argv(tiny_models, files["train8"], out, "--batch-size", 8, "--micro-batch-size", 4,
                                 "--epochs", 8, "--lr", 1e-2, "--warmup-ratio", 0, "--lr-scheduler",
                                 "constant_with_warmup", "--save-total-limit", 1, valid_file_args(files)))
    losses = [row["loss"] for row in metric_rows(out)]
    assert sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0], losses
    assert 0 < results["trainable_parameters"] < results["total_parameters"] / 4
    assert results["hyperparameters"]["lora_alpha"] == 8.0  # default 2r

    # final/ loads as a plain model, with every weight of the base architecture and nothing else
    merged, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    assert set(merged.state_dict()) == set(base.state_dict())
    changed = [name for name, value in base.state_dict().items() if not torch.equal(merged.state_dict()[name], value)]
    assert changed and all("proj" in name for name in changed)  # adapted linear layers only; embeddings, norms frozen
    # ... and equals base + adapter (peft's own forward)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["student"]),
                                             out / "final" / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)
    assert (out / "best" / "adapter" / "adapter_config.json").is_file()

    # the checkpoint's optimizer state holds the adapters' moments only
    optimizer = torch.load(out / "epoch_8" / "optimizer.bin", weights_only=False)
    moments = sum(state["exp_avg"].numel() for state in optimizer["state"].values())
    assert moments == results["trainable_parameters"]

    # generate.py uses final/
    hyps = tmp_path / "hyps"
    generate.main(["--model", str(out / "final"), "--input", files["valid"], "--output", str(hyps),
                   "--max-new-tokens", "6"])
    assert len((hyps / "valid.jsonl").read_text().splitlines()) == len(read_jsonl(files["valid"]))


def valid_file_args(files):
    return f"--valid-file={files['valid']}"


def test_lora_resume_is_exact(tiny_models, files, tmp_path):
    # with LoRA dropout: the dropout masks after the resume must follow the uninterrupted run's RNG stream
    run = ("--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 5, "--lr", 1e-2, "--save-steps", 2,
           "--save-total-limit", 0, "--lora-dropout", 0.1, "--lora-target-modules", "q_proj", "v_proj")
    full = tmp_path / "full"
    train_kd.main(argv(tiny_models, files["train16"], full, *run, method="selfevo"))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_2", stopped / "step_2")
    train_kd.main(argv(tiny_models, files["train16"], stopped, *run, "--resume-from-checkpoint", "latest",
                       method="selfevo"))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        resumed, uninterrupted = weights(stopped / "final", name), weights(full / "final", name)
        assert set(resumed) == set(uninterrupted)
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), (name, key)
    assert all(".q_proj." in key or ".v_proj." in key for key in weights(full / "final", "adapter/adapter_model.safetensors"))


@pytest.mark.parametrize("extra, message", [
    (("--lora-r", "-1"), "--lora-r -1: is a rank"),
    (("--lora-dropout", "1"), "--lora-r 4 / --lora-alpha None / --lora-dropout 1.0: need a rank >= 1"),
    (("--lora-alpha", "0"), "--lora-r 4 / --lora-alpha 0.0 / --lora-dropout 0.0: need a rank >= 1"),
    (("--lora-target-modules", "no_such_proj"), "--lora-target-modules no_such_proj: "),
])
def test_bad_values_are_one_line_with_exit_status_2(extra, message, tiny_models, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_kd.main(argv(tiny_models, files["train8"], tmp_path / "out", "--batch-size", 8, *extra))
    assert stop.value.code == 2
    # transformers 5 draws a "Loading weights" bar (\r-separated) before a model-dependent check fails:
    # the message is the last line, and the only one of train_kd.py
    err = capsys.readouterr().err.strip()
    lines = [part for line in err.splitlines() for part in line.split("\r")]
    assert lines[-1].startswith(f"train_kd.py: {message}"), err
    assert sum("train_kd.py" in line for line in lines) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("config, processes", [("cpu.yaml", 2), ("deepspeed_zero2.yaml", 1),
                                               ("deepspeed_zero3.yaml", 1)], ids=["ddp", "zero2", "zero3"])
def test_lora_under_ddp_and_deepspeed(config, processes, tiny_models, files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
               "--num_processes", str(processes), "--num_cpu_threads_per_process", "1", str(REPO / "train_kd.py"),
               *argv(tiny_models, files["train16"], out, "--batch-size", 8, "--micro-batch-size", 2, "--max-steps", 3,
                     "--lr", 1e-2, "--save-steps", 2)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert [row["step"] for row in metric_rows(out)] == [1, 2, 3]
    merged, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in base.state_dict().items())
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert train_kd.list_checkpoints(out)  # a complete checkpoint (epoch_1: 2 steps an epoch here)


@pytest.mark.parametrize("targets, message", [
    (("lm_head",), "--lora-target-modules lm_head: the lm_head cannot have an adapter here: the loss reads its "
                   "weight directly"),
    (("q_proj", "lm_head"), "--lora-target-modules q_proj lm_head: the lm_head cannot have an adapter here"),
    (("q_proj", "nonexistent_proj"), "--lora-target-modules q_proj nonexistent_proj: no module of the student is "
                                     "called nonexistent_proj"),
])
def test_adapters_on_the_lm_head_or_a_misspelt_module_stop_before_anything_is_written(targets, message, tiny_models,
                                                                                     files, tmp_path, monkeypatch):
    """lm_head alone crashed with a traceback, next to q_proj its adapter never trained (the lean loss path
    reads the base lm_head weight), and a misspelt name next to a valid one was ignored."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the targets were checked")

    monkeypatch.setattr(train_kd, "load_model", refuse)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train_kd.main(argv(tiny_models, files["train8"], out, "--batch-size", 8, "--lora-target-modules", *targets))
    assert stop.value.code == 2 and str(stop.value).startswith(f"train_kd.py: {message}"), str(stop.value)
    assert not out.exists()  # no config.json left behind


def test_a_resume_cannot_change_the_adapters_shape(tiny_models, files, tmp_path):
    run = ("--batch-size", 4, "--micro-batch-size", 4, "--max-steps", 3, "--lr", 1e-2, "--save-steps", 1,
           "--save-total-limit", 0)
    full = tmp_path / "full"
    train_kd.main(argv(tiny_models, files["train16"], full, *run))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step_1", stopped / "step_1")
    with pytest.raises(SystemExit) as stop:  # was: size mismatch for ...lora_A... (a traceback)
        train_kd.main(argv(tiny_models, files["train16"], stopped, *run, "--resume-from-checkpoint", "latest",
                           "--allow-changed-args", "--lora-r", 8))
    assert stop.value.code == 2
    assert "--lora-r 4 -> 8" in str(stop.value) and "lora_r cannot change within a run (the adapters' shapes " \
        "depend on it)" in str(stop.value)
