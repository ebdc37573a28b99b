"""The GPU check: every GPU path of the project in one command, a few minutes on one GPU.

Run it in one go on a fresh GPU machine (its own torch and transformers 4.57 or 5.x, no network),
from the repository root, with the wheels of bench/wheels/ carried along with the working tree:

    # 1. here, with network, once: the wheels the GPU machine lacks (accelerate, deepspeed + deps, sacrebleu)
    bash bench/fetch_wheels.sh                       # -> bench/wheels/ (git-ignored, ~15 MiB)
    # 2. on the GPU machine (offline), from the repository root:
    pip install --no-index --find-links bench/wheels accelerate deepspeed && \\
        python bench/gpu_check.py bench/results/gpu_check_$(date +%F)_h200
    #    (~6 minutes on one H200; prints the Markdown table, writes gpu_check.json and gpu_check.md)

    python bench/gpu_check.py /tmp/gpu_check --device cpu --tiny   # the same code paths, tiny, on a CPU (tests)

Parts, each guarded (a failure is recorded with its message and the next part runs):
  1. train: train_kd.main in this process, bf16, every method of kd/losses.py (sft and the six KD
     methods), --steps optimizer steps (after --warmup untimed ones) on a random-init Llama pair built
     from configs (no download): teacher ~1.3B (24 x 2048), student ~0.55B (16 x 1536), vocabulary
     32000, sequences of ~512 tokens, micro-batch 8, batch 16. Per method: seconds per step (median,
     train_kd's own wall clock), tokens/s, peak GPU memory, the ratio to the ideal
     sft x (1 + 2 P_t / (6 P_s)) (P without the input embedding: bench/bench_train_step.py), the loss
     path (hidden / logits) from the run's config.json, and the first step's loss.
  2. launch: selfevo under `accelerate launch --num_processes 1` with accelerate_configs/
     deepspeed_zero3.yaml (the teacher as a second DeepSpeed plugin) and fsdp.yaml: does it run, its
     loss path, its first-step loss against part 1's (bf16 tolerance: relative 2e-2), peak memory.
  3. losses: kd/losses.py at N = 8192 tokens, V = 32000 and 128256, bf16 inputs, logits path and
     hidden path (H = 4096, Llama-7B's), every method: forward + backward time and peak extra memory
     of the default (chunked) path against the plain autograd path (chunk_size=0); achieved bandwidth
     of the logits path as a fraction of the HBM peak (bytes it must move: student logits read, their
     gradient written, teacher logits read, all bf16 / time), achieved FLOP/s of the hidden path as a
     fraction of the bf16 peak (3 matmuls of 2 N V H). Then a sweep of the chunk size (elements of a
     [chunk, V] block, today's CUDA default 2^25) for selfevo at the largest V, both paths: the best.
  4. generate: generate.py's engine (generate.main, greedy, bf16) on the student, tokens/s at batch
     1 (the first --gen-batch1-rows rows), 16 and 64 (--gen-inputs rows), and whether the batched
     outputs equal batch 1's row for row (a random model's near-flat logits make bf16 ties likely:
     a difference is reported, not hidden).
Peak memory: torch.cuda.max_memory_allocated (on a CPU the resident-set high-water mark of the process,
not reset between methods there, so only a rough number). Nothing is downloaded; the work folder
(models, data, runs) is OUT/work, deleted at the end unless --keep-work.
"""

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kd.estimate import size_from_config  # noqa: E402
from kd.losses import METHODS, compute_loss, compute_loss_from_hidden  # noqa: E402

