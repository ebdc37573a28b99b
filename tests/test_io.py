"""kd/io.py, the one writer and reader of every script: outputs appear whole or not at all (an
exception, a full disk, a kill), input errors name file:line, a byte-order mark is no error."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kd import io


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- writing ----

def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    io.write_json(path, {"a": 1})
    io.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert leftovers(path.parent) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a normal file's mode, not mkstemp's 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failure_inside_the_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "figure.png"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with io.replacing(path) as tmp:
            tmp.write_text("half")
            1 / 0
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_text_utf8_cannot_hold_is_an_error_before_anything_is_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit, match=r"rows\.jsonl \(line 2\): .*'\\ud800'.*UTF-8 cannot encode"):
        io.write_jsonl(path, [{"s": "fine"}, {"s": "bad \ud800"}])
    assert not path.exists() and leftovers(tmp_path) == []


def test_output_group_changes_no_file_unless_every_file_is_written(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(SystemExit, match="UTF-8 cannot encode"):
        with io.OutputGroup() as out:
            out.write_text(tmp_path / "a.txt", "new a")
            out.write_text(tmp_path / "b.txt", "new \udc80 b")
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert leftovers(tmp_path) == []
    with io.OutputGroup() as out:
        out.write_text(tmp_path / "a.txt", "new a")
        out.write_text(tmp_path / "deeper" / "b.txt", "new b")
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "deeper" / "b.txt").read_text() == "new b"


def test_replacing_folder_swaps_whole_folders(tmp_path):
    folder = tmp_path / "final"
    with io.replacing_folder(folder) as tmp:
        (tmp / "weights").write_text("1")
    with pytest.raises(RuntimeError):
        with io.replacing_folder(folder) as tmp:
            (tmp / "weights").write_text("2")
            raise RuntimeError("the save failed")
    assert (folder / "weights").read_text() == "1"
    with io.replacing_folder(folder) as tmp:
        (tmp / "other").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_full_disk_is_said_in_words_and_leaves_the_old_file(small_tmpfs):
    path = small_tmpfs / "results.json"
    io.write_text(path, "old\n")
    with pytest.raises(io.WriteError) as stop:
        io.write_text(path, "x" * (2 * 2**20))  # 2 MiB onto a 1 MiB disk
    assert f"{path}: could not be written: the disk is full (No space left on device)" in str(stop.value)
    assert path.read_text() == "old\n" and leftovers(small_tmpfs) == []
    with pytest.raises(io.WriteError, match="the disk is full"):
        with io.OutputGroup() as out:
            out.write_text(small_tmpfs / "a.jsonl", "a\n")
            out.write_text(small_tmpfs / "b.jsonl", "b" * (2 * 2**20))
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["results.json"]


def test_kill_during_a_write_leaves_the_old_file(tmp_path, repo_root):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(repo_root)!r})
        from kd import io
        with io.replacing({str(path)!r}) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half a fi")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert path.read_text() == "old\n"
    assert len(leftovers(tmp_path)) == 1  # a kill -9 runs no cleanup: a named temporary may stay, never the output
    io.write_text(path, "new\n")
    assert path.read_text() == "new\n"


# ---- reading ----

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "1", "direction": "de-en", "prompt": "p", "reference": "r"}
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: invalid JSON"):
        io.read_jsonl(path)
    path.write_text(json.dumps({"id": "1", "direction": "de-en", "prompt": "p"}) + "\n")
    with pytest.raises(SystemExit, match=r"--train-file .*bad\.jsonl:1: row lacks reference"):
        io.read_jsonl(path, required=("reference",), argument="--train-file")
    path.write_text(json.dumps({**good, "reference": None}) + "\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: reference is null, not a string"):
        io.read_jsonl(path, text_fields=("reference",))
    row = json.dumps(good) + "\n"
    path.write_text(row + row.replace('"1"', '"2"') + row)
    assert len(io.read_jsonl(path)) == 3  # repeated ids are allowed unless asked for
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3: id '1' appears twice \(first on line 1\)"):
        io.read_jsonl(path, unique_ids=True)
    with pytest.raises(SystemExit, match=r"missing\.jsonl: no such file; run prepare_data\.py first"):
        io.read_jsonl(tmp_path / "missing.jsonl")
    path.write_text("\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl: no rows"):
        io.read_jsonl(path, allow_empty=False)


def test_byte_order_mark_is_dropped_and_bad_bytes_are_named_by_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"id": "a"}\n{"id": "b"}\n')
    assert [row["id"] for row in io.read_jsonl(path)] == ["a", "b"]
    assert io.read_text(path).startswith('{"id"')
    path.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"bom\.jsonl:2: not UTF-8 \(byte 0xe9 at column 12\); convert the file to UTF-8"):
        io.read_jsonl(path)


def test_appended_file_loses_only_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    rows, torn = io.read_appended_jsonl(path, required=("step",))
    assert rows == [{"step": 1}, {"step": 2}] and torn
    assert "metrics.jsonl:3: dropping a last line cut mid-write" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(SystemExit, match=r"metrics\.jsonl:2: invalid JSON"):  # damage inside is an error
        io.read_appended_jsonl(path)
    assert io.read_appended_jsonl(tmp_path / "none.jsonl") == ([], False)


def test_fail_names_the_script_and_exit_status(tmp_path):
    with pytest.raises(SystemExit) as stop:
        io.fail("--x 3", "must be even", "pass an even number")
    assert stop.value.code == str(stop.value) and str(stop.value).endswith(": --x 3: must be even; pass an even number")
    with pytest.raises(SystemExit) as stop:
        io.fail("--x 3", "must be even", "pass an even number", code=2)
    assert stop.value.code == 2
