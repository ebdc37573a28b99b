"""Benchmark of generate.py: tokens/s of batched greedy decoding (batch 16) vs one row at a time (batch 1).

    python bench/bench_generate.py                          # tiny Llama (4 x 256) built here, 64 inputs, CPU
    python bench/bench_generate.py --model runs/sft/final --inputs 64 --max-new-tokens 64 --threads 0

Both runs call generate.main on the same 64 rows of the demo de-en test file (prepare_data.py
--demo), greedy, fp32, into fresh output folders; tokens/s = response tokens produced (up to EOS)
/ wall-clock seconds of the decoding loop (generate.py's own count; model loading excluded, one
warm-up run first). The two output files must be byte-identical. A randomly initialised tiny model
rarely emits EOS, so nearly every row runs to --max-new-tokens: the comparison measures decoding
throughput, not early stopping. Goal: batch 16 at least 3x batch 1.
Results: a markdown table on stdout and JSON in bench/results/bench_generate.json.
This is not a test; CPU timings on a shared machine are noisy (--threads 1 by default steadies them).
"""

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402
import prepare_data  # noqa: E402
from kd.models import build_tiny_models  # noqa: E402

GOAL_SPEEDUP = 3.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a tiny 4-layer x 256 Llama built on the demo data)")
    parser.add_argument("--inputs", type=int, default=64, help="rows translated by both runs (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="batched run's batch size (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_generate.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))

    # ---- data and model ----
    data = work / "demo"
    prepare_data.main(["--demo", "--out", str(data), "--demo-train-pairs", "500",
                       "--demo-eval-pairs", str(max(args.inputs, 8)), "--seed", "0"])
    test_file = data / "test" / "de-en.jsonl"
    model = args.model or str(build_tiny_models(data / "train.jsonl", work / "models", vocab_size=1000)["teacher"])

    # ---- runs: warm-up, batch 1, batch N ----
    common = ["--model", model, "--input", str(test_file), "--max-new-tokens", str(args.max_new_tokens)]
    generate.main(common + ["--output", str(work / "warmup"), "--limit", "4", "--batch-size", "4"])
    runs = {}
    for batch_size in (1, args.batch_size):
        out = work / f"batch{batch_size}"
        stats = generate.main(common + ["--output", str(out), "--limit", str(args.inputs), "--batch-size", str(batch_size)])
        stats = stats[test_file.name]
        runs[batch_size] = {"batch_size": batch_size, "rows": stats["rows"], "new_tokens": stats["new_tokens"],
                            "seconds": stats["seconds"], "tokens_per_s": stats["new_tokens"] / stats["seconds"],
                            "output": out / test_file.name}
    single, batched = runs[1], runs[args.batch_size]
    identical = single["output"].read_bytes() == batched["output"].read_bytes()
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]

    # ---- report ----
    lines = ["| batch size | rows | new tokens | seconds | tokens/s |", "|---:|---:|---:|---:|---:|"]
    for run in (single, batched):
        lines.append(f"| {run['batch_size']} | {run['rows']} | {run['new_tokens']} | {run['seconds']:.2f} | {run['tokens_per_s']:.1f} |")
    lines.append("")
    lines.append(f"speed-up batch {args.batch_size} / batch 1: {speedup:.2f}x (goal >= {GOAL_SPEEDUP:.0f}x: "
                 f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}); outputs identical: {identical}")
    print("\n".join(lines))
    result = {
        "model": model if args.model else "tiny Llama 4 layers x 256 hidden, 4 heads (kd.models.build_tiny_models)",
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "inputs": args.inputs, "max_new_tokens": args.max_new_tokens,
        "runs": [{k: v for k, v in run.items() if k != "output"} for run in (single, batched)],
        "speedup": speedup, "goal_speedup": GOAL_SPEEDUP, "goal_met": speedup >= GOAL_SPEEDUP,
        "outputs_identical": identical, "table": "\n".join(lines),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.out}")
    shutil.rmtree(work, ignore_errors=True)
    if not identical:
        raise SystemExit("bench_generate.py: batched and one-at-a-time outputs differ")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