# The two scales: the GPU check proper, and the tiny CPU run of the tests (same code paths).
SCALES = {
    "full": {
        "teacher": {"layers": 24, "hidden": 2048, "intermediate": 5504, "heads": 16},   # ~1.34B
        "student": {"layers": 16, "hidden": 1536, "intermediate": 4096, "heads": 12},   # ~0.55B
        "vocab": 32000, "tokenizer_vocab": 2000, "length": 512, "micro_batch": 8, "batch": 16,
        "steps": 20, "warmup": 3, "launch_steps": 3,
        "loss_tokens": 8192, "loss_vocabs": (32000, 128256), "loss_hidden": 4096, "loss_repeat": 5,
        "chunk_sweep": tuple(2**k for k in range(22, 29)),
        "gen_inputs": 64, "gen_batch1_rows": 16, "gen_batches": (1, 16, 64), "gen_new_tokens": 32,
        "launch_timeout": 300,
    },
    "tiny": {
        "teacher": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 2},
        "student": {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 2},
        "vocab": 640, "tokenizer_vocab": 600, "length": 192, "micro_batch": 2, "batch": 4,
        "steps": 2, "warmup": 1, "launch_steps": 1,
        "loss_tokens": 64, "loss_vocabs": (320, 640), "loss_hidden": 32, "loss_repeat": 1,
        "chunk_sweep": (2**10, 2**12),
        "gen_inputs": 4, "gen_batch1_rows": 2, "gen_batches": (1, 2, 4), "gen_new_tokens": 3,
        "launch_timeout": 300,
    },
}
LOSS_REL_TOLERANCE = 2e-2  # bf16: ~3 significant digits per op, summed over a few thousand tokens


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU test)")
    parser.add_argument("--parts", default="train,launch,losses,generate", help="comma-separated parts to run")
    parser.add_argument("--launch-configs", default="deepspeed_zero3.yaml,fsdp.yaml",
                        help="accelerate configs of part 2 (comma-separated, in accelerate_configs/)")
    parser.add_argument("--hbm-bytes-per-s", type=float, default=4.8e12, help="HBM peak (H200: 4.8 TB/s)")
    parser.add_argument("--peak-flops", type=float, default=790e12, help="bf16 dense peak FLOP/s (H200 ~790e12)")
    parser.add_argument("--keep-work", action="store_true", help="keep OUT/work (models, data, runs)")
    return parser.parse_args(argv)


# =============================================================================================
# Measuring
# =============================================================================================

