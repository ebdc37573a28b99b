"""Plan before spending GPU hours: memory per GPU and GPU-hours of a train_kd.py run, estimated.

`DRY_RUN=1 bash pipelines/<any>.sh` prints every step it would run (pipelines/common.sh, `step`)
and, for each training step, the estimate below; nothing runs and nothing is downloaded.

    DRY_RUN=1 bash pipelines/table1.sh
    DRY_RUN=1 ESTIMATE_GPU=h100 ESTIMATE_UTILISATION=0.35 bash pipelines/table2.sh

Model sizes come from a local config.json when the path exists, else from the small built-in table
of the paper's models (MODELS), else from a run planned earlier in the same dry run (a KD run whose
teacher is runs/.../teacher_sft/best has the size of that SFT run's base model). Data size: the
train file when it exists (characters / CHARS_PER_TOKEN), else the paper's ALMA training set.

Memory per GPU (bytes; P = parameters, N = processes sharing the model):
  student: mixed precision keeps 16 B per parameter in all: fp32 weights 4 + fp32 gradients 4 + Adam
    8 (accelerate's autocast), or bf16 weights 2 + bf16 gradients 2 + fp32 master, m, v 12 (DeepSpeed
    bf16). Partitioned over N: ZeRO-1 the optimizer part, ZeRO-2 gradients + optimizer, ZeRO-3 and
    FSDP FULL_SHARD everything, FSDP SHARD_GRAD_OP gradients + optimizer; DDP and one GPU nothing.
  teacher: P_t x 2 (bf16) or 4 (fp32); under DeepSpeed it is ZeRO-3 partitioned (/N).
  activations (student, per micro-batch of B sequences of T tokens, hidden size H, L layers, bf16):
    34·B·T·H bytes per layer (Korthikanti et al. 2022 with fused attention, no T² term), or with
    --gradient-checkpointing 2·B·T·H per layer + one layer's 34·B·T·H; x2 in fp32.
  loss: "hidden" path (one GPU, DDP, ZeRO-1/2) ~8 fp32 buffers of 2^25 logits (kd/losses.py chunks);
    "logits" path (ZeRO-3, FSDP) B·T·V·(2 + 2 + 4) (bf16 logits, their gradient, one fp32 copy),
    plus B·T·V·2 teacher logits for a KD method.
GPU-hours: tokens = examples x mean tokens per example x epochs (no padding); FLOPs per token =
  6·P_s (student forward + backward) + 2·P_t (teacher forward, KD methods), P without the input
  embedding (a lookup) and without attention's T² term (~10 % at T = 512); hours = FLOPs /
  (peak bf16 FLOP/s x utilisation) / 3600, over all GPUs together; wall-clock = GPU-hours / N.
These are plans, not measurements: bench/gpu_check.py measures the real numbers on a GPU.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python kd/estimate.py`: find kd/

from kd.train_args import parse_args  # noqa: E402  (train_kd.py's command line, defined once)

GIB = 2**30
CHARS_PER_TOKEN = 3.5  # Llama's tokenizer on English/German/Czech text, roughly
# The paper's training data: ALMA's human-written de-en + cs-en pairs, both directions
# (prepare_data.py: 52,574 examples); mean characters of the Alpaca prompt (~230) + source + reference.
ALMA_TRAIN = {"examples": 52574, "mean_chars": 501}
LOSS_CHUNK_ELEMENTS = 2**25  # kd/losses.py CHUNK_ELEMENTS["cuda"]
# Peak dense bf16 FLOP/s of one GPU (vendor data sheets, without sparsity).
GPU_PEAK_FLOPS = {"a100": 312e12, "h100": 989e12, "h200": 989e12, "a6000": 155e12, "l40s": 362e12}
DEFAULT_GPU, DEFAULT_UTILISATION = "a100", 0.4


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def parameters(self):
        """All parameters of a Llama: embeddings, attention, SwiGLU MLP, RMS norms, lm_head."""
        kv = self.hidden // self.heads * self.kv_heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden
        lm_head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + lm_head

    @property
    def compute_parameters(self):
        """Parameters that cost FLOPs per token: all but the input embedding (a lookup)."""
        return self.parameters - self.vocab * self.hidden


def _llama(layers, hidden, intermediate, heads, kv_heads=None, vocab=32000):
    return ModelSize(layers, hidden, intermediate, vocab, heads, kv_heads or heads)


# The paper's models (LLaMA-1: Table 1 13B -> 7B, Table 2 30B -> 7B) and their Llama-2 twins.
MODELS = {
    "huggyllama/llama-7b": _llama(32, 4096, 11008, 32),
    "huggyllama/llama-13b": _llama(40, 5120, 13824, 40),
    "huggyllama/llama-30b": _llama(60, 6656, 17920, 52),
    "meta-llama/Llama-2-7b-hf": _llama(32, 4096, 11008, 32),
    "meta-llama/Llama-2-13b-hf": _llama(40, 5120, 13824, 40),
}


def size_from_config(config):
    """ModelSize from a config.json dict (Llama-style keys)."""
    heads = config["num_attention_heads"]
    return ModelSize(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                     config["vocab_size"], heads, config.get("num_key_value_heads") or heads,
                     bool(config.get("tie_word_embeddings", False)))


def model_size(name_or_path, planned_runs=None):
    """ModelSize of a local folder, a known hub name, or a planned run's checkpoint; None if unknown."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return size_from_config(json.loads((path / "config.json").read_text()))
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    for run_dir, base in (planned_runs or {}).items():  # runs/x/best, runs/x/final of a planned run
        if str(path.parent) == run_dir or str(path) == run_dir:
            return model_size(base, planned_runs)
    return None


