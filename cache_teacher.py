"""Store a teacher's distributions over the training data once, for every KD run of a sweep.

    python cache_teacher.py --teacher runs/sft-teacher/best --train-file data/alma/train.jsonl \\
        --out cache/teacher-k32 --top-k 32
    # 8 GPUs: each process writes its own shards
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml cache_teacher.py ... --teacher-dtype bf16
    # then, for any KD method, in place of --teacher:
    accelerate launch ... train_kd.py --method selfevo --teacher-cache cache/teacher-k32 ...
    # RS-KD's sampled teacher instead (unbiased for the losses linear in p), as many bytes as --top-k 32 fp16:
    python cache_teacher.py ... --out cache/teacher-s66 --sampling 66

For every training example (the rows of --train-file that fit --max-length, as train_kd.py reads
them) and every response position it stores the teacher's top-K log-probabilities, their token ids
and the log of the remaining mass (--top-k all: the full distribution), or with --sampling S, S
tokens drawn from the teacher's distribution (RS-KD; seeded per example by --sampling-seed, so a
build is the same on any number of processes). Format, and how a stored row enters the losses:
kd/teacher_cache.py; which one to choose: bench/README.md, "A stored teacher". The cache is valid for one train file, tokenizer, template
and --max-length (manifest.json records them; train_kd.py refuses a cache that does not match).

Resumable: run the same command again after a kill; finished shards are kept, the rest are built.
"""

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

import torch
import torch.nn.functional as F

from kd.compat import attention_mask_for, quiet_cpu_runs
from kd.data import IGNORE_INDEX, REQUIRED_FIELDS, TrainCollator, TranslationDataset
from kd.io import fail, fail_with, read_json, read_jsonl, replacing, write_json
from kd.models import DTYPES, check_model_path, load_model, load_tokenizer
from kd.teacher_cache import (BUILD, FORMAT, MANIFEST, compress_rows, data_template, file_sha256, sample_rows,
                              shard_arrays, shard_name, teacher_sha256, tokenizer_sha256)

CONFIG_ERROR = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher model: save_pretrained folder or hub name")
    parser.add_argument("--train-file", required=True, help="train.jsonl made by prepare_data.py (the KD runs' file)")
    parser.add_argument("--out", required=True, help="cache folder (created; a resumed build continues in it)")
    parser.add_argument("--top-k",
                        help="K largest log-probabilities kept per position (the rest as one mass), or 'all'")
    parser.add_argument("--sampling", type=int,
                        help="instead of --top-k: S draws per position from the teacher's distribution (RS-KD), each "
                             "weighing 1/S; 2 bytes a draw (V <= 65536): S = 2K + 2 costs what --top-k K --dtype fp16 does")
    parser.add_argument("--sampling-seed", type=int, default=0, help="seed of the draws (with the example's index)")
    parser.add_argument("--max-length", type=int, default=512, help="as train_kd.py --max-length (paper: 512)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision of the stored log-probabilities (ids are integers, the rest mass float32)")
    parser.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision the teacher runs in (bf16 on GPUs)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward pass per process")
    parser.add_argument("--examples-per-shard", type=int, default=2048,
                        help="examples per shard file (the unit of resuming and of the split over processes)")
    return parser.parse_args(argv)


def parse_top_k(text):
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        fail(f"--top-k {text}", "must be a positive number of tokens or 'all'", "pass e.g. --top-k 32",
             code=CONFIG_ERROR)
    return value


def compare_build(existing, wanted, out):
    different = [f"{name} ({existing.get(name)!r} -> {wanted.get(name)!r})"
                 for name in wanted if existing.get(name) != wanted.get(name)]
    if different:
        fail(f"--out {out}", "holds a cache built with other settings: " + "; ".join(different),
             "choose another --out, or delete that folder to rebuild it", code=CONFIG_ERROR)


