"""kd/estimate.py (the dry run's plan) and `DRY_RUN=1 bash pipelines/table1.sh`.

The formulas against hand-computed cases; the parameter counts against the published sizes of the
paper's models; table1.sh's dry run at paper scale lists exactly the paper's systems and settings,
and writes nothing.
"""

import json
import os
import re
import subprocess

import pytest

from kd import estimate
from kd.estimate import ModelSize

REPO_ROOT = estimate.Path(__file__).resolve().parents[1]
TINY = ModelSize(layers=1, hidden=4, intermediate=8, vocab=10, heads=2, kv_heads=1)


def test_parameter_counts_by_hand_and_of_the_papers_models():
    # kv width 4/2*1 = 2; per layer q,o 2*16 + k,v 2*4*2 + MLP 3*4*8 + norms 2*4 = 152;
    # embedding 40 + layer 152 + final norm 4 + lm_head 40 = 236; without the input embedding 196.
    assert TINY.parameters == 236 and TINY.compute_parameters == 196
    tied = ModelSize(1, 4, 8, 10, 2, 1, tied=True)
    assert tied.parameters == 196
    # LLaMA-1 7B / 13B / 33B as published (6.74B, 13.0B, 32.5B).
    assert estimate.MODELS["huggyllama/llama-7b"].parameters == 6_738_415_616
    assert estimate.MODELS["huggyllama/llama-13b"].parameters == 13_015_864_320
    assert estimate.MODELS["huggyllama/llama-30b"].parameters == 32_528_943_616


def test_student_states_under_each_sharding():
    # bf16 under DeepSpeed: weights 2 + grads 2 + fp32 master/m/v 12 bytes per parameter.
    assert estimate.student_state_bytes(1000, "zero3", 8, bf16=True) == (250, 250, 1500)
    assert estimate.student_state_bytes(1000, "zero2", 8, bf16=True) == (2000, 250, 1500)
    assert estimate.student_state_bytes(1000, "zero1", 8, bf16=True) == (2000, 2000, 1500)
    # accelerate autocast (one GPU, DDP, FSDP): fp32 weights 4 + grads 4 + Adam 8.
    assert estimate.student_state_bytes(1000, "none", 8, bf16=True) == (4000, 4000, 8000)
    assert estimate.student_state_bytes(1000, "full_shard", 4, bf16=True) == (1000, 1000, 2000)
    assert estimate.student_state_bytes(1000, "shard_grad_op", 4, bf16=False) == (4000, 1000, 2000)
    assert estimate.student_state_bytes(1000, "zero3", 2, bf16=False) == (2000, 2000, 4000)


def test_teacher_activations_and_loss_buffers_by_hand():
    assert estimate.teacher_bytes(1000, "zero3", 8, bf16=True) == 250    # ZeRO-3 inference plugin
    assert estimate.teacher_bytes(1000, "zero2", 8, bf16=True) == 250    # the teacher plugin is ZeRO-3 always
    assert estimate.teacher_bytes(1000, "none", 8, bf16=True) == 2000
    assert estimate.teacher_bytes(1000, "full_shard", 8, bf16=False) == 4000
    size = ModelSize(layers=2, hidden=4, intermediate=8, vocab=10, heads=2, kv_heads=2)
    # 34 * B 2 * T 3 * H 4 = 816 bytes per layer, 2 layers; fp32 twice that.
    assert estimate.activation_bytes(size, 2, 3, bf16=True, checkpointing=False) == 1632
    assert estimate.activation_bytes(size, 2, 3, bf16=False, checkpointing=False) == 3264
    # checkpointing: 2 layers x 2*2*3*4 = 96 kept inputs + one layer's 816 recomputed.
    assert estimate.activation_bytes(size, 2, 3, bf16=True, checkpointing=True) == 912
    # logits path: B*T*V = 60 logits x (2 + 2 + 4) bytes, + 2 per teacher logit for KD.
    assert estimate.loss_bytes(10, 2, 3, logits_path=True, kd=True) == 600
    assert estimate.loss_bytes(10, 2, 3, logits_path=True, kd=False) == 480
    assert estimate.loss_bytes(10, 2, 3, logits_path=False, kd=True) == 8 * 4 * 2**25


