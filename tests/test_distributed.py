"""Two CPU ranks under the real launcher: DeepSpeed ZeRO-3 and ZeRO-2 (the student and the teacher as
two plugins), each against one process with the same effective batch (2 accumulation steps), a kill -9
of the launch and its resume, bf16, and generate.py under ZeRO-3 with 2 ranks; FSDP2 and FSDP1 through a
test-only device shim (tests/fsdp_cpu_shim.py), each resumed exactly.

What a GPU alone can show is not here: NCCL, 8 ranks, memory and speed at 7B/13B (bench/gpu_check.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_kd
from kd.io import read_jsonl
from run_helpers import metric_rows, small_files, weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a hang guard per launch, not a timing (DeepSpeed builds its CPU comm op once per machine)


@pytest.fixture(scope="module")
def files(demo_data, tmp_path_factory):
    return small_files(demo_data, tmp_path_factory.mktemp("distributed_files"))


def command(config, processes, argv):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
            "--num_processes", str(processes), "--num_cpu_threads_per_process", "1", *map(str, argv)]


def environment():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def launch(config, processes, argv, log):
    result = subprocess.run(command(config, processes, argv), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def train_argv(models, files, out, *extra, method="selfevo"):
    return [str(REPO / "train_kd.py"), "--method", method, "--student", models["student"], "--teacher",
            models["teacher"], "--train-file", files["train16"], "--valid-file", files["valid"], "--output-dir", str(out),
            "--batch-size", 8, "--micro-batch-size", 4, "--max-steps", 4, "--lr", 3e-3, "--seed", 5,
            "--logging-steps", 1, "--save-steps", 1, "--save-total-limit", 0, *extra]


def assert_same_weights(a, b, atol=0.0):
    first, second = weights(Path(a) / "final"), weights(Path(b) / "final")
    assert set(first) == set(second)
    for name, value in first.items():
        if atol:
            torch.testing.assert_close(second[name], value, rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(second[name], value), name


def assert_same_rows(a, b):
    """The same metrics rows (timing aside), to the last bit but for two numbers computed across the
    ranks: the gradient norm (DeepSpeed's cross-rank norm rounds in another order: ~1e-15 relative) and
    the validation loss (its rows are split over the ranks into other padded batches: ~1e-9)."""
    first, second = (metric_rows(folder, "train") + metric_rows(folder, "valid") for folder in (a, b))
    assert len(first) == len(second)
    for x, y in zip(first, second):
        assert set(x) == set(y)
        for key in x:
            if key == "tokens_per_s":
                continue
            if key == "grad_norm" or key.startswith("valid_loss"):
                assert x[key] == pytest.approx(y[key], rel=1e-7), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)


def rank_shards(checkpoint):
    """The optimizer-state files of a DeepSpeed checkpoint: one per rank."""
    return sorted(p.name for p in (checkpoint / "pytorch_model").glob("*optim_states.pt"))


@pytest.mark.parametrize("config, stage", [("deepspeed_zero3.yaml", 3), ("deepspeed_zero2.yaml", 2)],
                         ids=["zero3", "zero2"])
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(config, stage, tiny_models, files, tmp_path):
    """Two ranks of 4 examples each against one rank of 2 micro-batches of 4: the same effective batch
    of 8, so the same gradient (exact token weighting) and, with gloo's sums in the same order as the
    accumulation's, bit-identical weights. Each rank writes its own optimizer-state shard."""
    two = tmp_path / "two"
    output = launch(config, 2, train_argv(tiny_models, files, two), tmp_path / "two.log")
    config_json = json.loads((two / "config.json").read_text())
    assert config_json["num_processes"] == 2 and config_json["gradient_accumulation_steps"] == 1
    assert config_json["zero_stage"] == stage
    results = json.loads((two / "all_results.json").read_text())
    assert results["trainable_parameters"] == results["total_parameters"] > 0  # not 0 of 0 (ZeRO-3 partitions)
    assert "student: 0 trainable" not in output
    assert rank_shards(two / "epoch_1") == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]

    one = tmp_path / "one"
    launch(config, 1, train_argv(tiny_models, files, one), tmp_path / "one.log")
    one_config = json.loads((one / "config.json").read_text())
    assert one_config["num_processes"] == 1 and one_config["gradient_accumulation_steps"] == 2
    assert_same_weights(two, one)
    assert_same_rows(two, one)


