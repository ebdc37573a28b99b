"""Build a tiny Llama teacher and student with a locally trained tokenizer: no download needed.

The tests and the quickstart run the whole pipeline on these instead of Llama-13B / Llama-7B.
Both models share one byte-level BPE tokenizer trained on the prepared training file, and are
saved with save_pretrained, so every script loads them exactly as it loads a hub checkpoint.

    python prepare_data.py --demo --out data/demo
    python make_tiny_models.py --data data/demo --out models/tiny
    # -> models/tiny/teacher (4 layers x 256), models/tiny/student (2 layers x 128)

    python make_tiny_models.py --data data/alma --out models/tiny-alma --vocab-size 8000
"""

import argparse
import sys
import time
from pathlib import Path

from kd.models import build_tiny_models


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder made by prepare_data.py (its train.jsonl trains the tokenizer)")
    parser.add_argument("--out", required=True, help="output folder; gets teacher/ and student/")
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size (default 2000)")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-heads", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    train_file = Path(args.data) / "train.jsonl"
    if not train_file.is_file():
        raise SystemExit(f"make_tiny_models.py: --data {args.data}: no train.jsonl there; run prepare_data.py first")
    start = time.time()
    folders = build_tiny_models(
        train_file,
        args.out,
        vocab_size=args.vocab_size,
        seed=args.seed,
        teacher_size=(args.teacher_layers, args.teacher_hidden, args.teacher_heads),
        student_size=(args.student_layers, args.student_hidden, args.student_heads),
    )
    for role, folder in folders.items():
        print(f"{role}: {folder}")
    print(f"built in {time.time() - start:.1f}s")
    return folders


if __name__ == "__main__":
    main(sys.argv[1:])
