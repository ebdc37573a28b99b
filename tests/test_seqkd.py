"""Sequence-level KD (make_seqkd_data.py): the teacher's translations of the training file become its
references; ids, directions and prompts stay; the student's SFT trains on the result.

    pytest tests/test_seqkd.py
"""

import json
from pathlib import Path

import pytest

import generate
import make_seqkd_data
import train_kd
from kd.io import UserError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def translated(demo_data, tiny_models, tmp_path_factory):
    """The first 16 training rows, and the tiny teacher's greedy translations of them (generate.py)."""
    root = tmp_path_factory.mktemp("seqkd")
    train_file = root / "train.jsonl"
    write_jsonl(train_file, read_rows(Path(demo_data) / "train.jsonl")[:16])
    generate.main(["--model", tiny_models["teacher"], "--input", str(train_file), "--output", str(root / "hyps"),
                   "--max-new-tokens", "8", "--batch-size", "8"])
    return {"root": root, "train": train_file, "hyps": root / "hyps" / "train.jsonl"}


def test_references_are_the_teachers_translations(translated, tmp_path):
    out = tmp_path / "seqkd" / "train.jsonl"
    result = make_seqkd_data.main(["--train-file", str(translated["train"]), "--hyps", str(translated["hyps"]),
                                   "--out", str(out)])
    train, hyps, rows = read_rows(translated["train"]), read_rows(translated["hyps"]), read_rows(out)
    by_id = {row["id"]: row["hypothesis"] for row in hyps}
    kept = [row for row in train if by_id[row["id"]].strip()]
    assert result["rows"] == len(rows) == len(kept) and result["dropped_empty"] == len(train) - len(kept)
    for original, row in zip(kept, rows):
        assert row["reference"] == by_id[original["id"]]          # the teacher's output ...
        assert row["human_reference"] == original["reference"]   # ... and the human one kept aside
        for field in ("id", "direction", "prompt", "source"):
            assert row[field] == original[field]


def test_empty_translations_are_dropped_and_a_missing_one_is_an_error(translated, tmp_path, capsys):
    hyps = read_rows(translated["hyps"])
    hyps[0]["hypothesis"], hyps[1]["hypothesis"], hyps[2]["hypothesis"] = "", "   ", "Ein Satz."
    edited = tmp_path / "hyps.jsonl"
    write_jsonl(edited, hyps)
    out = tmp_path / "out.jsonl"
    result = make_seqkd_data.main(["--train-file", str(translated["train"]), "--hyps", str(edited), "--out", str(out)])
    rows = read_rows(out)
    assert result["dropped_empty"] >= 2 and hyps[0]["id"] not in {r["id"] for r in rows}
    assert {r["id"]: r["reference"] for r in rows}[hyps[2]["id"]] == "Ein Satz."

    write_jsonl(edited, hyps[:-1])  # the last training row has no translation
    out.unlink()
    with pytest.raises(UserError) as error:
        make_seqkd_data.main(["--train-file", str(translated["train"]), "--hyps", str(edited), "--out", str(out)])
    assert "no translation of 1 of the 16 training rows" in str(error.value) and hyps[-1]["id"] in str(error.value)
    assert not out.exists()  # nothing written


def test_student_trains_on_the_seqkd_file(translated, demo_data, tiny_models, tmp_path):
    hyps = read_rows(translated["hyps"])
    for row in hyps:  # the tiny random teacher may stop at once: give every row a translation
        row["hypothesis"] = row["hypothesis"].strip() or "Ein kurzer Satz."
    write_jsonl(tmp_path / "hyps.jsonl", hyps)
    data = tmp_path / "seqkd.jsonl"
    make_seqkd_data.main(["--train-file", str(translated["train"]), "--hyps", str(tmp_path / "hyps.jsonl"),
                          "--out", str(data)])
    results = train_kd.main(["--method", "sft", "--student", tiny_models["student"], "--train-file", str(data),
                             "--valid-file", str(Path(demo_data) / "valid.jsonl"), "--output-dir", str(tmp_path / "run"),
                             "--batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-2", "--max-steps", "3",
                             "--logging-steps", "1"])
    assert results["steps"] == 3 and (tmp_path / "run" / "final" / "config.json").is_file()
    losses = [row["loss"] for row in read_rows(tmp_path / "run" / "metrics.jsonl") if row["type"] == "train"]
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def test_translations_of_other_rows_with_the_same_ids_are_refused(translated, demo_data, tmp_path):
    """Another prepared training file with the same ids (another --demo seed) translated by the teacher:
    every id matches, every row is another sentence. Also a changed direction and an extra id."""
    hyps = read_rows(translated["hyps"])
    train = read_rows(translated["train"])
    out = tmp_path / "out.jsonl"
    edited = tmp_path / "hyps.jsonl"
    other = [{**hyp, "source": hyp["source"] + " (another file)"} for hyp in hyps]
    for rows, message in (
            (other, f"the translation of id {train[0]['id']!r} is of another row: its source is"),
            ([{**hyps[0], "direction": "xx-yy"}] + hyps[1:], f"id {train[0]['id']!r} is of another row: its "
                                                             "direction is 'xx-yy'"),
            (hyps + [{**hyps[0], "id": "train-de-en-999999"}], "holds 1 translation(s) of rows that are not in the "
                                                                "training file (first: id 'train-de-en-999999')")):
        write_jsonl(edited, rows)
        with pytest.raises(UserError) as error:
            make_seqkd_data.main(["--train-file", str(translated["train"]), "--hyps", str(edited), "--out", str(out)])
        assert message in str(error.value) and "generate.py's output on this very training file" in str(error.value)
        assert not out.exists()