def test_zero3_two_ranks_killed_then_resumed_is_the_uninterrupted_run(tiny_models, files, tmp_path):
    full = tmp_path / "full"
    launch("deepspeed_zero3.yaml", 2, train_argv(tiny_models, files, full), tmp_path / "full.log")

    killed = tmp_path / "killed"
    process = subprocess.Popen(command("deepspeed_zero3.yaml", 2, train_argv(tiny_models, files, killed)), cwd=REPO,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:  # kill -9 the whole launch once the checkpoint of step 2 (epoch_1) is complete (its trainer_state.json is last)
        while process.poll() is None and not (killed / "epoch_1" / "trainer_state.json").is_file():
            try:
                process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (killed / "COMPLETED").exists(), "the run ended before it could be killed"
    launch("deepspeed_zero3.yaml", 2, [*train_argv(tiny_models, files, killed), "--resume-from-checkpoint", "latest"],
           tmp_path / "resumed.log")
    assert_same_weights(full, killed)
    assert_same_rows(killed, full)


def test_zero3_two_ranks_in_bf16(tiny_models, files, tmp_path):
    """bf16 under ZeRO-3 with 2 ranks: the DeepSpeed config and final/ are bf16, and it trains like one
    rank with 2 accumulation steps up to bf16's rounding (the ranks' bf16 gradients are summed in
    another order than one rank's accumulation)."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch("deepspeed_zero3.yaml", 2, [*train_argv(tiny_models, files, two), "--bf16"], tmp_path / "two.log")
    launch("deepspeed_zero3.yaml", 1, [*train_argv(tiny_models, files, one), "--bf16"], tmp_path / "one.log")
    config = json.loads((two / "config.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["num_processes"] == 2
    saved = torch.load(next((two / "epoch_1" / "pytorch_model").glob("*model_states.pt")), weights_only=False)
    assert saved["ds_config"]["bf16"]["enabled"] is True
    assert {value.dtype for value in weights(two / "final").values()} == {torch.bfloat16}
    assert_same_weights(two, one, atol=2e-2)
    losses = [row["loss"] for row in metric_rows(two)], [row["loss"] for row in metric_rows(one)]
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_generate_under_zero3_with_two_ranks_writes_one_process_s_translations(tiny_models, demo_data, tmp_path):
    rows = read_jsonl(Path(demo_data) / "test" / "de-en.jsonl")[:7]  # an odd count: one rank decodes a dummy row
    source = tmp_path / "de-en.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [str(REPO / "generate.py"), "--model", tiny_models["student"], "--input", str(source), "--max-new-tokens",
            8, "--batch-size", 2]
    launch("deepspeed_zero3.yaml", 2, [*argv, "--output", str(tmp_path / "two")], tmp_path / "two.log")
    launch("cpu.yaml", 1, [*argv, "--output", str(tmp_path / "one")], tmp_path / "one.log")
    assert (tmp_path / "two" / "de-en.jsonl").read_text() == (tmp_path / "one" / "de-en.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# FSDP2 (accelerate_configs/fsdp.yaml), on CPU ranks through tests/fsdp_cpu_shim.py (TEST-ONLY)
# ---------------------------------------------------------------------------------------------

SHIM = REPO / "tests" / "fsdp_cpu_shim.py"


@pytest.fixture(scope="module")
def fsdp_cpu_config(tmp_path_factory):
    """accelerate_configs/fsdp.yaml for 2 CPU ranks: its loading options that need a device are off."""
    text = (REPO / "accelerate_configs" / "fsdp.yaml").read_text()
    assert "fsdp_version: 2" in text
    path = tmp_path_factory.mktemp("fsdp") / "fsdp_cpu.yaml"
    path.write_text(text.replace("fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false")
                    .replace("num_processes: 8", "num_processes: 2"))
    return path


def launch_shim(config, argv, log):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             "--num_processes", "2", "--num_cpu_threads_per_process", "1", str(SHIM), *map(str, argv)],
                            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_fsdp2_two_ranks_trains_saves_and_resumes_exactly(fsdp_cpu_config, tiny_models, files, tmp_path):
    full = tmp_path / "full"
    launch_shim(fsdp_cpu_config, train_argv(tiny_models, files, full)[1:], tmp_path / "full.log")
    config = json.loads((full / "config.json").read_text())
    assert config["distributed_type"] == "DistributedType.FSDP" and config["fsdp_version"] == 2  # not DDP
    assert config["num_processes"] == 2 and config["student_loss_path"] == "logits"
    shards = sorted(p.name for p in (full / "epoch_1" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    # best/ and final/ are full models that transformers loads; the same training as ZeRO-3's 2 ranks
    zero3 = tmp_path / "zero3"
    launch("deepspeed_zero3.yaml", 2, train_argv(tiny_models, files, zero3), tmp_path / "zero3.log")
    assert_same_weights(full, zero3, atol=1e-6)

    stopped = tmp_path / "stopped"  # what a kill after step 2's checkpoint leaves
    stopped.mkdir()
    shutil.copytree(full / "epoch_1", stopped / "epoch_1")
    shutil.copy(full / "config.json", stopped / "config.json")
    launch_shim(fsdp_cpu_config, [*train_argv(tiny_models, files, stopped)[1:], "--resume-from-checkpoint", "latest"],
                tmp_path / "resumed.log")
    assert_same_weights(full, stopped)


FSDP1_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: false
  fsdp_use_orig_params: true
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
rdzv_backend: static
same_network: true
use_cpu: false
"""


def sharded(checkpoint, part, out):
    """A sharded (DCP) checkpoint folder as one flat {name: tensor} dict, read in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint / part), str(out))

    def flat(tree, prefix=""):
        items = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            elif torch.is_tensor(value):
                items[f"{prefix}{key}"] = value
        return items
    return flat(torch.load(out, weights_only=False))


def test_fsdp1_resume_restores_the_optimizer_state(tiny_models, files, tmp_path):
    """accelerate's FSDP1 loader reads a sharded optimizer checkpoint into the optimizer's own (empty, before
    a first step) state dict: without train_kd.py's initialise_optimizer_state the moments restarted from
    zero (step 2 instead of 4 here, weights off by ~5e-3). Compared at the step-4 checkpoint: on CPU ranks
    FSDP1 crashes gathering the full state dict for final/ (SIGSEGV), which FSDP2 (fsdp.yaml) does not."""
    config = tmp_path / "fsdp1.yaml"
    config.write_text(FSDP1_CONFIG)

    def run(out, *extra):  # no --valid-file: no best/ to gather before the checkpoints are compared
        argv = train_argv(tiny_models, files, out)[1:]
        cut = argv.index("--valid-file")
        result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                                 "--num_processes", "2", "--num_cpu_threads_per_process", "1", str(SHIM),
                                 *map(str, [*argv[:cut], *argv[cut + 2:], *extra])],
                                cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
        log = result.stdout + result.stderr
        assert (out / "epoch_2" / "trainer_state.json").is_file(), log[-4000:]
        assert result.returncode == 0 or "SIGSEGV" in log, log[-4000:]  # the full gather for final/ on CPU

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full)
    config_json = json.loads((full / "config.json").read_text())
    assert config_json["distributed_type"] == "DistributedType.FSDP" and config_json["fsdp_version"] == 1
    stopped.mkdir()
    shutil.copytree(full / "epoch_1", stopped / "epoch_1")
    shutil.copy(full / "config.json", stopped / "config.json")
    run(stopped, "--resume-from-checkpoint", "latest")
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        first = sharded(full / "epoch_2", part, tmp_path / f"full_{part}.pt")
        second = sharded(stopped / "epoch_2", part, tmp_path / f"stopped_{part}.pt")
        assert set(first) == set(second) and first
        for name, value in first.items():
            assert torch.equal(value, second[name]), (part, name)
    assert any(name.endswith(".step") and float(value) == 4.0 for name, value in first.items())


def test_initialise_optimizer_state_changes_no_weight():
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    train_kd.initialise_optimizer_state(optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(optimizer.state) == 2 and all(float(s["step"]) == 1.0 for s in optimizer.state.values())
    assert optimizer.param_groups[0]["lr"] == 0.1 and all(p.grad is None for p in model.parameters())


def test_fsdp_on_a_machine_without_gpus_is_refused_before_any_model_loads(tiny_models, files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP can run")
    out = tmp_path / "out"
    result = subprocess.run(command("fsdp.yaml", 2, train_argv(tiny_models, files, out)), cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert ("train_kd.py: accelerate launch with an FSDP config (accelerate_configs/fsdp.yaml): needs GPUs"
            in result.stderr), result.stderr[-3000:]
    assert "deepspeed_zero3.yaml" in result.stderr and not out.exists()