def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def peak_bytes(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gib(value):
    return None if value is None else value / 2**30


def fresh_accelerate_state():
    """train_kd.main and generate.main each build an Accelerator; accelerate keeps process-wide singletons."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_record(error):
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


# =============================================================================================
# Setup: data and random-init models (nothing downloaded)
# =============================================================================================

def build_models(scale, work, device):
    """Tokenizer trained on the demo data; random-init Llama teacher and student saved in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.models import train_tokenizer, training_texts

    tokenizer = train_tokenizer(training_texts(work / "data" / "train.jsonl"), scale["tokenizer_vocab"])
    folders = {}
    for seed, role in enumerate(("teacher", "student")):
        size = scale[role]
        config = LlamaConfig(vocab_size=max(scale["vocab"], len(tokenizer)), hidden_size=size["hidden"],
                             intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                             num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                             max_position_embeddings=max(2048, scale["length"]), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=False)
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            model = LlamaForCausalLM(config)
        folder = work / "models" / role
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[role] = folder
        del model
    return folders, tokenizer


def write_long_rows(demo_file, tokenizer, length, count, out_file):
    """`count` training rows of nearly `length` tokens: consecutive demo pairs of one direction joined."""
    from kd.data import encode_example
    from kd.io import read_jsonl
    from kd.prompts import build_prompt

    by_direction = {}
    for row in read_jsonl(demo_file):
        by_direction.setdefault(row["direction"], []).append(row)
    directions = sorted(by_direction)
    rows, cursor = [], {d: 0 for d in directions}
    while len(rows) < count:
        direction = directions[len(rows) % len(directions)]
        pool = by_direction[direction]
        sources, references = [], []
        while True:
            pair = pool[cursor[direction] % len(pool)]
            cursor[direction] += 1
            trial_sources, trial_references = sources + [pair["source"]], references + [pair["reference"]]
            prompt = build_prompt(" ".join(trial_sources), pair["src_lang"], pair["tgt_lang"])
            if encode_example(tokenizer, prompt, " ".join(trial_references), length) is None:
                break
            sources, references = trial_sources, trial_references
        if not sources:
            raise ValueError(f"one demo pair with its prompt is longer than {length} tokens: raise the length")
        first = pool[0]
        rows.append({"id": f"long-{len(rows)}", "direction": direction, "src_lang": first["src_lang"],
                     "tgt_lang": first["tgt_lang"], "source": " ".join(sources), "reference": " ".join(references),
                     "prompt": build_prompt(" ".join(sources), first["src_lang"], first["tgt_lang"])})
    out_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lengths = [len(encode_example(tokenizer, r["prompt"], r["reference"], 10**9)["input_ids"]) for r in rows]
    return {"rows": len(rows), "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths)}


# =============================================================================================
# Part 1: every method, one process
# =============================================================================================

def train_argv(method, models, train_file, output_dir, scale, steps, bf16):
    argv = ["--method", method, "--student", str(models["student"]), "--train-file", str(train_file),
            "--output-dir", str(output_dir), "--batch-size", str(scale["batch"]),
            "--micro-batch-size", str(scale["micro_batch"]), "--max-steps", str(steps), "--logging-steps", "1",
            "--lr", "1e-5", "--warmup-ratio", "0", "--seed", "0", "--max-length", str(scale["length"])]
    if method != "sft":
        argv += ["--teacher", str(models["teacher"])]
    if bf16:
        argv.append("--bf16")
    return argv


def read_run(output_dir, warmup):
    """Per-step seconds after the warm-up steps, tokens per step, first loss and loss path of a run."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["type"] == "train"]
    seconds = [row["tokens"] / row["tokens_per_s"] for row in rows]
    timed = seconds[warmup:] or seconds
    config = json.loads((output_dir / "config.json").read_text())
    step = statistics.median(timed)
    tokens = statistics.mean(row["tokens"] for row in rows)
    return {"step_seconds": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "first_loss": rows[0]["loss"], "losses": [row["loss"] for row in rows],
            "loss_path": config["student_loss_path"], "teacher_loss_path": config["teacher_loss_path"],
            "distributed_type": config["distributed_type"]}


def part_train(args, scale, work, models, device):
    import train_kd

    teacher = size_from_config(json.loads((models["teacher"] / "config.json").read_text()))
    student = size_from_config(json.loads((models["student"] / "config.json").read_text()))
    ideal = 1 + 2 * teacher.compute_parameters / (6 * student.compute_parameters)
    result = {"p_teacher": teacher.parameters, "p_student": student.parameters,
              "p_teacher_compute": teacher.compute_parameters, "p_student_compute": student.compute_parameters,
              "ideal_kd_times_sft": ideal, "methods": {}}
    for method in METHODS:
        output_dir = work / "runs" / f"train-{method}"
        try:
            fresh_accelerate_state()
            before = reset_peak(device)
            train_kd.main(train_argv(method, models, work / "data" / "long.jsonl", output_dir, scale,
                                     scale["warmup"] + scale["steps"], bf16=True))
            record = {**read_run(output_dir, scale["warmup"]), "peak_gib": gib(peak_bytes(device)),
                      "memory_before_gib": gib(before)}
        except Exception as error:  # noqa: BLE001 - one method's failure is recorded, the others run
            record = error_record(error)
        finally:
            fresh_accelerate_state()
            shutil.rmtree(output_dir / "final", ignore_errors=True)
        result["methods"][method] = record
        print(f"[gpu_check] train {method}: {record.get('step_seconds', record.get('error'))}", flush=True)
    sft = result["methods"]["sft"].get("step_seconds")
    for method, record in result["methods"].items():
        if sft and "step_seconds" in record:
            record["times_sft"] = record["step_seconds"] / sft
            record["ratio_to_ideal"] = record["times_sft"] / (1.0 if method == "sft" else ideal)
    return result


# =============================================================================================
# Part 2: selfevo under accelerate launch (DeepSpeed ZeRO-3 with a teacher plugin, FSDP)
# =============================================================================================

def child_train(peak_file, train_args):
    """Inside `accelerate launch`: train_kd.main, then this process's peak memory to a JSON file."""
    import train_kd

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak(device)
    train_kd.main(train_args)
    peak_file.write_text(json.dumps({"peak_gib": gib(peak_bytes(device))}))


def part_launch(args, scale, work, models, reference_loss):
    result = {}
    for config in [c for c in args.launch_configs.split(",") if c]:
        output_dir = work / "runs" / f"launch-{Path(config).stem}"
        peak_file = work / f"peak-{Path(config).stem}.json"
        start = time.perf_counter()
        try:
            argv = train_argv("selfevo", models, work / "data" / "long.jsonl", output_dir, scale,
                              scale["launch_steps"], bf16=True)
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "accelerate_configs" / config), "--num_processes", "1",
                       "--num_cpu_threads_per_process", "1", str(Path(__file__).resolve()),
                       "--child-train", str(peak_file), *argv]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            try:
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=scale["launch_timeout"])
            except subprocess.TimeoutExpired as timeout:
                seen = (timeout.stdout or b"") + (timeout.stderr or b"")
                seen = seen.decode(errors="replace") if isinstance(seen, bytes) else seen
                raise RuntimeError(f"no result after {timeout.timeout} s; last output: {seen[-2000:]}") from None
            (work / f"launch-{Path(config).stem}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                raise RuntimeError(f"exit {done.returncode}: " + (done.stdout + done.stderr)[-2500:])
            record = read_run(output_dir, 0)
            record.update(json.loads(peak_file.read_text()))
            record["runs"] = True
            if reference_loss is not None:
                record["reference_first_loss"] = reference_loss
                record["relative_difference"] = abs(record["first_loss"] - reference_loss) / abs(reference_loss)
                record["same_loss"] = record["relative_difference"] <= LOSS_REL_TOLERANCE
        except Exception as error:  # noqa: BLE001
            record = {"runs": False, **error_record(error)}
        record["seconds"] = time.perf_counter() - start
        shutil.rmtree(output_dir, ignore_errors=True)
        result[config] = record
        print(f"[gpu_check] launch {config}: runs {record['runs']}", flush=True)
    return result


# =============================================================================================
# Part 3: kd/losses.py
# =============================================================================================

def loss_inputs(tokens, vocab, hidden, device, path):
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(tokens, vocab, generator=generator, device=device).mul_(2.0)
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    boost = torch.rand(tokens, generator=generator, device=device).mul_(6.0).add_(10.0)
    teacher[torch.arange(tokens, device=device), labels] += boost  # as bench/bench_losses.py
    if path == "logits":
        student = (teacher + 0.7 * torch.randn(tokens, vocab, generator=generator, device=device)).bfloat16()
        return {"student": student.requires_grad_(True), "teacher": teacher.bfloat16(), "labels": labels}
    states = torch.randn(tokens, hidden, generator=generator, device=device).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, hidden, generator=generator, device=device) * (2.0 / math.sqrt(hidden)))
    return {"hidden": states, "weight": weight.bfloat16().requires_grad_(True), "teacher": teacher.bfloat16(),
            "labels": labels}


