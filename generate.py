"""Translate prepared test files with a causal LM: batched greedy (or beam) decoding, resumable.

    # every test file of a folder -> hyps/selfevo/<src>-<tgt>.jsonl (one output file per input file)
    python generate.py --model runs/selfevo/final --input data/alma/test --output hyps/selfevo

    # several GPUs: the rows are split across the processes, one process writes
    accelerate launch --num_processes 8 generate.py --model runs/selfevo/final \\
        --input data/alma/test --output hyps/selfevo --bf16 --batch-size 32

    # two processes on a CPU-only machine (DDP over gloo)
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 2 generate.py \\
        --model models/tiny/student --input data/demo/test --output hyps/tiny

    # a quick look: the first 20 rows of one file, beam search
    python generate.py --model models/tiny/student --input data/demo/test/de-en.jsonl \\
        --output hyps/tiny --limit 20 --num-beams 4

    # vLLM, where it is installed (never required)
    python generate.py --model runs/selfevo/final --input data/alma/test --output hyps/selfevo --backend vllm

Input: rows of prepare_data.py (`id`, `direction`, `prompt` ending with "### Response:\\n", and
usually `src_lang`, `tgt_lang`, `source`, `reference`). The prompt is tokenised exactly as in
training (kd.data.encode_prompt: with BOS), so the model continues where the reference started.

Output rows: the input row without its `prompt`, plus
    raw         the decoded response: every new token up to (not including) the first EOS
    hypothesis  the first line of the response, stripped (leading blank lines skipped): a base model
                that does not stop goes on with a new "### ..." block, which is not the translation
Rows are written in input order.

Decoding: greedy by default (the paper's beam 1), beam search with --num-beams. Rows are sorted by
prompt length (longest first, so memory runs out at once if it will) and cut into batches; each
batch is left-padded (the last position of every row is its last prompt token; transformers derives
position ids from the attention mask) and decoded with the KV cache until every row has produced EOS
or --max-new-tokens tokens. With fp32 weights a row's tokens do not depend on its batch
(tests/test_generate.py checks batched == one at a time).

Resuming: results go to OUTPUT/<name>.jsonl.partial, appended and flushed after every batch, so a
killed run loses at most the batch in flight. A later run with the same --output reads the partial
file (a last line cut mid-write is dropped), skips the rows already there and appends the rest.
When every row is done the file is rewritten in input order into OUTPUT/<name>.jsonl (temp file +
os.replace) and the partial file removed: OUTPUT/<name>.jsonl exists only complete, and no row is
ever written twice. A complete output file is skipped by later runs; rows of an output that do not
belong to the input (another test set, a smaller --limit) are an error.

Processes (accelerate launch): the batches of a round are dealt to the processes, the results are
gathered on the main process, which alone writes. Under DeepSpeed ZeRO-3 every process runs
generate(synced_gpus=True) on its shard (a process without a batch decodes a dummy row and drops it)
so that the sharded parameters are gathered in step.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

import torch

from kd.compat import deepspeed_kwargs_handlers, quiet_cpu_runs
from kd.data import encode_prompt
from kd.decoding import HFGenerator, cut_at_eos, decode_rounds, first_line
from kd.io import fail, read_appended_jsonl, read_jsonl, write_error, write_jsonl
from kd.models import check_model_path, load_model, load_tokenizer

INPUT_FIELDS = ("id", "direction", "prompt")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring (head generate.py).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained folder or hub id (e.g. runs/selfevo/final)")
    parser.add_argument("--input", required=True, type=Path, help="a test .jsonl file, or a folder of them")
    parser.add_argument("--output", required=True, type=Path, help="output folder; gets one <name>.jsonl per input file")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy, the paper's setting (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generate call and process (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest response in tokens (default 256)")
    parser.add_argument("--bf16", action="store_true", help="load the weights in bfloat16 (default fp32)")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="transformers generate (default) or vLLM")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of every input file")
    args = parser.parse_args(argv)
    for name in ("num_beams", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}", "must be at least 1", "pass a positive number")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit {args.limit}", "must be at least 1", "pass a positive number or leave it out")
    return args


# ---------------------------------------------------------------------------------------------
# Response post-processing and the output files
# ---------------------------------------------------------------------------------------------

def input_files(path):
    """The .jsonl files to translate: `path` itself, or the sorted .jsonl files of a folder."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            fail(f"--input {path}", "no .jsonl files in this folder", "pass the test folder made by prepare_data.py")
        return files
    fail(f"--input {path}", "no such file or folder", "run prepare_data.py first, or check the path")