def test_flops_and_gpu_hours_by_hand():
    teacher = ModelSize(1, 8, 8, 10, 2, 2)  # compute parameters: 2*64 + 2*64 + 3*64 + 16 + 8 + 80 = 552
    assert teacher.compute_parameters == 552
    assert estimate.train_flops(TINY, None, 100) == 6 * 196 * 100
    assert estimate.train_flops(TINY, teacher, 100) == (6 * 196 + 2 * 552) * 100
    assert estimate.gpu_hours(3.6e15, 1e12, 0.5) == pytest.approx(2.0)


def test_launch_configs_and_data_size(tmp_path):
    configs = REPO_ROOT / "accelerate_configs"
    assert estimate.read_launch_config(str(configs / "deepspeed_zero3.yaml")) == ("zero3", 8)
    assert estimate.read_launch_config(str(configs / "deepspeed_zero2.yaml")) == ("zero2", 8)
    assert estimate.read_launch_config(str(configs / "fsdp.yaml")) == ("full_shard", 8)
    assert estimate.read_launch_config(str(configs / "multi_gpu.yaml"))[0] == "none"
    assert estimate.read_launch_config(None) == ("none", 1)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": "p" * 10, "reference": "r" * 4}) + "\n" for _ in range(3)))
    examples, mean_tokens, _ = estimate.data_size(train)
    assert examples == 3 and mean_tokens == pytest.approx(14 / estimate.CHARS_PER_TOKEN)
    examples, mean_tokens, source = estimate.data_size(tmp_path / "absent.jsonl")
    assert examples == 52574 and "ALMA" in source


def test_plan_follows_planned_runs_and_reports_unknown_models(tmp_path):
    teacher_dir = tmp_path / "t"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text(json.dumps({
        "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 8, "vocab_size": 10,
        "num_attention_heads": 2}))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "p" * 5, "reference": "r" * 2}) + "\n")
    sft = f"python train_kd.py --method sft --student {teacher_dir} --train-file {train} --output-dir {tmp_path}/runs/tsft --epochs 2"
    kd = (f"python -m accelerate.commands.launch --config_file {REPO_ROOT}/accelerate_configs/deepspeed_zero3.yaml "
          f"--num_processes 2 train_kd.py --method forward --student {teacher_dir} --teacher {tmp_path}/runs/tsft/best "
          f"--train-file {train} --output-dir {tmp_path}/runs/kd --bf16")
    unknown = f"python train_kd.py --method sft --student nobody/unknown --train-file {train} --output-dir {tmp_path}/runs/u"
    lines = [f"train tsft\t{sft}", f"generate x\tpython generate.py --model m", f"train kd\t{kd}", f"train u\t{unknown}"]
    estimates, text = estimate.plan(lines, gpu="a100", utilisation=0.5)
    assert [e["method"] for e in estimates] == ["sft", "forward", "sft"]
    first, second, third = estimates
    assert first["sharding"] == "none" and first["processes"] == 1
    assert first["tokens"] == pytest.approx(2 * 7 / estimate.CHARS_PER_TOKEN)   # 1 example, 2 epochs
    assert second["sharding"] == "zero3" and second["processes"] == 2
    assert second["p_teacher"] == 552 + 80  # the SFT run's base model, through runs/tsft/best
    assert second["memory"]["teacher weights"] == 2 * 632 / 2
    assert third["memory"] is None and third["gpu_hours"] is None
    assert "1 run(s) of unknown model size not counted" in text[-1]


