"""What a stored teacher (cache_teacher.py, train_kd.py --teacher-cache) costs and what its top-K truncation changes.

    python bench/bench_teacher_cache.py                       # tiny models built here (seconds to minutes)
    python bench/bench_teacher_cache.py --teacher T --student S --train-file F   # and a trained teacher

Measured, written to --out (JSON) and printed:
  truncation   per setup and K: for every KD method, the relative error of the loss and of its gradient
               w.r.t. the student logits against the live teacher (mean over micro-batches, Γ = 0.4 for
               selfevo), the share of tokens whose hard/easy decision d > Γ flips (selfevo), the mean
               teacher tail mass (1 − top-K mass); the flips also at Γ = the median live d of
               the micro-batch (half the tokens hard: where the decision is most sensitive). Stored as fp32 (truncation alone) and in --dtype.
  sampling     (with --teacher) per K of --top-k: top-K in --dtype against RS-KD's sampled rows
               (cache_teacher.py --sampling S) of the same bytes per position (S = 2K + 2 draws of 2 bytes),
               every KD method: the relative error of the loss and of its gradient, their bias (the error
               of the mean over --draws independent draws: what remains in expectation; top-K draws nothing,
               its bias is its error), the noise floor of that mean (error/√draws: a bias at the floor is no
               bias), and the hard/easy flips of the selecting methods.
  cost         (with --teacher): train_kd.py seconds per optimizer step of SFT, of selfevo with the live
               teacher and with the cache; the CPU time to build the cache against one epoch of plain teacher
               forward passes (each timing repeated --repeats times, interleaved, the fastest kept); bytes per response position, and the size for the paper's 52,574 examples.
  sweep        (with --teacher): the training runs of fig2.sh's Γ sweep (6 values) at toy scale, wall
               and process CPU time with the live teacher and with the cache (its build included). Generation and
               evaluation, the same in both, are left out.
CPU numbers on a shared machine: ratios are what carries over, not seconds. --parts runs some parts
and keeps the others' results from --out.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from kd.data import IGNORE_INDEX, TrainCollator, TranslationDataset
from kd.io import read_jsonl, write_json
from kd.losses import KD_METHODS, compute_loss
from kd.models import load_model, load_tokenizer
from kd.methods import REGISTRY
from kd.teacher_cache import compress_rows, dense_log_probs, sample_rows

GAMMA = 0.4
ALMA_EXAMPLES = 52574
# Mean response tokens (reference + EOS) of the paper's training data with Llama's tokenizer: mean
# reference of ALMA's de-en + cs-en human-written pairs ~135 characters at kd/estimate.py's 3.5 per token.
ALMA_RESPONSE_TOKENS = 135 / 3.5 + 1
LLAMA_VOCAB = 32000


def batches(train_file, tokenizer, examples, batch_size, max_length=512):
    rows = read_jsonl(train_file)[:examples]
    dataset = TranslationDataset(rows, tokenizer, max_length)
    collate = TrainCollator(tokenizer.pad_token_id)
    return [collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            for s in range(0, len(dataset), batch_size)]


def response_logits(model, batch):
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    counted = targets != IGNORE_INDEX
    keep = counted.any(0).nonzero().squeeze(1)  # the lm_head at response positions only, as train_kd.py
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                       use_cache=False).logits
    return logits[counted[:, keep]].float(), targets[counted]


def stored(log_p, top_k, dtype):
    rows = compress_rows(log_p, top_k)
    rows["log_probs"] = rows["log_probs"].to(dtype).float()
    return dense_log_probs(rows["log_probs"], rows.get("token_ids"), rows.get("log_rest"), log_p.shape[1]), rows


def loss_and_grad(method, student_logits, teacher, labels):
    leaf = student_logits.clone().requires_grad_(True)
    loss, stats = compute_loss(method, leaf, teacher, labels, gamma=GAMMA, token_stats=True)
    loss.backward()
    return float(loss), leaf.grad, stats["token_hard"]


STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def live_logits(teacher_path, student_path, train_file, examples):
    """[(teacher log-probs, student logits, labels)] of the response tokens, in batches of 16 examples."""
    tokenizer = load_tokenizer(student_path)
    teacher, student = load_model(teacher_path).eval(), load_model(student_path).eval()
    parts = []
    for batch in batches(train_file, tokenizer, examples, 16):
        t_logits, labels = response_logits(teacher, batch)
        s_logits, _ = response_logits(student, batch)
        parts.append((torch.log_softmax(t_logits, -1), s_logits, labels))
    return parts


def truncation(teacher_path, student_path, train_file, ks, dtype, examples):
    parts = live_logits(teacher_path, student_path, train_file, examples)
    vocab = parts[0][0].shape[1]
    table = []
    for top_k in ks:
        if top_k >= vocab:
            continue
        for storage in sorted({"fp32", dtype}):
            store_dtype = STORE_DTYPES[storage]
            per_method = {m: {"loss": [], "grad": [], "flips": []} for m in KD_METHODS}
            tail, median_flips = [], []
            for log_p, s_logits, labels in parts:
                dense, rows = stored(log_p, top_k, store_dtype)
                tail.append(float(rows["log_rest"].exp().mean()))
                # d > Γ flips where Γ is the median live d: half the tokens hard, the most sensitive Γ
                d_live = compute_loss("noevo", s_logits, log_p, labels, token_stats=True)[1]["token_difficulty"]
                d_k = compute_loss("noevo", s_logits, dense, labels, token_stats=True)[1]["token_difficulty"]
                gamma = d_live.median()
                median_flips.append(float(((d_live > gamma) != (d_k > gamma)).float().mean()))
                for method in KD_METHODS:
                    live_loss, live_grad, live_hard = loss_and_grad(method, s_logits, log_p, labels)
                    k_loss, k_grad, k_hard = loss_and_grad(method, s_logits, dense, labels)
                    per_method[method]["loss"].append(abs(k_loss - live_loss) / abs(live_loss))
                    per_method[method]["grad"].append(float((k_grad - live_grad).norm() / live_grad.norm()))
                    per_method[method]["flips"].append(float((k_hard != live_hard).float().mean()))
            row = {"top_k": top_k, "dtype": storage, "vocab": vocab, "mean_tail_mass": sum(tail) / len(tail),
                   "flips_at_median_gamma": sum(median_flips) / len(median_flips),
                   "methods": {m: {"loss_rel_error": sum(v["loss"]) / len(v["loss"]),
                                   "grad_rel_error": sum(v["grad"]) / len(v["grad"]),
                                   "hard_easy_flips": sum(v["flips"]) / len(v["flips"])}
                               for m, v in per_method.items()}}
            table.append(row)
            worst = max(row["methods"].values(), key=lambda r: r["grad_rel_error"])
            print(f"  K={top_k:4d} {storage}: tail {row['mean_tail_mass']:.4f}, worst grad error "
                  f"{worst['grad_rel_error']:.2e}, selfevo flips {row['methods']['selfevo']['hard_easy_flips']:.4f} "
                  f"(at the median d: {row['flips_at_median_gamma']:.4f})",
                  flush=True)
    return table


def relative(a, b):
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def sampling_vs_top_k(teacher_path, student_path, train_file, ks, dtype, examples, draws):
    """Top-K (stored in dtype) against sampled rows of the same bytes, every KD method: error and bias of
    the loss and the gradient against the live teacher, flips of the hard/easy decision."""
    parts = live_logits(teacher_path, student_path, train_file, examples)
    vocab = parts[0][0].shape[1]
    store_dtype = STORE_DTYPES[dtype]
    table = []
    for top_k in ks:
        if top_k >= vocab:
            continue
        samples = 2 * top_k + 2  # 2-byte ids (V <= 65536) in the bytes of K fp16 log-probs, K ids and one rest
        stats = {m: {kind: {"loss_error": [], "loss_bias": [], "grad_error": [], "grad_bias": [], "floor": [],
                            "flips": []} for kind in ("top_k", "sampled")} for m in KD_METHODS}
        for index, (log_p, s_logits, labels) in enumerate(parts):
            dense_k, _ = stored(log_p, top_k, store_dtype)
            drawn = [dense_log_probs(None, sample_rows(log_p, samples, torch.Generator().manual_seed(
                1000 * index + r))["token_ids"], None, vocab) for r in range(draws)]
            for method in KD_METHODS:
                live_loss, live_grad, live_hard = loss_and_grad(method, s_logits, log_p, labels)
                kinds = {"top_k": [dense_k]}
                if not REGISTRY[method].reads_q_over_p:  # KL(q‖p̂) is infinite on the zeros of sampled rows
                    kinds["sampled"] = drawn
                for kind, teachers in kinds.items():
                    results = [loss_and_grad(method, s_logits, teacher_rows, labels) for teacher_rows in teachers]
                    losses = torch.tensor([r[0] for r in results], dtype=torch.float64)
                    grads = torch.stack([r[1] for r in results])
                    row = stats[method][kind]
                    row["loss_error"].append(float((losses - live_loss).abs().mean()) / abs(live_loss))
                    row["loss_bias"].append((float(losses.mean()) - live_loss) / abs(live_loss))
                    errors = [relative(g, live_grad) for g in grads]
                    row["grad_error"].append(sum(errors) / len(errors))
                    row["grad_bias"].append(relative(grads.mean(0), live_grad))
                    row["floor"].append(sum(errors) / len(errors) / math.sqrt(len(errors)))
                    row["flips"].append(sum(float((r[2] != live_hard).float().mean()) for r in results) / len(results))
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        entry = {"top_k": top_k, "sampling": samples, "dtype": dtype, "vocab": vocab, "draws": draws,
                 "bytes_per_position": {"top_k": top_k * (2 + 2) + 4, "sampled": samples * 2},
                 "methods": {m: {kind: {name: mean(values) for name, values in row.items()}
                                 for kind, row in kinds_.items() if row["loss_error"]}
                             for m, kinds_ in stats.items()}}
        table.append(entry)
        forward = entry["methods"]["forward"]
        print(f"  K={top_k} / S={samples}: forward gradient bias {forward['top_k']['grad_bias']:.2e} (top-K) / "
              f"{forward['sampled']['grad_bias']:.2e} (sampled, floor {forward['sampled']['floor']:.2e})", flush=True)
    return table


def parameters(path):
    return sum(p.numel() for p in load_model(path).parameters())


def train_seconds(argv):
    import train_kd

    result = train_kd.main(argv)
    return result["train_seconds"] / result["steps"]


def teacher_epoch(teacher_path, train_file, batch_size):
    """One epoch of plain teacher forward passes (model loading included, as in a cache build)."""
    tokenizer = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path).eval()
    for batch in batches(train_file, tokenizer, None, batch_size, max_length=256):
        response_logits(teacher, batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="a trained teacher (save_pretrained folder) for the cost and sweep parts")
    parser.add_argument("--student", help="its student (base model)")
    parser.add_argument("--train-file", help="their train.jsonl")
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--default-k", type=int, default=128, help="K of the cost and sweep parts")
    parser.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"), help="storage precision")
    parser.add_argument("--examples", type=int, default=64, help="training examples of the truncation table")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gammas", default="0.1 0.2 0.3 0.4 0.5 0.6", help="fig2.sh's GAMMAS")
    parser.add_argument("--sweep-steps", type=int, default=4, help="optimizer steps per run of the sweep")
    parser.add_argument("--draws", type=int, default=16, help="independent draws of the sampled rows (their bias)")
    parser.add_argument("--parts", default="truncation,sampling,cost,sweep",
                        help="which parts to run; the others keep their results from --out when it exists")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timing (the fastest counts)")
    parser.add_argument("--out", default="bench/results/bench_teacher_cache.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_teacher_cache."))
    parts = set(args.parts.split(","))
    report = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {"setups": {}}
    report.update({"settings": vars(args), "torch_threads": torch.get_num_threads()})
    try:
        if "truncation" in parts or "sampling" in parts:
            import make_tiny_models
            import prepare_data

            prepare_data.main(["--demo", "--out", str(work / "data"), "--demo-train-pairs", "300", "--seed", "1"])
            tiny = make_tiny_models.main(["--data", str(work / "data"), "--out", str(work / "tiny"),
                                          "--vocab-size", "600", "--teacher-layers", "2", "--teacher-hidden", "64",
                                          "--teacher-heads", "2", "--student-layers", "1", "--student-hidden", "32",
                                          "--student-heads", "2"])
            setup = report["setups"].setdefault("tiny (tests' models, random init)", {})
            if "truncation" in parts:
                print("truncation, tiny models (random init, vocabulary 600)", flush=True)
                setup["truncation"] = truncation(str(tiny["teacher"]), str(tiny["student"]), work / "data" / "train.jsonl",
                                                 args.top_k, args.dtype, args.examples)
            if "sampling" in parts:
                print("sampling against top-K, tiny models (random init: the worst case of truncation)", flush=True)
                setup["sampling"] = sampling_vs_top_k(str(tiny["teacher"]), str(tiny["student"]),
                                                      work / "data" / "train.jsonl", args.top_k, args.dtype,
                                                      args.examples, args.draws)
            write_json(args.out, report)
        if args.teacher:
            setup = report["setups"].setdefault(f"trained teacher {args.teacher}", {})
            if "truncation" in parts:
                print(f"truncation, trained teacher {args.teacher}", flush=True)
                setup["truncation"] = truncation(args.teacher, args.student, args.train_file, args.top_k, args.dtype,
                                                 args.examples)
                write_json(args.out, report)
            if "sampling" in parts:
                print(f"sampling against top-K, trained teacher {args.teacher}", flush=True)
                setup["sampling"] = sampling_vs_top_k(args.teacher, args.student, args.train_file, args.top_k,
                                                      args.dtype, args.examples, args.draws)
                write_json(args.out, report)
            if "cost" in parts:
                setup["cost"] = cost(args, work)
                write_json(args.out, report)
            if "sweep" in parts:
                setup["sweep"] = sweep(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "setups"}, indent=1))
    return report


def build_cache(args, out):
    import cache_teacher

    return cache_teacher.main(["--teacher", args.teacher, "--train-file", args.train_file, "--out", str(out),
                               "--top-k", str(args.default_k), "--dtype", args.dtype, "--max-length", "256",
                               "--batch-size", "8"])


def common_args(args):
    return ["--student", args.student, "--train-file", args.train_file, "--batch-size", str(args.batch_size),
            "--micro-batch-size", str(args.batch_size), "--lr", "1e-3", "--max-length", "256", "--logging-steps", "100"]


def cost(args, work):
    """Seconds per optimizer step (train_kd.py's own clock) and the cache build against one epoch of
    teacher forward passes (process CPU time); each repeated, interleaved, the fastest kept."""
    times = {"sft": [], "selfevo_live_teacher": [], "selfevo_cache": [], "build": [], "epoch": []}
    steps = ["--max-steps", str(args.steps)]
    manifest = None
    for repeat in range(args.repeats):
        cache = work / f"cache{repeat}"
        start = time.process_time()
        manifest = build_cache(args, cache)
        times["build"].append(time.process_time() - start)
        start = time.process_time()
        teacher_epoch(args.teacher, args.train_file, 8)
        times["epoch"].append(time.process_time() - start)
        for mode, extra in (("sft", ["--method", "sft"]),
                            ("selfevo_live_teacher", ["--method", "selfevo", "--teacher", args.teacher]),
                            ("selfevo_cache", ["--method", "selfevo", "--teacher-cache", str(cache)])):
            times[mode].append(train_seconds([*extra, "--output-dir", str(work / f"{mode}{repeat}"),
                                              *common_args(args), *steps]))
    best = {name: min(values) for name, values in times.items()}
    bytes_per_position = 4 * args.default_k + 4 if args.dtype != "fp32" else 6 * args.default_k + 4
    result = {
        "seconds_per_step": {k: best[k] for k in ("sft", "selfevo_live_teacher", "selfevo_cache")},
        "cache_step_over_sft": best["selfevo_cache"] / best["sft"],
        "live_step_over_sft": best["selfevo_live_teacher"] / best["sft"],
        "live_ideal_over_sft": 1 + 2 * parameters(args.teacher) / (6 * parameters(args.student)),
        "cache_build_cpu_seconds": best["build"], "teacher_epoch_forward_cpu_seconds": best["epoch"],
        "build_over_epoch_of_forwards": best["build"] / best["epoch"],
        "all_timings": times,
        "measured_bytes_per_position": manifest["bytes_per_position"], "positions": manifest["positions"],
        "llama_bytes_per_position": bytes_per_position,
        "paper_data_gib": bytes_per_position * ALMA_EXAMPLES * ALMA_RESPONSE_TOKENS / 2**30,
        "paper_data_note": f"{ALMA_EXAMPLES} examples x {ALMA_RESPONSE_TOKENS:.1f} response tokens, K={args.default_k} "
                           f"{args.dtype}, uint16 ids (Llama's vocabulary {LLAMA_VOCAB} < 65536), float32 rest",
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def sweep(args, work):
    """fig2.sh's Γ sweep (training runs only) with the live teacher and with one cache (its build
    included); process CPU time (the runs are in this process) and wall time."""
    result = {}
    for mode in ("live", "cache"):
        cpu, wall = time.process_time(), time.perf_counter()
        if mode == "cache":
            build_cache(args, work / "sweep_cache")
        for gamma in args.gammas.split():
            teacher = ["--teacher", args.teacher] if mode == "live" else ["--teacher-cache", str(work / "sweep_cache")]
            train_seconds(["--method", "selfevo", "--gamma", gamma, *teacher, "--output-dir",
                           str(work / f"sweep_{mode}_{gamma}"), *common_args(args), "--max-steps", str(args.sweep_steps)])
        result[f"{mode}_cpu_seconds"] = time.process_time() - cpu
        result[f"{mode}_wall_seconds"] = time.perf_counter() - wall
    result["cache_over_live_cpu"] = result["cache_cpu_seconds"] / result["live_cpu_seconds"]
    result["cache_over_live_wall"] = result["cache_wall_seconds"] / result["live_wall_seconds"]
    result["runs"] = len(args.gammas.split())
    result["steps_per_run"] = args.sweep_steps
    print(json.dumps(result, indent=1), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
