"""Benchmark of train_kd.py: seconds per optimizer step of sft and of each distillation method,
against the ideal cost of distillation.

    python bench/bench_train_step.py                    # tiny teacher/student built here, CPU, 1 thread
    python bench/bench_train_step.py --steps 20 --batch-size 32 --threads 0
    python bench/bench_train_step.py --teacher-size 2 48 2 --student-size 1 32 2 --vocab-size 300 --train-pairs 20
                                                        # toy size, seconds (tests/test_bench.py)

A KD step adds a teacher forward to the student's forward + backward. Counting FLOPs per token as
2·P for a forward and 6·P for forward + backward (P = parameters without the input embedding, which
is a lookup), the ideal KD step costs (1 + 2·P_teacher / (6·P_student)) sft steps: the loss itself
is free in that ideal. `ratio` = (KD step time / sft step time) / ideal; goal: every method <= 1.1.

Each method runs train_kd.main in its own process (same seed, same batches, fp32, one torch
thread): the step cost is CPU time, not wall time, so other processes on a shared machine hardly
disturb it: (CPU seconds of a run of warmup + steps optimizer steps - those of a run of warmup
steps) / steps; both runs do the same setup, a first run pays the imports. The wall-clock seconds
of each step (train_kd's own, metrics.jsonl) are kept in the JSON. Peak memory is the peak
resident set size of that process (models, optimizer, activations, loss buffers; Python, torch
and transformers themselves are ~0.4 GiB of it).
The models: a teacher of 4 layers x 256 and a student of 4 layers x 192 (P_t/P_s ~ 1.7, like the
paper's 13B/7B), a 2000-token BPE vocabulary, on the demo data (prepare_data.py --demo).
Results: a markdown table on stdout and JSON in bench/results/bench_train_step.json.
Variants: an entry of --methods may carry train_kd.py flags after the method, e.g.
    python bench/bench_train_step.py --methods "forward,forward --lora-r 8,forward --on-policy-ratio 0.5"
measures a LoRA student (kd/lora.py) and on-policy distillation (kd/onpolicy.py) against plain forward
KD; their rows also give × forward and the optimizer state (2 fp32 AdamW moments per trainable parameter).
The goal applies to the plain methods only.
This is not a test; CPU timings on a shared machine are noisy (--threads 1 by default steadies them).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kd.losses import METHODS  # noqa: E402

GOAL_RATIO = 1.1
UNMEASURED = "not measurable: the longer run took no more CPU time than the shorter one"
TEACHER_SIZE, STUDENT_SIZE = (4, 256, 4), (4, 192, 4)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (default 16)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--teacher-size", type=int, nargs=3, default=TEACHER_SIZE, metavar=("LAYERS", "HIDDEN", "HEADS"),
                        help="the teacher built here (default %(default)s: P_t/P_s ~ 1.7, like 13B/7B)")
    parser.add_argument("--student-size", type=int, nargs=3, default=STUDENT_SIZE, metavar=("LAYERS", "HIDDEN", "HEADS"))
    parser.add_argument("--train-pairs", type=int, default=500, help="demo pairs per language pair (default 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods, each optionally with train_kd.py flags (sft always runs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_train_step.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one method's run, JSON on stdout
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def non_embedding_parameters(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def run_child(args):
    """One method, in this process: CPU seconds per optimizer step and peak RSS, as JSON on stdout.

    CPU time of a run of warmup + steps optimizer steps minus that of a run of warmup steps (same
    setup, same first batches), divided by steps; a first warmup-only run pays the imports.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    import train_kd

    work = Path(args.work)

    def run(name, max_steps):
        out = work / "runs" / f"{args.child}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        method, *flags = args.child.split()
        argv = ["--method", method, *flags, "--student", str(work / "models" / "student"),
                "--train-file", str(work / "data" / "train.jsonl"), "--output-dir", str(out),
                "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
                "--max-steps", str(max_steps), "--logging-steps", "1", "--lr", "1e-4", "--seed", "0"]
        if method != "sft":
            argv += ["--teacher", str(work / "models" / "teacher")]
        start = time.process_time()
        result = train_kd.main(argv)
        seconds = time.process_time() - start
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return seconds, [row for row in rows if row["type"] == "train"], result

    run("imports", args.warmup)
    short, _, _ = run("short", args.warmup)
    long, rows, result = run("long", args.warmup + args.steps)
    wall = [row["tokens"] / row["tokens_per_s"] for row in rows][args.warmup:]
    # A difference of two CPU timings: at toy size on a busy machine it can come out <= 0, which is no
    # measurement of a step. Reported as None (not measurable), never as a number.
    step_seconds = (long - short) / args.steps if long > short else None
    print("BENCH " + json.dumps({
        "step_seconds": step_seconds,
        "wall_step_seconds": wall,
        "tokens_per_step": statistics.mean(row["tokens"] for row in rows),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "trainable_parameters": result["trainable_parameters"],
        "optimizer_state_mib": result["trainable_parameters"] * 2 * 4 / 2**20,  # AdamW: 2 fp32 moments
    }))


