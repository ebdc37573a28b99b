"""generate.py on a tiny local Llama: batching, order, resuming, folders, processes, bad input.

    pytest tests/test_generate.py
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import generate

ROWS_PER_FILE = 16
MAX_NEW = ["--max-new-tokens", "10"]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def setup(demo_data, tiny_models, tmp_path_factory):
    """A test folder with the first rows of the demo de-en and en-de files, and the tiny teacher Llama."""
    root = tmp_path_factory.mktemp("generate")
    test_dir = root / "test"
    for name in ("de-en.jsonl", "en-de.jsonl"):
        write_jsonl(test_dir / name, read_rows(Path(demo_data) / "test" / name)[:ROWS_PER_FILE])
    return {"root": root, "test": test_dir, "model": tiny_models["teacher"]}


@pytest.fixture(scope="module")
def one_at_a_time(setup):
    """The reference output: every row decoded alone (batch size 1, no padding at all)."""
    out = setup["root"] / "hyps_batch1"
    generate.main(["--model", setup["model"], "--input", str(setup["test"]), "--output", str(out),
                   "--batch-size", "1", *MAX_NEW])
    return out


def test_batched_greedy_equals_one_at_a_time(setup, one_at_a_time, tmp_path):
    for batch_size in ("5", "64"):
        out = tmp_path / f"batch{batch_size}"
        generate.main(["--model", setup["model"], "--input", str(setup["test"]), "--output", str(out),
                       "--batch-size", batch_size, *MAX_NEW])
        for name in ("de-en.jsonl", "en-de.jsonl"):
            assert (out / name).read_bytes() == (one_at_a_time / name).read_bytes(), (batch_size, name)
    # The prompts differ in length, so those batches really were padded.
    lengths = {len(row["prompt"]) for row in read_rows(setup["test"] / "de-en.jsonl")}
    assert len(lengths) >= 5


def test_rows_kept_in_input_order_with_hypothesis_and_raw(setup, one_at_a_time):
    for name in ("de-en.jsonl", "en-de.jsonl"):
        inputs = read_rows(setup["test"] / name)
        outputs = read_rows(one_at_a_time / name)
        assert [row["id"] for row in outputs] == [row["id"] for row in inputs]
        for source_row, row in zip(inputs, outputs):
            assert row["direction"] == source_row["direction"]
            assert row["source"] == source_row["source"] and row["reference"] == source_row["reference"]
            assert "prompt" not in row
            assert row["hypothesis"] == generate.first_line(row["raw"])
            assert "\n" not in row["hypothesis"]
        assert any(row["raw"] for row in outputs)
    assert not list(one_at_a_time.glob("*.partial")) and not list(one_at_a_time.glob("*.tmp"))


def test_first_line():
    assert generate.first_line("  Hello world. \n### Instruction:\nmore") == "Hello world."
    assert generate.first_line("\n\nHello.\nNext") == "Hello."
    assert generate.first_line("") == ""


def test_resume_after_partial_output_equals_uninterrupted_run(setup, one_at_a_time, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    complete = read_rows(one_at_a_time / "de-en.jsonl")
    # What a killed run leaves: some rows in completion order (length-sorted, not input order) and a
    # last line cut mid-write.
    done = [complete[7], complete[2], complete[11], complete[0]]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in done)
    cut = json.dumps(complete[5], ensure_ascii=False)[:40]
    (out / "de-en.jsonl.partial").write_text(text + cut, encoding="utf-8")
    stats = generate.main(["--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"),
                           "--output", str(out), "--batch-size", "4", *MAX_NEW])
    assert stats["de-en.jsonl"]["generated"] == len(complete) - len(done)
    assert (out / "de-en.jsonl").read_bytes() == (one_at_a_time / "de-en.jsonl").read_bytes()
    assert not (out / "de-en.jsonl.partial").exists()

    # A complete output is skipped, and stays as it is.
    stats = generate.main(["--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"),
                           "--output", str(out), *MAX_NEW])
    assert stats["de-en.jsonl"]["generated"] == 0
    assert (out / "de-en.jsonl").read_bytes() == (one_at_a_time / "de-en.jsonl").read_bytes()


def test_limit_then_extend(setup, one_at_a_time, tmp_path):
    out = tmp_path / "limited"
    stats = generate.main(["--model", setup["model"], "--input", str(setup["test"]), "--output", str(out),
                           "--limit", "5", *MAX_NEW])
    assert stats["de-en.jsonl"]["rows"] == 5
    complete = read_rows(one_at_a_time / "de-en.jsonl")
    assert read_rows(out / "de-en.jsonl") == complete[:5]
    # Without --limit the same output folder is completed: the first 5 rows are not decoded again.
    stats = generate.main(["--model", setup["model"], "--input", str(setup["test"]), "--output", str(out), *MAX_NEW])
    assert stats["de-en.jsonl"]["generated"] == len(complete) - 5
    assert (out / "de-en.jsonl").read_bytes() == (one_at_a_time / "de-en.jsonl").read_bytes()


def test_folder_mode_one_output_per_input_file(setup, one_at_a_time):
    assert sorted(p.name for p in one_at_a_time.iterdir()) == ["de-en.jsonl", "en-de.jsonl"]
    assert {row["direction"] for row in read_rows(one_at_a_time / "en-de.jsonl")} == {"en-de"}


def test_output_of_another_input_is_an_error(setup, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    foreign = {"id": "test-cs-en-0", "direction": "cs-en", "hypothesis": "x", "raw": "x"}
    write_jsonl(out / "de-en.jsonl.partial", [foreign])
    before = (out / "de-en.jsonl.partial").read_bytes()
    with pytest.raises(SystemExit, match=r"de-en\.jsonl\.partial.*test-cs-en-0"):
        generate.main(["--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"),
                       "--output", str(out), *MAX_NEW])
    assert (out / "de-en.jsonl.partial").read_bytes() == before
    assert not (out / "de-en.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ("", r"empty\.jsonl: no rows"),
    ('{"id": "a", "direction": "de-en"}\n', r"bad\.jsonl:1: row lacks prompt"),
    ('{"id": "a", "direction": "de-en", "prompt": "p"}\n{"id": "a", "direction": "de-en", "prompt": "q"}\n',
     r"twice\.jsonl:2: id 'a' appears twice \(first on line 1\)"),
])
def test_bad_input_names_the_file_and_writes_nothing(setup, tmp_path, content, message):
    name = {"": "empty.jsonl"}.get(content, "twice.jsonl" if "q" in content else "bad.jsonl")
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        generate.main(["--model", setup["model"], "--input", str(bad), "--output", str(out)])
    assert not out.exists()


def test_missing_input_and_model_are_clear_errors(setup, tmp_path):
    with pytest.raises(SystemExit, match=r"--input .*nowhere: no such file or folder"):
        generate.main(["--model", setup["model"], "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"--model .*no_model"):
        generate.main(["--model", str(tmp_path / "no_model"), "--input", str(setup["test"]), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_vllm_backend_without_vllm_is_a_clear_error(setup, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="vllm is not installed"):
        generate.main(["--model", setup["model"], "--input", str(setup["test"]), "--output", str(tmp_path / "v"),
                       "--backend", "vllm"])


def launch_generate(repo_root, config, processes, setup, out, batch_size):
    """generate.py on the de-en test file under the real `accelerate launch`; the finished process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo_root / "accelerate_configs" / config), "--num_processes", str(processes),
               str(repo_root / "generate.py"), "--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"),
               "--output", str(out), "--batch-size", str(batch_size), *MAX_NEW]
    # DeepSpeed builds its CPU comm op once per machine (minutes), hence the long timeout.
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=repo_root, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_give_the_same_file(setup, one_at_a_time, tmp_path, repo_root):
    """accelerate launch with 2 CPU processes: rows split, gathered, one writer, same bytes."""
    out = tmp_path / "two"
    result = launch_generate(repo_root, "cpu.yaml", 2, setup, out, batch_size=3)
    assert "2 process(es)" in result.stdout
    assert (out / "de-en.jsonl").read_bytes() == (one_at_a_time / "de-en.jsonl").read_bytes()


