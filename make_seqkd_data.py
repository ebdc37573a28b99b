"""Sequence-level KD data (Kim & Rush, 2016): a training file whose references are the teacher's translations.

    # 1. the teacher translates the training sources (greedy, or beam search with --num-beams)
    python generate.py --model runs/table1/teacher_sft/best --input data/alma/train.jsonl \\
        --output hyps/table1/teacher_train --max-new-tokens 256
    # 2. the training file with the teacher's translations as references
    python make_seqkd_data.py --train-file data/alma/train.jsonl \\
        --hyps hyps/table1/teacher_train/train.jsonl --out data/alma_seqkd/train.jsonl
    # 3. SeqKD = SFT of the student on that file (validation stays on the human references)
    python train_kd.py --method sft --student ... --train-file data/alma_seqkd/train.jsonl \\
        --valid-file data/alma/valid.jsonl ...

Each row of --train-file keeps its id, direction, prompt and every other field; `reference`
becomes the teacher's `hypothesis` (the first line of its response, as evaluate.py scores it) and
the human reference moves to `human_reference`. A row whose teacher translation is empty (the
teacher produced EOS or only blank lines) is dropped and counted: it would teach the student to
stop at once. Every training row must have its translation in --hyps (the same ids, generate.py's
output on that very file), and each translation must be of its row (the same direction and source
text; ids alone could come from another prepared file), with no translation of a row that is not
there; else nothing is written, and the first mismatch is named. The output appears complete or not
at all.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

from kd.data import REQUIRED_FIELDS
from kd.io import fail, read_jsonl, write_jsonl


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--train-file", required=True, type=Path, help="the training file the teacher translated")
    parser.add_argument("--hyps", required=True, type=Path,
                        help="generate.py's output on --train-file (<output folder>/<name of the train file>)")
    parser.add_argument("--out", required=True, type=Path, help="the SeqKD training file to write (.jsonl)")
    return parser.parse_args(argv)


def seqkd_rows(train_rows, hyp_rows, hyps_name):
    """The training rows with the teacher's translations as references, and the number dropped as empty."""
    by_id = {row["id"]: row for row in hyp_rows}
    missing = [row["id"] for row in train_rows if row["id"] not in by_id]
    if missing:
        fail(hyps_name, f"no translation of {len(missing)} of the {len(train_rows)} training rows "
             f"(first: id {missing[0]!r})", "run generate.py on the training file to the end (it resumes), "
             "then run this again")
    train_ids = {row["id"] for row in train_rows}
    extra = [row["id"] for row in hyp_rows if row["id"] not in train_ids]
    if extra:
        fail(hyps_name, f"holds {len(extra)} translation(s) of rows that are not in the training file (first: id "
             f"{extra[0]!r})", "pass generate.py's output on this very training file")
    # ids alone do not tie a translation to its row (two prepared files can share ids): the row it
    # translates must have the training row's direction and source text (generate.py keeps both)
    for row in train_rows:
        hyp = by_id[row["id"]]
        for field in ("direction", "source"):
            if field in row and hyp.get(field) != row[field]:
                fail(hyps_name, f"the translation of id {row['id']!r} is of another row: its {field} is "
                     f"{hyp.get(field)!r}, the training row's {row[field]!r}",
                     "pass generate.py's output on this very training file")
    rows, dropped = [], 0
    for row in train_rows:
        hypothesis = by_id[row["id"]]["hypothesis"]
        if not isinstance(hypothesis, str) or not hypothesis.strip():
            dropped += 1
            continue
        rows.append({**row, "reference": hypothesis, "human_reference": row["reference"]})
    return rows, dropped


def main(argv=None):
    args = parse_args(argv)
    train_rows = read_jsonl(args.train_file, required=REQUIRED_FIELDS, text_fields=("prompt", "reference"),
                            unique_ids=True, allow_empty=False, argument="--train-file")
    hyp_rows = read_jsonl(args.hyps, required=("id", "hypothesis"), unique_ids=True, allow_empty=False,
                          argument="--hyps", todo="run generate.py on the training file first")
    rows, dropped = seqkd_rows(train_rows, hyp_rows, f"--hyps {args.hyps}")
    if not rows:
        fail(f"--hyps {args.hyps}", "every teacher translation is empty", "check the teacher (generate.py's raw field)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, rows)
    changed = sum(row["reference"] != row["human_reference"] for row in rows)
    print(f"{args.out}: {len(rows)} rows with the teacher's translations as references "
          f"({changed} differ from the human reference; {dropped} dropped: empty translation)")
    return {"rows": len(rows), "dropped_empty": dropped, "changed": changed}


if __name__ == "__main__":
    main(sys.argv[1:])