def data_size(train_file):
    """(examples, mean tokens per example, where the numbers come from)."""
    path = Path(train_file)
    if path.is_file():
        examples = chars = 0
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    examples += 1
                    chars += len(row["prompt"]) + len(row["reference"])
        return examples, chars / max(examples, 1) / CHARS_PER_TOKEN, f"{path} ({CHARS_PER_TOKEN} characters per token)"
    return (ALMA_TRAIN["examples"], ALMA_TRAIN["mean_chars"] / CHARS_PER_TOKEN,
            f"the paper's ALMA training set ({path} does not exist yet)")


# ---------------------------------------------------------------------------------------------
# The formulas (unit-tested by hand in tests/test_estimate.py)
# ---------------------------------------------------------------------------------------------

def student_state_bytes(parameters, sharding, processes, bf16):
    """(weights, gradients, optimizer) bytes per GPU of the trained student under a sharding scheme.

    sharding: "none" (one GPU, DDP), "zero1", "zero2", "zero3", "full_shard", "shard_grad_op".
    """
    if sharding.startswith("zero") and bf16:
        weights, gradients, optimizer = 2.0 * parameters, 2.0 * parameters, 12.0 * parameters
    else:
        weights, gradients, optimizer = 4.0 * parameters, 4.0 * parameters, 8.0 * parameters
    n = processes
    split = {"none": (1, 1, 1), "zero1": (1, 1, n), "zero2": (1, n, n), "shard_grad_op": (1, n, n),
             "zero3": (n, n, n), "full_shard": (n, n, n)}[sharding]
    return weights / split[0], gradients / split[1], optimizer / split[2]


def teacher_bytes(parameters, sharding, processes, bf16):
    """The frozen teacher's weights per GPU: bf16 (or fp32), ZeRO-3 partitioned under DeepSpeed."""
    total = (2.0 if bf16 else 4.0) * parameters
    return total / processes if sharding.startswith("zero") else total


def activation_bytes(size, micro_batch, length, bf16, checkpointing):
    """The student's activations kept for backward over one micro-batch."""
    per_layer = 34.0 * micro_batch * length * size.hidden * (1 if bf16 else 2)
    if checkpointing:
        return size.layers * 2.0 * micro_batch * length * size.hidden * (1 if bf16 else 2) + per_layer
    return size.layers * per_layer


def loss_bytes(vocab, micro_batch, length, logits_path, kd):
    """The loss's buffers: chunked from hidden states, or full response logits on the logits path."""
    if not logits_path:
        return 8.0 * 4 * LOSS_CHUNK_ELEMENTS
    return micro_batch * length * vocab * (8.0 + (2.0 if kd else 0.0))


def train_flops(student, teacher, tokens):
    """FLOPs of training on `tokens` tokens: 6 P_s per token, + 2 P_t per token with a teacher."""
    per_token = 6.0 * student.compute_parameters + (2.0 * teacher.compute_parameters if teacher else 0.0)
    return per_token * tokens


def gpu_hours(flops, peak_flops, utilisation):
    return flops / (peak_flops * utilisation) / 3600.0


# ---------------------------------------------------------------------------------------------
# One train_kd.py command
# ---------------------------------------------------------------------------------------------

