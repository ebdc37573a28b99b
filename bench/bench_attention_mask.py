"""Benchmark of kd.compat.attention_mask_for: seconds per training forward + backward of a padded
batch with the 2D mask (transformers builds the 4D mask itself, with torch.vmap on 4.x) against
the 4D boolean mask built by attention_mask_for, in the same process, on the same batches.

    python bench/bench_attention_mask.py                 # the study's student (3 x 96), 1 thread
    python bench/bench_attention_mask.py --layers 32 --hidden 4096 --heads 32 --batch-size 4 --steps 3

The models are random-init Llama models built here (make_tiny_models.py's architecture); the batch
is right-padded like train_kd.py's, each batch with its own width. Prints a markdown row and the
ratio (2D-mask time / attention_mask_for time; > 1 means the helper is faster). On transformers 5
both paths are the same call (the helper returns the 2D mask): the ratio is ~1 by construction.
This is not a test; CPU timings are noisy: compare the ratio, not the seconds.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kd.compat import attention_mask_for  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=24, help="longest padded batch; each batch's width is drawn from WIDTH/2..WIDTH (default 24)")
    parser.add_argument("--steps", type=int, default=40, help="timed forward + backward passes per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=512, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    batches = []  # every collated batch has its own width (its longest row), as in train_kd.py
    for _ in range(args.steps + 2):
        width = int(torch.randint(args.width // 2, args.width + 1, ()))
        lengths = torch.randint(4, width + 1, (args.batch_size,))
        lengths[0] = width
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batches.append((torch.randint(3, args.vocab_size, (args.batch_size, width)), mask))

    def seconds(make_mask):
        for step, (ids, mask) in enumerate(batches):  # 2 untimed warm-up passes
            if step == 2:
                start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=make_mask(mask), use_cache=False)
            out.logits.float().logsumexp(-1).mean().backward()
        return (time.perf_counter() - start) / args.steps

    times = {}
    for _ in range(2):  # alternate the variants twice: drift on a shared machine hits both alike
        for name, make_mask in (("2D mask", lambda m: m), ("attention_mask_for", lambda m: attention_mask_for(model, m))):
            times.setdefault(name, []).append(seconds(make_mask))
    base, fast = min(times["2D mask"]), min(times["attention_mask_for"])
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.layers}x{args.hidden}, "
          f"batch {args.batch_size}x{args.width}, {torch.get_num_threads()} thread(s)")
    print("| 2D mask s/step | attention_mask_for s/step | ratio |\n|---:|---:|---:|")
    print(f"| {base:.4f} | {fast:.4f} | {base / fast:.2f} |")
    return base / fast


if __name__ == "__main__":
    main()