def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_runs()
    from accelerate import Accelerator
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    if (args.top_k is None) == (args.sampling is None):
        fail("--top-k/--sampling", "--sampling with --top-k" if args.top_k is not None else "neither was given",
             "pass one of them: --top-k K (or all) keeps the K most probable tokens, --sampling S draws S tokens",
             code=CONFIG_ERROR)
    if args.sampling is not None and args.sampling < 1:
        fail(f"--sampling {args.sampling}", "must be at least 1 draw", "pass e.g. --sampling 66", code=CONFIG_ERROR)
    top_k = None if args.sampling is not None else parse_top_k(args.top_k)
    for name in ("max_length", "batch_size", "examples_per_shard"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}", "must be at least 1", "pass a positive number",
                 code=CONFIG_ERROR)
    try:
        check_model_path(args.teacher, "--teacher")
    except FileNotFoundError as error:
        fail_with(error, code=CONFIG_ERROR)
    rows = read_jsonl(args.train_file, required=REQUIRED_FIELDS, text_fields=("prompt", "reference"),
                      allow_empty=False, argument="--train-file")
    out = Path(args.out)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(args.teacher)
    try:
        dataset = TranslationDataset(rows, tokenizer, args.max_length, source_name=f"--train-file {args.train_file}")
    except ValueError as error:
        fail_with(error, code=CONFIG_ERROR)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.teacher).vocab_size
    if top_k is not None and top_k >= vocab:
        accelerator.print(f"--top-k {top_k} is not below the teacher's vocabulary ({vocab} tokens): the full "
                          "distribution is stored, as with --top-k all")
        top_k = None  # K >= V keeps everything: the full distribution
    build = {
        "format": FORMAT,
        "teacher": str(args.teacher),
        "teacher_sha256": teacher_sha256(args.teacher),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab,
        "train_file": str(args.train_file),
        "data_sha256": file_sha256(args.train_file),
        "template": data_template(args.train_file),
        "max_length": args.max_length,
        "examples": len(dataset),
        "dropped_too_long": dataset.dropped_too_long,
        "top_k": top_k,
        "sampling": args.sampling,
        "sampling_seed": args.sampling_seed if args.sampling is not None else None,
        "dtype": args.dtype if args.sampling is None else None,  # sampled rows hold token ids only
        "teacher_dtype": args.teacher_dtype,
        "examples_per_shard": args.examples_per_shard,
        # the teacher's batches decide its padding, which moves bf16 results in the last bits: a resumed
        # build must use the same
        "batch_size": args.batch_size,
    }
    if accelerator.is_main_process:
        if (out / BUILD).is_file():
            compare_build(read_json(out / BUILD), build, out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / BUILD, build)
        for leftover in out.glob(".shard-*.tmp"):  # a killed process's half-written shard: redone below
            leftover.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if (out / MANIFEST).is_file():
        accelerator.print(f"{out}: cache already complete; nothing to do")
        return read_json(out / MANIFEST)

    n_shards = math.ceil(len(dataset) / args.examples_per_shard)
    mine = [s for s in range(n_shards) if s % accelerator.num_processes == accelerator.process_index]
    todo = [s for s in mine if not (out / shard_name(s)).is_file()]
    print(f"{len(dataset)} examples in {n_shards} shards; process {accelerator.process_index} builds "
          f"{len(todo)} of its {len(mine)} (the others are there from an earlier run)", flush=True)
    teacher = load_model(args.teacher, dtype=args.teacher_dtype).to(accelerator.device).eval().requires_grad_(False)
    collate = TrainCollator(tokenizer.pad_token_id)
    start_time, tokens = time.perf_counter(), 0
    for shard in todo:
        first, end = shard * args.examples_per_shard, min((shard + 1) * args.examples_per_shard, len(dataset))
        parts, offsets = [], [0]
        for batch_start in range(first, end, args.batch_size):
            examples = [dataset[i] for i in range(batch_start, min(batch_start + args.batch_size, end))]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples).items()}
            targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
            counted = targets != IGNORE_INDEX
            keep = counted.any(0).nonzero().squeeze(1)
            with torch.no_grad():
                logits = teacher(input_ids=batch["input_ids"],
                                 attention_mask=attention_mask_for(teacher, batch["attention_mask"]),
                                 logits_to_keep=keep, use_cache=False).logits
            for row in range(len(examples)):
                log_p = torch.log_softmax(logits[row][counted[row, keep]].float(), dim=-1)
                if args.sampling is not None:  # the draws of an example depend on the seed and its index only
                    generator = torch.Generator().manual_seed(args.sampling_seed * 1_000_003 + batch_start + row)
                    parts.append(sample_rows(log_p, args.sampling, generator))
                else:
                    parts.append({k: v.cpu() for k, v in compress_rows(log_p, top_k).items()})
                offsets.append(offsets[-1] + log_p.shape[0])
        tokens += offsets[-1]
        try:
            with replacing(out / shard_name(shard)) as tmp:
                save_file(shard_arrays(parts, offsets, top_k, vocab, args.dtype, args.sampling), str(tmp))  # no metadata: its
                # order in the header varies between runs, and the same shard should have the same bytes
                os.chmod(tmp, 0o644)  # save_file makes a private file; the cache is shared by the runs of a sweep
        except (OSError, SafetensorError) as error:  # replacing() removed the half-written file
            free = shutil.disk_usage(out).free
            reason = (f"the disk is full ({free // 2**20} MiB free)" if free < 64 * 2**20 or "space" in str(error)
                      else " ".join(str(error).split()))
            fail(f"{out / shard_name(shard)}", f"could not be written: {reason}",
                 "free some space, then run the same command again: it keeps the finished shards and builds the rest")
        accelerator.print(f"{shard_name(shard)}: examples {first}-{end - 1}, {offsets[-1]} positions")
    seconds = time.perf_counter() - start_time
    accelerator.wait_for_everyone()

    manifest = None
    if accelerator.is_main_process:
        from safetensors import safe_open

        shards = []
        for shard in range(n_shards):
            path = out / shard_name(shard)
            with safe_open(str(path), framework="np") as handle:
                positions = int(handle.get_tensor("token_offsets")[-1])
            shards.append({"file": path.name, "bytes": path.stat().st_size, "positions": positions,
                           "sha256": file_sha256(path)})
        total_positions = sum(s["positions"] for s in shards)
        total_bytes = sum(s["bytes"] for s in shards)
        manifest = {**build, "shards": shards, "positions": total_positions, "bytes": total_bytes,
                    "bytes_per_position": total_bytes / max(total_positions, 1)}
        write_json(out / MANIFEST, manifest)  # last: the cache is complete
        accelerator.print(f"{out}: {len(dataset)} examples, {total_positions} response positions, "
                          f"{total_bytes / 2**20:.1f} MiB ({manifest['bytes_per_position']:.0f} bytes per position); "
                          f"this process: {tokens} positions in {seconds:.1f}s")
    accelerator.wait_for_everyone()
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