def read_inputs(path, limit):
    """Rows of one input file (first `limit`), checked: not empty, unique ids, a prompt that is text."""
    rows = read_jsonl(path, required=INPUT_FIELDS, text_fields=("prompt",), unique_ids=True, allow_empty=False)
    return rows if limit is None else rows[:limit]


def read_done_rows(path):
    """Rows of an earlier output (final or partial); a last line cut mid-write is dropped (and `cut` says so)."""
    return read_appended_jsonl(path, required=("id", "hypothesis"))


def output_row(row, raw):
    kept = {key: value for key, value in row.items() if key != "prompt"}
    kept["hypothesis"] = first_line(raw)
    kept["raw"] = raw
    return kept


# ---------------------------------------------------------------------------------------------
# Backends: token id lists in, response token id lists out (EOS and what follows removed); the
# transformers one is kd/decoding.py's HFGenerator
# ---------------------------------------------------------------------------------------------

class VLLMGenerator:
    """vLLM's offline engine (greedy only); one process drives all its GPUs."""

    def __init__(self, model_path, tokenizer, max_new_tokens, bf16):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            fail("--backend vllm", "vllm is not installed", "pip install vllm, or use --backend hf (the default)")
        self.tokenizer = tokenizer
        self.llm = LLM(model=str(model_path), dtype="bfloat16" if bf16 else "float32",
                       tensor_parallel_size=max(1, torch.cuda.device_count()))
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                     stop_token_ids=[tokenizer.eos_token_id], skip_special_tokens=True)

    def __call__(self, id_lists):
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in id_lists], self.params, use_tqdm=False)
        return [cut_at_eos(list(out.outputs[0].token_ids), self.tokenizer.eos_token_id) for out in outputs]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_runs()  # before accelerate imports DeepSpeed

    # ---- inputs: read and check every file before loading the model ----
    files = input_files(args.input)
    inputs = {path: read_inputs(path, args.limit) for path in files}
    names = [path.name for path in files]
    if len(set(names)) != len(names):
        fail(f"--input {args.input}", "two input files share a name", "outputs are named after inputs; rename one")
    if args.output.exists() and not args.output.is_dir():
        fail(f"--output {args.output}", "is a file", "pass a folder")
    check_model_path(args.model)

    # ---- processes and model ----
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object

    # accelerate's torchrun launcher (accelerate_configs/cpu.yaml with --num_processes > 1) does not pass
    # use_cpu on: without GPUs ask for CPU DDP (gloo) here. DeepSpeed runs its own CPU path.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed,
                              kwargs_handlers=deepspeed_kwargs_handlers(deepspeed))
    is_main = accelerator.is_main_process
    tokenizer = load_tokenizer(args.model, padding_side="left")
    synced_gpus = False
    if args.backend == "vllm":
        if accelerator.num_processes > 1:
            fail("--backend vllm", "runs in one process (vLLM uses every GPU itself)", "run it with plain python")
        if args.num_beams != 1:
            fail("--backend vllm", "supports greedy decoding only here", "drop --num-beams or use --backend hf")
        generator = VLLMGenerator(args.model, tokenizer, args.max_new_tokens, args.bf16)
    else:
        model = load_model(args.model, dtype="bf16" if args.bf16 else "fp32")
        model.eval()
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            plugin = accelerator.state.deepspeed_plugin
            config = plugin.deepspeed_config
            if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                config["train_micro_batch_size_per_gpu"] = args.batch_size
            if config.get("gradient_accumulation_steps", "auto") == "auto":
                config["gradient_accumulation_steps"] = 1
            model = accelerator.unwrap_model(accelerator.prepare(model))
            synced_gpus = plugin.zero_stage == 3
        else:
            model.to(accelerator.device)
        generator = HFGenerator(model, tokenizer, args.max_new_tokens, args.num_beams, synced_gpus=synced_gpus)
    if is_main:
        args.output.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"model {args.model} | {len(files)} file(s) | {accelerator.num_processes} process(es) | "
                      f"batch {args.batch_size} | beams {args.num_beams} | max new tokens {args.max_new_tokens} | "
                      f"{'bf16' if args.bf16 else 'fp32'} | backend {args.backend}"
                      + (" | DeepSpeed ZeRO-3, synced_gpus" if synced_gpus else ""))

    stats = {}
    for path, rows in inputs.items():
        final_path = args.output / path.name
        partial_path = args.output / (path.name + ".partial")

        # ---- resume: rows already in the output ----
        if is_main:
            partial_rows, cut = read_done_rows(partial_path)
            if cut:
                write_jsonl(partial_path, partial_rows)
        accelerator.wait_for_everyone()
        done = {}
        for earlier in (final_path, partial_path):
            for row in read_done_rows(earlier)[0]:
                done.setdefault(row["id"], row)
        by_id = {row["id"]: row for row in rows}
        for row_id, row in done.items():
            if row_id not in by_id or row.get("direction") != by_id[row_id]["direction"]:
                fail(str(final_path if final_path.exists() else partial_path),
                     f"holds row {row_id!r}, which is not in {path}" + (f" (first {args.limit} rows)" if args.limit else ""),
                     "use another --output, or delete the file (and its .partial) to start over")
        pending = [row for row in rows if row["id"] not in done]
        if (not pending and not partial_path.exists() and final_path.exists()
                and [row["id"] for row in read_done_rows(final_path)[0]] == list(by_id)):
            accelerator.print(f"{final_path}: complete ({len(rows)} rows), skipped")
            stats[path.name] = {"rows": len(rows), "generated": 0, "new_tokens": 0, "seconds": 0.0}
            continue
        accelerator.print(f"{path.name}: {len(rows)} rows, {len(done)} already done, {len(pending)} to translate")

        # ---- translate: length-sorted batches dealt to the processes, gathered, appended ----
        from tqdm.auto import tqdm

        progress = tqdm(total=len(pending), desc=path.name, unit="sent", dynamic_ncols=True,
                        disable=not is_main)  # sentences/s and the ETA of this file
        start = time.time()
        id_lists = [encode_prompt(tokenizer, row["prompt"]) for row in pending]
        world = accelerator.num_processes
        new_tokens = 0
        for mine in decode_rounds(generator, id_lists, args.batch_size, accelerator.process_index, world, synced_gpus):
            results = [(pending[i]["id"], tokenizer.decode(tokens, skip_special_tokens=True), len(tokens))
                       for i, tokens in mine]
            gathered = gather_object(results) if world > 1 else results
            if is_main:
                try:  # appended and flushed per batch: a kill loses at most this batch (a cut line is dropped)
                    with partial_path.open("a", encoding="utf-8") as handle:
                        for row_id, raw, count in gathered:
                            handle.write(json.dumps(output_row(by_id[row_id], raw), ensure_ascii=False) + "\n")
                            new_tokens += count
                        handle.flush()
                        os.fsync(handle.fileno())
                except OSError as error:
                    raise write_error(partial_path, error, "free some space and run the same command again: "
                                      "it resumes after the rows already written") from None
                progress.update(len(gathered))
        progress.close()
        seconds = time.time() - start

        # ---- finish: the complete file in input order, atomically; the partial file goes ----
        accelerator.wait_for_everyone()
        if is_main:
            finished = dict(done)
            for row in read_done_rows(partial_path)[0]:
                finished.setdefault(row["id"], row)
            missing = [row["id"] for row in rows if row["id"] not in finished]
            if missing:
                fail(str(partial_path), f"{len(missing)} rows missing after generation (first {missing[0]!r})",
                     "run the same command again to resume")
            write_jsonl(final_path, [finished[row["id"]] for row in rows])
            if partial_path.exists():
                partial_path.unlink()
            print(f"{final_path}: {len(rows)} rows ({len(pending)} new, {new_tokens} tokens, {seconds:.1f}s)")
        accelerator.wait_for_everyone()
        stats[path.name] = {"rows": len(rows), "generated": len(pending), "new_tokens": new_tokens, "seconds": seconds}
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
