"""Benchmark of kd/losses.py: forward+backward time and peak extra memory, naive vs lean.

    python bench/bench_losses.py                                  # N=4096, V=32000, fp32, CPU
    python bench/bench_losses.py --device cuda --repeat 10        # the same on a GPU
    python bench/bench_losses.py --tokens 1024 --methods forward selfevo

For every method two comparisons:
- logits: naive = compute_loss(..., chunk_size=0), plain autograd over [N, V] tensors;
          lean  = compute_loss(...) with its default chunked path (gradient computed in forward).
- hidden: naive = logits = hidden @ W.T, then compute_loss(..., chunk_size=0);
          lean  = compute_loss_from_hidden(...), which never builds the [N, V] student logits.
and for every method with a hand-derived fast path (kd/fast_paths.py) a third one:
          autograd = the lean entry with fast_path=False: each chunk's gradient by autograd of the
          method's formula (kd/methods.py), what a new method without a fast path runs. Its goals:
          memory <= 0.25x naive on the hidden path, time <= 1.5x the fast path (the lean row).
Inputs: teacher logits ~ 2·N(0,1) with one boosted token per row (the label, p ≈ 0.1-0.99),
student logits = teacher + 0.7·N(0,1), so selfevo finds a realistic share of hard tokens
(Γ = 0.4: about a third); hidden path: hidden ~ N(0,1), W ~ 2/sqrt(H)·N(0,1).

Memory ("peak extra"): the highest memory in use during one forward+backward minus the memory in
use just before it (inputs allocated, no gradients). On CUDA: torch.cuda.max_memory_allocated
after reset_peak_memory_stats. On CPU torch keeps no allocator statistics, so each configuration
runs in a fresh subprocess and we read the kernel's resident-set high-water mark (VmHWM in
/proc/self/status) after resetting it with /proc/self/clear_refs ("5"), with glibc told to map
and unmap every block >= 1 MiB on its own (MALLOC_MMAP_THRESHOLD_), so RSS follows torch's live
tensors. The timing runs in another subprocess with glibc's defaults.

Time: median of --repeat forward+backward runs after one warm-up run; on CUDA
wall-clock, on CPU the process's CPU time (all threads), because on a CPU shared with other jobs
the wall clock mostly measures waiting for a core (both are saved in the JSON).
Results: a markdown table on stdout and JSON in bench/results/bench_losses.json (rewritten after
every row). This is not a test.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kd.losses import METHODS, compute_loss, compute_loss_from_hidden  # noqa: E402
from kd.methods import REGISTRY  # noqa: E402

GOAL_MEMORY_RATIO = 0.2
GOAL_TIME_RATIO = 1.0
GOAL_SELFEVO_OVER_FORWARD = 1.15
GOAL_AUTOGRAD_MEMORY_RATIO = 0.25   # autograd lean path / naive, hidden path
GOAL_AUTOGRAD_OVER_FAST = 1.5       # autograd lean path / fast path, time


# ----------------------------------------------------------------------------- measuring


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    return _rss_bytes("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_bytes("VmHWM")


def _make_teacher_logits(tokens, vocab, generator, device):
    """2·N(0,1) with the label boosted by 10-16: built in place, so no transient [N, V] copies."""
    teacher = torch.randn(tokens, vocab, generator=generator, device=device).mul_(2.0)
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    boost = torch.rand(tokens, generator=generator, device=device).mul_(6.0).add_(10.0)
    teacher[torch.arange(tokens, device=device), labels] += boost
    return teacher, labels


def run_worker(spec: dict) -> dict:
    """One configuration in this process: memory of the first run, then timed repeats."""
    device = torch.device(spec["device"])
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, vocab, hidden_size, method = spec["tokens"], spec["vocab"], spec["hidden"], spec["method"]
    teacher, labels = _make_teacher_logits(tokens, vocab, generator, device)
    if spec["path"] == "logits":
        student = torch.randn(tokens, vocab, generator=generator, device=device).mul_(0.7).add_(teacher)
        student.requires_grad_(True)
        leaves = [student]
        if spec["impl"] == "naive":
            def loss_fn():
                return compute_loss(method, student, teacher, labels, chunk_size=0)
        else:
            def loss_fn():
                return compute_loss(method, student, teacher, labels, fast_path=spec["impl"] == "lean")
    else:
        hidden = torch.randn(tokens, hidden_size, generator=generator, device=device).requires_grad_(True)
        weight = torch.randn(vocab, hidden_size, generator=generator, device=device)
        weight.mul_(2.0 / math.sqrt(hidden_size)).requires_grad_(True)
        leaves = [hidden, weight]
        if spec["impl"] == "naive":
            def loss_fn():
                return compute_loss(method, hidden @ weight.T, teacher, labels, chunk_size=0)
        else:
            def loss_fn():
                return compute_loss_from_hidden(method, hidden, weight, labels, teacher_logits=teacher,
                                                fast_path=spec["impl"] == "lean")

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss, stats = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return stats

    if spec["measure"] == "memory":
        before = _reset_peak(device)
        stats = step()
        return {**spec, "peak_extra_bytes": _peak(device) - before, "hard_fraction": stats["hard_fraction"],
                "loss": stats["loss"]}
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(spec["repeat"]):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    # On a GPU the wall clock is the measure; on a CPU shared with other jobs the process's CPU
    # time (all threads) is the work done, while the wall clock also counts waiting for a core.
    time_s = statistics.median(wall if device.type == "cuda" else cpu)
    return {**spec, "time_s": time_s, "wall_s": wall, "cpu_s": cpu}


# ----------------------------------------------------------------------------- driver


def run_in_subprocess(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["measure"] == "memory" and spec["device"] == "cpu":
        # A fixed mmap threshold makes glibc map every block >= 1 MiB on its own and unmap it on
        # free, so RSS is exactly the live tensors (its default, adaptive threshold keeps freed
        # blocks up to 32 MiB in the heap, where they still count, by chance, for hundreds of MB).
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H of the hidden-state entry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--paths", nargs="+", default=["logits", "hidden"], choices=["logits", "hidden"])
    parser.add_argument("--no-autograd", action="store_true",
                        help="skip the autograd rows (the lean entries with fast_path=False)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_losses.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    print(f"# kd/losses.py: N={args.tokens} tokens, V={args.vocab}, H={args.hidden}, float32, "
          f"device={args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}", flush=True)
    rows = []
    for path in args.paths:
        for method in args.methods:
            results = {}
            autograd = not args.no_autograd and REGISTRY[method].fast is not None
            for impl in ("naive", "lean") + (("autograd",) if autograd else ()):
                spec = dict(method=method, path=path, impl=impl, tokens=args.tokens, vocab=args.vocab,
                            hidden=args.hidden, device=args.device, repeat=args.repeat)
                results[impl] = {**run_in_subprocess({**spec, "measure": "memory"}),
                                 **run_in_subprocess({**spec, "measure": "time"})}
            naive, lean = results["naive"], results["lean"]
            row = dict(method=method, path=path,
                       naive_time_s=naive["time_s"], lean_time_s=lean["time_s"],
                       time_ratio=lean["time_s"] / naive["time_s"],
                       naive_peak_extra_mb=naive["peak_extra_bytes"] / 2**20,
                       lean_peak_extra_mb=lean["peak_extra_bytes"] / 2**20,
                       memory_ratio=lean["peak_extra_bytes"] / naive["peak_extra_bytes"],
                       hard_fraction=lean["hard_fraction"],
                       loss_naive=naive["loss"], loss_lean=lean["loss"],
                       naive_wall_s=naive["wall_s"], lean_wall_s=lean["wall_s"],
                       naive_cpu_s=naive["cpu_s"], lean_cpu_s=lean["cpu_s"])
            if autograd:
                auto = results["autograd"]
                row.update(autograd_time_s=auto["time_s"], autograd_peak_extra_mb=auto["peak_extra_bytes"] / 2**20,
                           autograd_memory_ratio=auto["peak_extra_bytes"] / naive["peak_extra_bytes"],
                           autograd_over_fast=auto["time_s"] / lean["time_s"], loss_autograd=auto["loss"],
                           autograd_wall_s=auto["wall_s"], autograd_cpu_s=auto["cpu_s"])
            rows.append(row)
            print(f"  {method:13s} {path:6s} time {row['time_ratio']:.2f}x  memory {row['memory_ratio']:.3f}x",
                  file=sys.stderr, flush=True)
            write_results(args, rows)

    write_results(args, rows, final=True)


def write_results(args, rows, final=False):
    time_kind = "wall" if args.device.startswith("cuda") else "CPU"
    lines = [f"| method | path | naive s ({time_kind}) | lean s ({time_kind}) | time lean/naive | naive peak MB | lean peak MB "
             "| memory lean/naive | hard fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['path']} | {r['naive_time_s']:.3f} | {r['lean_time_s']:.3f} "
                     f"| {r['time_ratio']:.2f} | {r['naive_peak_extra_mb']:.0f} | {r['lean_peak_extra_mb']:.0f} "
                     f"| {r['memory_ratio']:.3f} | {r['hard_fraction']:.2f} |")
    selfevo_over_forward = {}
    for path in args.paths:
        by_method = {r["method"]: r for r in rows if r["path"] == path}
        if "selfevo" in by_method and "forward" in by_method:
            selfevo_over_forward[path] = by_method["selfevo"]["lean_time_s"] / by_method["forward"]["lean_time_s"]
            lines.append(f"\nselfevo / forward time ({path}, lean path): {selfevo_over_forward[path]:.2f}x "
                         f"(goal <= {GOAL_SELFEVO_OVER_FORWARD})")
    missed = [f"{r['method']}/{r['path']}: " + ", ".join(
        what for what, bad in (("time", r["time_ratio"] > GOAL_TIME_RATIO),
                               ("memory", r["memory_ratio"] > GOAL_MEMORY_RATIO)) if bad)
        for r in rows if r["time_ratio"] > GOAL_TIME_RATIO or r["memory_ratio"] > GOAL_MEMORY_RATIO]
    lines.append(f"\ngoals: memory <= {GOAL_MEMORY_RATIO}x, time <= {GOAL_TIME_RATIO}x naive; missed: "
                 + ("; ".join(missed) if missed else "none"))
    auto_rows = [r for r in rows if "autograd_time_s" in r]
    if auto_rows:
        lines += ["", "Autograd of the formula (the lean entries with fast_path=False), against the fast path and naive:",
                  "", f"| method | path | fast s ({time_kind}) | autograd s ({time_kind}) | time autograd/fast "
                  "| autograd peak MB | memory autograd/naive |", "|---|---|---|---|---|---|---|"]
        for r in auto_rows:
            lines.append(f"| {r['method']} | {r['path']} | {r['lean_time_s']:.3f} | {r['autograd_time_s']:.3f} "
                         f"| {r['autograd_over_fast']:.2f} | {r['autograd_peak_extra_mb']:.0f} "
                         f"| {r['autograd_memory_ratio']:.3f} |")
        auto_missed = [f"{r['method']}/{r['path']}: " + ", ".join(
            what for what, bad in (("time", r["autograd_over_fast"] > GOAL_AUTOGRAD_OVER_FAST),
                                   ("memory", r["path"] == "hidden"
                                    and r["autograd_memory_ratio"] > GOAL_AUTOGRAD_MEMORY_RATIO)) if bad)
            for r in auto_rows if r["autograd_over_fast"] > GOAL_AUTOGRAD_OVER_FAST
            or (r["path"] == "hidden" and r["autograd_memory_ratio"] > GOAL_AUTOGRAD_MEMORY_RATIO)]
        lines.append(f"\nautograd goals: memory <= {GOAL_AUTOGRAD_MEMORY_RATIO}x naive (hidden path), time <= "
                     f"{GOAL_AUTOGRAD_OVER_FAST}x the fast path; missed: " + ("; ".join(auto_missed) or "none"))
    table = "\n".join(lines)
    if final:
        print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": dict(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, device=args.device,
                       dtype="float32", repeat=args.repeat, torch=torch.__version__,
                       threads=torch.get_num_threads()),
        "time_method": ("median wall-clock" if args.device.startswith("cuda") else
                        "median process CPU time (all threads)"),
        "memory_method": ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
                          "VmHWM after /proc/self/clear_refs=5, fresh subprocess per configuration, "
                          "MALLOC_MMAP_THRESHOLD_=1MiB"),
        "rows": rows, "selfevo_over_forward": selfevo_over_forward, "goals_missed": missed,
        "table_markdown": table}, indent=1))


if __name__ == "__main__":
    main()