def test_table1_dry_run_lists_the_papers_systems_and_settings(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1")
    for name in ("DATA_DIR", "NUM_GPUS", "NUM_PROCESSES", "MICRO_BATCH_SIZE", "TRAIN_EXTRA_ARGS", "MAX_STEPS"):
        env.pop(name, None)
    result = subprocess.run(["bash", "pipelines/table1.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not out.exists(), "a dry run wrote files"
    steps = re.findall(r"step (.+?): would run\n +(.+)\n", result.stdout)
    commands = dict(steps)
    systems = ["teacher", "student_sft", "forward", "reverse", "noevo", "skew", "selfevo", "seqkd"]
    trained = [name[len("train "):] for name, _ in steps if name.startswith("train ")]
    assert trained == ["teacher_sft", "student_sft", "forward", "reverse", "noevo", "skew", "selfevo", "seqkd"]
    # the teacher also translates the training set first: SeqKD's training file (make_seqkd_data.py)
    assert [name[len("generate "):] for name, _ in steps if name.startswith("generate ")] == ["teacher_train"] + systems
    assert [name[len("evaluate "):] for name, _ in steps if name.startswith("evaluate ")] == systems
    assert "--hub" in commands["prepare data"]
    paper = ["--epochs 3", "--batch-size 128", "--lr 2e-5", "--warmup-ratio 0.03", "--max-length 512", "--bf16",
             "deepspeed_zero3.yaml", "--num_processes 8"]
    method_flags = {"forward": ["--kd-ratio 0.5"], "reverse": ["--kd-ratio 0.5"], "noevo": ["--target-mix 0.5"],
                    "skew": ["--target-mix 0.5", "--beta 0.5"],
                    "selfevo": ["--target-mix 0.5", "--beta 0.5", "--gamma 0.4"]}
    for run in trained:
        command = commands[f"train {run}"]
        for flag in paper + method_flags.get(run, []):
            assert flag in command, (run, flag, command)
        method = "sft" if run.endswith("_sft") or run == "seqkd" else run  # SeqKD: SFT on the teacher's outputs
        assert f"--method {method} " in command
    assert re.search(r"--train-file \S+/seqkd/train.jsonl", commands["train seqkd"])
    assert "--student huggyllama/llama-13b" in commands["train teacher_sft"]
    for run in ["student_sft", *method_flags, "seqkd"]:
        assert "--student huggyllama/llama-7b" in commands[f"train {run}"]
    # The stored teacher (TEACHER_CACHE=1, table1.sh's default): one cache step, read by every KD run.
    caches = [name for name, _ in steps if name.startswith("cache teacher ")]
    assert len(caches) == 1 and caches[0].startswith("cache teacher teacher_sft-best-k128-"), caches
    cache_command = commands[caches[0]]
    assert re.search(r"cache_teacher.py --teacher \S+/runs/table1/teacher_sft/best --train-file \S+/train.jsonl", cache_command)
    assert "--top-k 128 --dtype fp16 --max-length 512 --teacher-dtype bf16" in cache_command
    cache_dir = re.search(r"--out (\S+)", cache_command).group(1)
    for run in method_flags:
        assert f"--teacher-cache {cache_dir} " in commands[f"train {run}"] and "--teacher " not in commands[f"train {run}"]
    assert all("--num-beams 1" in commands[f"generate {s}"] for s in systems)
    assert "Unbabel/wmt22-comet-da" in commands["evaluate selfevo"]
    # The estimates: one block per training run (the 13B teacher found through its SFT run), and the total.
    selfevo = result.stdout[result.stdout.index("  train selfevo\n"):]
    assert "zero3 over 8 GPU(s), micro-batch 4 x 512 tokens, bf16" in selfevo
    assert "P_student 6.74B, P_teacher 0.00B" in selfevo  # the cache replaces the teacher's forward passes
    assert "52574 examples" in selfevo
    assert re.search(r"one teacher forward pass over 52574 examples x \d+ tokens .*P_teacher 13.02B", result.stdout)
    assert re.search(r"dry run total: 8 training run\(s\), [\d.]+ GPU-hours", result.stdout)

    live = subprocess.run(["bash", "pipelines/table1.sh"], cwd=REPO_ROOT, env=dict(env, TEACHER_CACHE="0"),
                          capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, (live.stdout + live.stderr)[-3000:]
    live_commands = dict(re.findall(r"step (.+?): would run\n +(.+)\n", live.stdout))
    assert not any(name.startswith("cache teacher") for name in live_commands)
    for run in method_flags:
        assert re.search(r"--teacher \S+/runs/table1/teacher_sft/best", live_commands[f"train {run}"])
    assert "P_student 6.74B, P_teacher 13.02B" in live.stdout[live.stdout.index("  train selfevo\n"):]