def loss_step(method, inputs, path, chunk_size):
    """One forward + backward; chunk_size 0: plain autograd, None: the default chunking."""
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    teacher = None if method == "sft" else inputs["teacher"]
    if path == "logits":
        inputs["student"].grad = None
        loss, _ = compute_loss(method, inputs["student"], teacher, inputs["labels"], **kwargs)
    else:
        inputs["hidden"].grad = inputs["weight"].grad = None
        if chunk_size == 0:
            loss, _ = compute_loss(method, inputs["hidden"] @ inputs["weight"].T, teacher, inputs["labels"], chunk_size=0)
        else:
            loss, _ = compute_loss_from_hidden(method, inputs["hidden"], inputs["weight"], inputs["labels"],
                                               teacher_logits=teacher, **kwargs)
    loss.backward()
    return float(loss.detach())


def time_loss(method, inputs, path, chunk_size, device, repeat):
    """(median seconds, peak extra bytes, loss) of forward + backward."""
    before = reset_peak(device)
    loss = loss_step(method, inputs, path, chunk_size)
    peak = peak_bytes(device) - before if device.type == "cuda" else None
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss_step(method, inputs, path, chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak, loss


def part_losses(args, scale, device):
    tokens, hidden, repeat = scale["loss_tokens"], scale["loss_hidden"], scale["loss_repeat"]
    rows = []
    for vocab in scale["loss_vocabs"]:
        for path in ("logits", "hidden"):
            inputs = loss_inputs(tokens, vocab, hidden, device, path)
            for method in METHODS:
                row = {"vocab": vocab, "path": path, "method": method}
                try:
                    naive_s, naive_peak, naive_loss = time_loss(method, inputs, path, 0, device, repeat)
                    lean_s, lean_peak, lean_loss = time_loss(method, inputs, path, None, device, repeat)
                    row.update({"naive_s": naive_s, "lean_s": lean_s, "time_ratio": lean_s / naive_s,
                                "naive_peak_gib": gib(naive_peak), "lean_peak_gib": gib(lean_peak),
                                "memory_ratio": (lean_peak / naive_peak) if naive_peak else None,
                                "loss_naive": naive_loss, "loss_lean": lean_loss})
                    if path == "logits":  # bf16 student logits read + gradient written (+ teacher read)
                        moved = tokens * vocab * 2 * (2 if method == "sft" else 3)
                        row["hbm_fraction"] = moved / lean_s / args.hbm_bytes_per_s
                    else:  # logits, gradient wrt hidden, gradient wrt weight: 3 matmuls of 2 N V H
                        row["flops_fraction"] = 3 * 2 * tokens * vocab * hidden / lean_s / args.peak_flops
                except Exception as error:  # noqa: BLE001
                    row.update(error_record(error))
                rows.append(row)
            del inputs
            fresh_accelerate_state()
        print(f"[gpu_check] losses V={vocab} done", flush=True)
    # The chunk size: elements of one [chunk, V] block, for selfevo at the largest vocabulary.
    vocab, sweep = max(scale["loss_vocabs"]), []
    for path in ("logits", "hidden"):
        inputs = loss_inputs(tokens, vocab, hidden, device, path)
        for elements in scale["chunk_sweep"]:
            chunk_tokens = max(1, elements // vocab)
            try:
                seconds, peak, _ = time_loss("selfevo", inputs, path, chunk_tokens, device, repeat)
                sweep.append({"path": path, "elements": elements, "chunk_tokens": chunk_tokens, "seconds": seconds,
                              "peak_gib": gib(peak)})
            except Exception as error:  # noqa: BLE001
                sweep.append({"path": path, "elements": elements, **error_record(error)})
        del inputs
        fresh_accelerate_state()
    best = {}
    for path in ("logits", "hidden"):
        timed = [s for s in sweep if s["path"] == path and "seconds" in s]
        if timed:
            best[path] = min(timed, key=lambda s: s["seconds"])["elements"]
    return {"tokens": tokens, "hidden": hidden, "rows": rows, "chunk_sweep": sweep, "best_chunk_elements": best}


# =============================================================================================
# Part 4: generation
# =============================================================================================

def part_generate(args, scale, work, models, tokenizer):
    import generate
    from kd.io import read_jsonl

    rows = read_jsonl(work / "data" / "test" / "de-en.jsonl")[:scale["gen_inputs"]]
    inputs = work / "gen_input" / "de-en.jsonl"
    inputs.parent.mkdir(parents=True, exist_ok=True)
    inputs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs, outputs = [], {}
    for batch_size in scale["gen_batches"]:
        limit = scale["gen_batch1_rows"] if batch_size == 1 else scale["gen_inputs"]
        out = work / "gen" / f"batch{batch_size}"
        fresh_accelerate_state()
        stats = generate.main(["--model", str(models["student"]), "--input", str(inputs), "--output", str(out),
                               "--batch-size", str(batch_size), "--max-new-tokens", str(scale["gen_new_tokens"]),
                               "--limit", str(limit), "--bf16"])["de-en.jsonl"]
        outputs[batch_size] = {row["id"]: row["raw"] for row in read_jsonl(out / "de-en.jsonl", required=("id",))}
        runs.append({"batch_size": batch_size, "rows": stats["rows"], "new_tokens": stats["new_tokens"],
                     "seconds": stats["seconds"], "tokens_per_s": stats["new_tokens"] / stats["seconds"]})
    fresh_accelerate_state()
    single = outputs[1]
    for run in runs:
        same = sum(outputs[run["batch_size"]].get(key) == value for key, value in single.items())
        run["identical_to_batch1"] = f"{same}/{len(single)}"
    return {"model": "student", "runs": runs}


# =============================================================================================
# Report
# =============================================================================================

def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def markdown(report):
    lines = [f"# GPU check ({report['device_name']}, {report['date']})", "",
             f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
             f"accelerate {report['versions'].get('accelerate')}, deepspeed {report['versions'].get('deepspeed')}; "
             f"scale {report['scale']}; {report['seconds']:.0f} s in all", ""]
    parts = report["parts"]
    train = parts.get("train")
    if train is not None:
        lines.append("## 1. Training, one process, bf16")
        if "error" in train:
            lines += ["", f"FAILED: {train['error']}", ""]
        else:
            lines += ["", f"teacher {train['p_teacher'] / 1e6:,.1f}M, student {train['p_student'] / 1e6:,.1f}M "
                      f"parameters; ideal KD step = {train['ideal_kd_times_sft']:.2f} x sft", "",
                      "| method | s/step | tokens/s | × sft | × ideal | peak GiB | loss path | first loss |",
                      "|---|---:|---:|---:|---:|---:|---|---:|"]
            for method, r in train["methods"].items():
                if "error" in r:
                    lines.append(f"| {method} | FAILED: {r['error'][:120]} | | | | | | |")
                else:
                    lines.append(f"| {method} | {r['step_seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                                 f"{fmt(r.get('times_sft'), '.2f')} | {fmt(r.get('ratio_to_ideal'), '.2f')} | "
                                 f"{fmt(r['peak_gib'], '.1f')} | {r['loss_path']} | {r['first_loss']:.4f} |")
            lines.append("")
    launch = parts.get("launch")
    if launch is not None:
        lines += ["## 2. selfevo under accelerate launch (1 process)", ""]
        if "error" in launch:
            lines += [f"FAILED: {launch['error']}", ""]
        else:
            lines += ["| config | runs | loss path | first loss | vs part 1 | peak GiB | s/step |",
                      "|---|---|---|---:|---:|---:|---:|"]
            for config, r in launch.items():
                if not r["runs"]:
                    lines.append(f"| {config} | FAILED: {r['error'][:160]} | | | | | |")
                    continue
                versus = ("-" if "relative_difference" not in r else
                          f"{r['relative_difference']:.1e} ({'same' if r['same_loss'] else 'DIFFERENT'})")
                lines.append(f"| {config} | yes | {r['loss_path']} | {r['first_loss']:.4f} | {versus} | "
                             f"{fmt(r['peak_gib'], '.1f')} | {r['step_seconds']:.3f} |")
            lines.append("")
    losses = parts.get("losses")
    if losses is not None:
        lines += [f"## 3. kd/losses.py, N = {losses.get('tokens')}, bf16, forward + backward", ""]
        if "error" in losses:
            lines += [f"FAILED: {losses['error']}", ""]
        else:
            lines += ["| V | path | method | naive ms | lean ms | time lean/naive | peak GiB naive → lean | "
                      "memory lean/naive | fraction of peak |", "|---:|---|---|---:|---:|---:|---|---:|---:|"]
            for r in losses["rows"]:
                if "error" in r:
                    lines.append(f"| {r['vocab']} | {r['path']} | {r['method']} | FAILED: {r['error'][:120]} | | | | | |")
                    continue
                fraction = (f"{r['hbm_fraction']:.2f} HBM" if "hbm_fraction" in r else f"{r['flops_fraction']:.2f} FLOP/s")
                lines.append(f"| {r['vocab']} | {r['path']} | {r['method']} | {r['naive_s'] * 1e3:.1f} | "
                             f"{r['lean_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | {fmt(r['naive_peak_gib'], '.2f')} → "
                             f"{fmt(r['lean_peak_gib'], '.2f')} | {fmt(r['memory_ratio'], '.3f')} | {fraction} |")
            lines += ["", "Chunk size sweep (selfevo, largest V): "
                      + "; ".join(f"{s['path']} 2^{int(math.log2(s['elements']))}: "
                                  + (f"{s['seconds'] * 1e3:.1f} ms, {fmt(s['peak_gib'], '.2f')} GiB" if "seconds" in s
                                     else "FAILED") for s in losses["chunk_sweep"]),
                      f"Best: {', '.join(f'{p} 2^{int(math.log2(e))}' for p, e in losses['best_chunk_elements'].items())}"
                      " elements (kd/losses.py CHUNK_ELEMENTS['cuda'] is 2^25).", ""]
    gen = parts.get("generate")
    if gen is not None:
        lines += ["## 4. generate.py, greedy, bf16, student", ""]
        if "error" in gen:
            lines += [f"FAILED: {gen['error']}", ""]
        else:
            lines += ["| batch | rows | new tokens | seconds | tokens/s | rows identical to batch 1 |",
                      "|---:|---:|---:|---:|---:|---|"]
            for r in gen["runs"]:
                lines.append(f"| {r['batch_size']} | {r['rows']} | {r['new_tokens']} | {r['seconds']:.2f} | "
                             f"{r['tokens_per_s']:.1f} | {r['identical_to_batch1']} |")
            lines.append("")
    return "\n".join(lines)


def versions():
    import importlib.metadata as metadata

    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "accelerate", "deepspeed"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child-train":  # internal: part 2's process under accelerate launch
        return child_train(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; run with --device cpu --tiny for the CPU check")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    scale = SCALES["tiny" if args.tiny else "full"]
    device = torch.device(args.device)
    parts = [p for p in args.parts.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
              "versions": versions(), "scale": "tiny" if args.tiny else "full", "settings": scale, "parts": {}}

    import prepare_data

    try:
        prepare_data.main(["--demo", "--out", str(work / "data"), "--demo-train-pairs", "600",
                           "--demo-eval-pairs", str(max(scale["gen_inputs"], 8)), "--seed", "0"])
        models, tokenizer = build_models(scale, work, device)
        report["data"] = write_long_rows(work / "data" / "train.jsonl", tokenizer, scale["length"],
                                         scale["batch"] * (scale["warmup"] + scale["steps"]), work / "data" / "long.jsonl")
    except Exception as error:  # noqa: BLE001 - without models only part 3 can run
        report["setup"] = error_record(error)
        models = tokenizer = None
    fresh_accelerate_state()

    def guarded(name, function, *function_args):
        if name not in parts:
            return
        try:
            if models is None and name != "losses":
                raise RuntimeError(f"setup failed: {report['setup']['error']}")
            report["parts"][name] = function(*function_args)
        except Exception as error:  # noqa: BLE001 - recorded; the next part runs
            report["parts"][name] = error_record(error)
        fresh_accelerate_state()
        write_report(args.out, report, start)

    guarded("train", part_train, args, scale, work, models, device)
    reference = report["parts"].get("train", {}).get("methods", {}).get("selfevo", {}).get("first_loss")
    guarded("launch", part_launch, args, scale, work, models, reference)
    guarded("losses", part_losses, args, scale, device)
    guarded("generate", part_generate, args, scale, work, models, tokenizer)
    table = write_report(args.out, report, start)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(table)
    print(f"\n{args.out / 'gpu_check.json'}\n{args.out / 'gpu_check.md'}")
    return report


def write_report(out, report, start):
    """gpu_check.json and gpu_check.md, rewritten after every part (a crash keeps what was measured)."""
    report["seconds"] = time.perf_counter() - start
    table = markdown(report)
    from kd.io import write_text

    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"), ("gpu_check.md", table + "\n")):
        write_text(out / name, text)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