def test_progress_bar_with_sentences_per_second_and_eta(setup, tmp_path, capsys):
    generate.main(["--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"), "--output",
                   str(tmp_path / "bar"), "--limit", "4", "--batch-size", "2", *MAX_NEW])
    err = capsys.readouterr().err
    # tqdm's bar of the file: rows done, elapsed<ETA, sentences per second
    assert re.search(r"de-en\.jsonl: 100%.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+sent/s\]", err), err
    assert "Setting accelerator to CPU" not in err


def test_beam_search_runs_and_keeps_order(setup, tmp_path):
    out = tmp_path / "beam"
    generate.main(["--model", setup["model"], "--input", str(setup["test"] / "de-en.jsonl"), "--output", str(out),
                   "--num-beams", "3", "--batch-size", "2", "--limit", "4", *MAX_NEW])
    rows = read_rows(out / "de-en.jsonl")
    assert [row["id"] for row in rows] == [row["id"] for row in read_rows(setup["test"] / "de-en.jsonl")[:4]]
    assert all(row["hypothesis"] == generate.first_line(row["raw"]) for row in rows)


@pytest.mark.slow
def test_deepspeed_zero3_one_process_same_file(setup, one_at_a_time, tmp_path, repo_root):
    """ZeRO-3 (parameters partitioned, generate with synced_gpus=True) in one CPU process: same bytes."""
    out = tmp_path / "zero3"
    result = launch_generate(repo_root, "deepspeed_zero3.yaml", 1, setup, out, batch_size=4)
    assert "DeepSpeed ZeRO-3, synced_gpus" in result.stdout
    assert "Setting accelerator to CPU" not in result.stderr  # kd.compat.quiet_cpu_runs names it
    assert (out / "de-en.jsonl").read_bytes() == (one_at_a_time / "de-en.jsonl").read_bytes()