def read_launch_config(config_path):
    """(sharding, processes in the file) of an accelerate YAML; ("none", 1) without one."""
    if not config_path or config_path == "none" or not Path(config_path).is_file():
        return "none", 1
    import yaml

    config = yaml.safe_load(Path(config_path).read_text()) or {}
    kind = str(config.get("distributed_type", "NO")).upper()
    processes = int(config.get("num_processes", 1) or 1)
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config", {})
        stage = ds.get("zero_stage")
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            if not file.is_absolute():
                file = Path(__file__).resolve().parents[1] / file
            stage = json.loads(file.read_text()).get("zero_optimization", {}).get("stage", stage)
        return f"zero{int(stage or 0)}" if stage else "none", processes
    if kind == "FSDP":
        strategy = str(config.get("fsdp_config", {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        return ("shard_grad_op" if "GRAD_OP" in strategy or strategy == "2" else "full_shard"), processes
    return "none", processes


def estimate_train(argv, config_path, processes, planned_runs, gpu, utilisation):
    """The estimate of one train_kd.py run (its argument list) as a dict; sizes None when unknown."""
    args = parse_args(argv)
    sharding, config_processes = read_launch_config(config_path)
    processes = processes or config_processes
    student = model_size(args.student, planned_runs)
    teacher = model_size(args.teacher, planned_runs) if args.teacher and args.method != "sft" else None
    examples, mean_tokens, data_source = data_size(args.train_file)
    result = {"output_dir": args.output_dir, "student": args.student, "teacher": args.teacher,
              "method": args.method, "sharding": sharding, "processes": processes, "bf16": args.bf16,
              "micro_batch_size": args.micro_batch_size, "max_length": args.max_length,
              "examples": examples, "mean_tokens": mean_tokens, "data_source": data_source,
              "gpu": gpu, "utilisation": utilisation, "memory": None, "gpu_hours": None}
    if student is None or (args.teacher and args.method != "sft" and teacher is None):
        return result
    weights, gradients, optimizer = student_state_bytes(student.parameters, sharding, processes, args.bf16)
    logits_path = sharding in ("zero3", "full_shard", "shard_grad_op")
    memory = {
        "student weights": weights, "student gradients": gradients, "Adam states": optimizer,
        "teacher weights": teacher_bytes(teacher.parameters, sharding, processes, args.bf16) if teacher else 0.0,
        "activations": activation_bytes(student, args.micro_batch_size, args.max_length, args.bf16,
                                        args.gradient_checkpointing),
        "loss buffers": loss_bytes(student.vocab, args.micro_batch_size, args.max_length, logits_path, teacher is not None),
    }
    memory["total"] = sum(memory.values())
    epochs = args.epochs
    tokens = examples * mean_tokens * epochs
    if args.max_steps:
        tokens = min(tokens, args.max_steps * args.batch_size * mean_tokens)
    flops = train_flops(student, teacher, tokens)
    hours = gpu_hours(flops, GPU_PEAK_FLOPS[gpu], utilisation)
    result.update({"p_student": student.parameters, "p_teacher": teacher.parameters if teacher else 0,
                   "memory": memory, "tokens": tokens, "flops": flops, "gpu_hours": hours,
                   "wall_hours": hours / processes, "loss_path": "logits" if logits_path else "hidden"})
    return result


def describe(estimate):
    """Lines printed under a training step of a dry run."""
    lines = [f"    estimate: {estimate['sharding']} over {estimate['processes']} GPU(s), "
             f"micro-batch {estimate['micro_batch_size']} x {estimate['max_length']} tokens, "
             f"{'bf16' if estimate['bf16'] else 'fp32'}"]
    if estimate["memory"] is None:
        lines.append(f"    estimate: model size unknown ({estimate['student']}, {estimate['teacher']}): "
                     "pass a local folder with a config.json or a model of kd/estimate.py MODELS")
        return lines
    memory = estimate["memory"]
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in memory.items() if name != "total")
    lines.append(f"    memory per GPU: {memory['total'] / GIB:.1f} GiB ({parts}; GiB; loss path {estimate['loss_path']})")
    lines.append(f"    compute: P_student {estimate['p_student'] / 1e9:.2f}B, P_teacher {estimate['p_teacher'] / 1e9:.2f}B, "
                 f"{estimate['tokens'] / 1e6:.1f}M tokens ({estimate['examples']} examples x "
                 f"{estimate['mean_tokens']:.0f} tokens, {estimate['data_source']}), {estimate['flops']:.3g} FLOPs "
                 f"-> {estimate['gpu_hours']:.1f} GPU-hours ({estimate['wall_hours']:.1f} h wall) on {estimate['gpu']} "
                 f"at {estimate['utilisation']:.0%} of peak bf16")
    return lines


# ---------------------------------------------------------------------------------------------
# The dry run's plan (written by pipelines/common.sh, read here once at the end)
# ---------------------------------------------------------------------------------------------

def split_command(command):
    """(accelerate config or None, processes or None, train_kd.py arguments) of a resolved step
    command, or None when it does not train. Commands look like `python -m accelerate.commands.launch
    [--config_file C] [--num_processes N] train_kd.py ARGS...` or `python train_kd.py ARGS...`."""
    names = [Path(word).name for word in command]
    if "train_kd.py" not in names:
        return None
    at = names.index("train_kd.py")
    launcher = command[:at]
    config = processes = None
    if "--config_file" in launcher:
        config = launcher[launcher.index("--config_file") + 1]
    if "--num_processes" in launcher:
        processes = int(launcher[launcher.index("--num_processes") + 1])
    elif "accelerate.commands.launch" not in launcher:
        processes = 1  # plain python: one process
    return config, processes, command[at + 1:]


def estimate_cache_build(command, planned_runs, gpu, utilisation, name, text):
    """GPU-hours of a cache_teacher.py step (one teacher forward pass over the training data, 2 P_t per
    token), with its lines appended to `text`; 0 for any other command. The KD runs that read the
    cache then count no teacher (train_kd.py --teacher-cache loads none)."""
    names = [Path(word).name for word in command]
    if "cache_teacher.py" not in names:
        return 0.0
    argv = command[names.index("cache_teacher.py") + 1:]
    teacher_path = argv[argv.index("--teacher") + 1] if "--teacher" in argv else None
    train_file = argv[argv.index("--train-file") + 1] if "--train-file" in argv else ""
    teacher = model_size(teacher_path, planned_runs) if teacher_path else None
    examples, mean_tokens, data_source = data_size(train_file)
    text.append(f"  {name}")
    if teacher is None:
        text.append(f"    estimate: model size unknown ({teacher_path}); not counted")
        return 0.0
    hours = gpu_hours(2.0 * teacher.compute_parameters * examples * mean_tokens, GPU_PEAK_FLOPS[gpu], utilisation)
    text.append(f"    compute: one teacher forward pass over {examples} examples x {mean_tokens:.0f} tokens "
                f"({data_source}), P_teacher {teacher.parameters / 1e9:.2f}B -> {hours:.1f} GPU-hours on {gpu}")
    return hours


def plan(lines, gpu=DEFAULT_GPU, utilisation=DEFAULT_UTILISATION):
    """Estimates of the training steps among a dry run's steps ("NAME<TAB>shell-quoted command" lines),
    in order, and the text to print."""
    import shlex

    planned_runs, estimates, text = {}, [], []
    cache_hours = 0.0
    for line in lines:
        if not line.strip():
            continue
        name, quoted = line.rstrip("\n").split("\t", 1)
        cache_hours += estimate_cache_build(shlex.split(quoted), planned_runs, gpu, utilisation, name, text)
        split = split_command(shlex.split(quoted))
        if split is None:
            continue
        config, processes, train_argv = split
        estimate = estimate_train(train_argv, config, processes, planned_runs, gpu, utilisation)
        planned_runs[estimate["output_dir"]] = estimate["student"]
        estimates.append(estimate)
        text += [f"  {name}"] + describe(estimate)
    known = [e for e in estimates if e["gpu_hours"] is not None]
    hours = sum(e["gpu_hours"] for e in known) + cache_hours
    wall = sum(e["wall_hours"] for e in known)
    peak = max((e["memory"]["total"] for e in known), default=0.0)
    unknown = len(estimates) - len(known)
    text.append(f"dry run total: {len(estimates)} training run(s), {hours:.1f} GPU-hours ({wall:.1f} h wall), "
                f"at most {peak / GIB:.1f} GiB per GPU"
                + (f"; {unknown} run(s) of unknown model size not counted" if unknown else ""))
    return estimates, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the dry run's steps: one 'NAME<TAB>shell-quoted command' line each")
    args = parser.parse_args(argv)
    gpu = os.environ.get("ESTIMATE_GPU", DEFAULT_GPU).lower()
    if gpu not in GPU_PEAK_FLOPS:
        raise SystemExit(f"ESTIMATE_GPU={gpu}: choose one of {', '.join(GPU_PEAK_FLOPS)}")
    utilisation = float(os.environ.get("ESTIMATE_UTILISATION", DEFAULT_UTILISATION))
    lines = Path(args.plan).read_text(encoding="utf-8").splitlines()
    estimates, text = plan(lines, gpu, utilisation)
    print(f"dry run estimates (kd/estimate.py; ESTIMATE_GPU={gpu}, ESTIMATE_UTILISATION={utilisation}):")
    print("\n".join(text))
    return estimates


if __name__ == "__main__":
    main(sys.argv[1:])