def launch_child(method, work, args):
    """One method's run in a fresh process (its own peak memory); returns its BENCH record."""
    command = [sys.executable, __file__, "--child", method, "--work", str(work),
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "warmup", "batch_size", "micro_batch_size", "threads")]]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    line = [x for x in result.stdout.splitlines() if x.startswith("BENCH ")]
    if result.returncode or not line:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(line[-1][len("BENCH "):])


def compare(measured, methods, ideal):
    """Each method's ratios to sft, forward and the ideal (None where a step time is not measurable),
    the Markdown table, and whether every plain KD method is within GOAL_RATIO of the ideal (None:
    not judged, a ratio is missing)."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    sft = measured["sft"]["step_seconds"]
    table = ["| method | CPU s / step | × sft | × forward | ideal × sft | ratio to ideal | trainable params | "
             "optimizer state (MiB) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    forward = measured.get("forward", {}).get("step_seconds")
    rows = {}
    for method in methods:
        step = measured[method]["step_seconds"]
        times_sft = ratio(step, sft)
        method_ideal = 1.0 if method == "sft" else ideal
        rows[method] = {**measured[method], "times_sft": times_sft, "ideal_times_sft": method_ideal,
                        "ratio_to_ideal": ratio(times_sft, method_ideal)}
        if "forward" in measured:
            rows[method]["times_forward"] = ratio(step, forward)
        table.append(f"| {method} | {fmt(step, '.3f')} | {fmt(times_sft, '.2f')} | {fmt(ratio(step, forward), '.2f')} | "
                     f"{method_ideal:.2f} | {fmt(rows[method]['ratio_to_ideal'], '.2f')} | "
                     f"{measured[method]['trainable_parameters']:,} | {measured[method]['optimizer_state_mib']:.2f} | "
                     f"{measured[method]['peak_rss_mib']:.0f} |")
    kd_ratios = [rows[m]["ratio_to_ideal"] for m in methods if m != "sft" and " " not in m]  # plain methods
    met = None if None in kd_ratios else all(r <= GOAL_RATIO for r in kd_ratios)
    return rows, table, met


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    import prepare_data
    from kd.models import build_tiny_models

    methods = ["sft"] + [" ".join(m.split()) for m in args.methods.split(",") if m.strip() and m.strip() != "sft"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_data.main(["--demo", "--out", str(work / "data"), "--demo-train-pairs", str(args.train_pairs),
                           "--seed", "0"])
        build_tiny_models(work / "data" / "train.jsonl", work / "models", vocab_size=args.vocab_size,
                          teacher_size=tuple(args.teacher_size), student_size=tuple(args.student_size))
        p_teacher = non_embedding_parameters(work / "models" / "teacher")
        p_student = non_embedding_parameters(work / "models" / "student")
        ideal = 1 + 2 * p_teacher / (6 * p_student)
        measured = {}
        for method in methods:
            measured[method] = launch_child(method, work, args)
            step = measured[method]["step_seconds"]
            print(f"{method}: " + (f"{step:.3f} CPU s/step" if step is not None else UNMEASURED), file=sys.stderr)

    rows, table, met = compare(measured, methods, ideal)
    report = {
        "benchmark": "train_kd.py seconds per optimizer step, KD methods vs sft and the ideal 1 + 2 P_t / (6 P_s)",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "setup": {"teacher_size": tuple(args.teacher_size), "student_size": tuple(args.student_size),
                  "vocab_size": args.vocab_size, "train_pairs": args.train_pairs,
                  "p_teacher_non_embedding": p_teacher, "p_student_non_embedding": p_student,
                  "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                  "steps": args.steps, "warmup": args.warmup},
        "ideal_kd_times_sft": ideal,
        "goal": f"every KD method <= {GOAL_RATIO} x ideal",
        "goal_met": met,
        "methods": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"P_teacher = {p_teacher:,}, P_student = {p_student:,} (without input embeddings); "
          f"ideal KD step = {ideal:.2f} x sft")
    print("\n".join(table))
    print(f"goal (every KD method <= {GOAL_RATIO} x ideal): "
          + {True: "met", False: "NOT met", None: "not judged (" + UNMEASURED + ")"}[met])
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
