"""Helpers of the tests that run train_kd.main on small slices of the demo data (test_train_kd,
test_gamma_auto, test_onpolicy, test_lora, test_teacher_cache): the slices, the metrics rows a run
logs, the weights it saves."""

import json
from pathlib import Path

from kd.io import read_jsonl


def write_subset(source, dest, per_direction):
    """The first `per_direction` rows of each direction of a prepared JSONL file (4 directions)."""
    kept, counts = [], {}
    for row in read_jsonl(source):
        if counts.get(row["direction"], 0) < per_direction:
            counts[row["direction"]] = counts.get(row["direction"], 0) + 1
            kept.append(row)
    Path(dest).write_text("".join(json.dumps(row) + "\n" for row in kept))
    return str(dest)


def small_files(demo_data, folder):
    """train8 (one fixed batch of 8), train12, train16 and an 8-example valid file from the demo data."""
    return {"train8": write_subset(demo_data / "train.jsonl", folder / "train8.jsonl", 2),
            "train12": write_subset(demo_data / "train.jsonl", folder / "train12.jsonl", 3),
            "train16": write_subset(demo_data / "train.jsonl", folder / "train16.jsonl", 4),
            "valid": write_subset(demo_data / "valid.jsonl", folder / "valid.jsonl", 2)}


def metric_rows(output_dir, kind="train"):
    """The rows of one type ("train", "valid") of a run's metrics.jsonl."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["type"] == kind]


def weights(folder, name="model.safetensors"):
    """A saved model's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / name))
