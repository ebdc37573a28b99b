"""prepare_data.py on the shared ALMA data (the paper's counts) and on small fixture files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import prepare_data  # noqa: E402

ALMA = REPO.parent / "shared" / "data" / "alma"
ROW_KEYS = ["id", "direction", "src_lang", "tgt_lang", "source", "reference", "prompt"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def output_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(pairs, lang):
    return [{"translation": {lang: x, "en": e}} for x, e in pairs]


def write_jsonl(path, pairs, lang):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(pairs, lang)),
                    encoding="utf-8")


def write_array(path, pairs, lang):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records(pairs, lang), ensure_ascii=False, indent=1), encoding="utf-8")


def sentence_pairs(lang, tag, count):
    return [(f"{lang} {tag} Satz {i}", f"en {tag} sentence {i}") for i in range(count)]


def write_alma_layout(root, lang="de", train=None, n_train=30):
    """ALMA layout for one pair: JSON Lines training file, JSON arrays for valid and test."""
    folder = root / f"{lang}en"
    write_jsonl(folder / f"train.{lang}-en.json", train or sentence_pairs(lang, "train", n_train), lang)
    write_array(folder / f"valid.{lang}-en.json", sentence_pairs(lang, "valid", 4), lang)
    write_array(folder / f"test.{lang}-en.json", sentence_pairs(lang, "test-x", 3), lang)
    write_array(folder / f"test.en-{lang}.json", sentence_pairs(lang, "test-en", 5), lang)
    return root


def run_main(*argv):
    return prepare_data.main([str(a) for a in argv])


def expect_error(out, *argv):
    """The run must stop with a message (exit code 1) and leave `out` absent."""
    with pytest.raises(SystemExit) as stop:
        run_main(*argv, "--out", out)
    message = str(stop.value.code)
    assert message.startswith("prepare_data.py: "), message
    assert not out.exists(), f"{out} was written despite the error"
    return message


# ---- the shared ALMA data: the paper's counts ----

@pytest.fixture(scope="module")
def alma_out(tmp_path_factory):
    if not (ALMA / "deen" / "train.de-en.json").is_file():
        pytest.skip(f"shared ALMA data not found at {ALMA}")
    out = tmp_path_factory.mktemp("alma")
    stats = run_main("--data-dir", ALMA, "--pairs", "de-en,cs-en", "--out", out)
    return out, stats


def test_alma_counts_are_the_papers(alma_out):
    out, stats = alma_out
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 52574 == 2 * (14211 + 12076)
    valid = read_jsonl(out / "valid.jsonl")
    assert [r["direction"] for r in valid].count("en-de") == 1002
    assert [r["direction"] for r in valid].count("cs-en") == 1002
    assert len(valid) == 2004
    expected_test = {"de-en": 1984, "en-de": 2037, "cs-en": 1448, "en-cs": 2037}
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(f"{d}.jsonl" for d in expected_test)
    for direction, count in expected_test.items():
        rows = read_jsonl(out / "test" / f"{direction}.jsonl")
        assert len(rows) == count
        assert {r["direction"] for r in rows} == {direction}
    assert stats["counts"] == {"train": 52574, "valid": 2004,
                               **{f"test/{d}": n for d, n in expected_test.items()}}
    assert json.loads((out / "stats.json").read_text()) == stats
    # the ALMA training files hold 4 + 5 exact duplicates; the paper's count keeps them
    duplicates = {(e["split"], e["direction"]): e["duplicates_kept"] for e in stats["table"]}
    assert duplicates[("train", "de-en")] == 4 and duplicates[("train", "cs-en")] == 5


def test_alma_both_directions_and_schema(alma_out):
    out, _ = alma_out
    train = read_jsonl(out / "train.jsonl")
    assert {r["direction"] for r in train} == {"de-en", "en-de", "cs-en", "en-cs"}
    by_id = {r["id"]: r for r in train}
    assert len(by_id) == len(train)
    for row in train[:200]:
        assert list(row) == ROW_KEYS
        src, tgt = row["direction"].split("-")
        assert (row["src_lang"], row["tgt_lang"]) == (src, tgt)
        assert row["prompt"].endswith(f"### Input:\n{row['source']}\n\n### Response:\n")
        # the other direction of the same pair: source and reference swapped
        twin = by_id[row["id"].replace(row["direction"], f"{tgt}-{src}")]
        assert (twin["source"], twin["reference"]) == (row["reference"], row["source"])
    # train.jsonl is shuffled: the directions are mixed within the first rows
    assert len({r["direction"] for r in train[:50]}) == 4
    # test rows keep the order of the WMT22 file
    first = json.loads((ALMA / "deen" / "test.en-de.json").read_text(encoding="utf-8"))[0]
    row = read_jsonl(out / "test" / "en-de.jsonl")[0]
    assert row["id"] == "test-en-de-000000"
    assert (row["source"], row["reference"]) == (first["translation"]["en"], first["translation"]["de"])


# ---- prompts, exactly ----

def test_prompts_rendered_exactly_for_both_templates(tmp_path):
    data = write_alma_layout(tmp_path / "data", train=[("Der Hund schläft.", "The dog sleeps.")])
    run_main("--data-dir", data, "--out", tmp_path / "alpaca")
    run_main("--data-dir", data, "--out", tmp_path / "alma", "--template", "alma")
    alpaca = {r["direction"]: r for r in read_jsonl(tmp_path / "alpaca" / "train.jsonl")}
    assert alpaca["de-en"]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate the following sentences from German to English.\n\n"
        "### Input:\nDer Hund schläft.\n\n### Response:\n"
    )
    assert alpaca["de-en"]["reference"] == "The dog sleeps."
    assert alpaca["en-de"]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate the following sentences from English to German.\n\n"
        "### Input:\nThe dog sleeps.\n\n### Response:\n"
    )
    assert alpaca["en-de"]["reference"] == "Der Hund schläft."
    alma = {r["direction"]: r for r in read_jsonl(tmp_path / "alma" / "train.jsonl")}
    assert alma["de-en"]["prompt"] == "Translate this from German to English:\nGerman: Der Hund schläft.\nEnglish:"
    assert alma["en-de"]["prompt"] == "Translate this from English to German:\nEnglish: The dog sleeps.\nGerman:"
    assert alma["en-de"]["id"] == "train-en-de-000000"
    assert list(alma["en-de"]) == ROW_KEYS


# ---- determinism ----

def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    data = write_alma_layout(tmp_path / "data", n_train=40)
    write_alma_layout(tmp_path / "data", lang="cs", n_train=25)
    run_main("--data-dir", data, "--out", tmp_path / "a", "--seed", "7")
    run_main("--data-dir", data, "--out", tmp_path / "b", "--seed", "7")
    run_main("--data-dir", data, "--out", tmp_path / "c", "--seed", "8")
    first, second = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    assert first == second
    assert set(first) == {"train.jsonl", "valid.jsonl", "stats.json", "test/de-en.jsonl",
                          "test/en-de.jsonl", "test/cs-en.jsonl", "test/en-cs.jsonl"}
    other = output_files(tmp_path / "c")
    assert other["train.jsonl"] != first["train.jsonl"]
    assert sorted(other["train.jsonl"].splitlines()) == sorted(first["train.jsonl"].splitlines())
    assert other["test/en-de.jsonl"] == first["test/en-de.jsonl"]  # test files are never shuffled
    # no temporary files left behind
    assert not [p for p in (tmp_path / "a").rglob(".*")]


# ---- bad input: an error naming the place, exit code 1, nothing written ----

def test_invalid_json_line_names_file_and_line(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    train = data / "deen" / "train.de-en.json"
    lines = train.read_text().splitlines()
    lines[6] = '{"translation": {"de": "kaputt", "en": '
    train.write_text("\n".join(lines) + "\n")
    message = expect_error(tmp_path / "out", "--data-dir", data)
    assert f"{train}:7: invalid JSON" in message


def test_invalid_json_in_array_names_file_and_line(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    test_file = data / "deen" / "test.en-de.json"
    lines = test_file.read_text().splitlines()
    broken = next(i for i, line in enumerate(lines) if "test-en Satz 2" in line)
    lines[broken] = lines[broken].replace('",', '" oops,')
    test_file.write_text("\n".join(lines))
    message = expect_error(tmp_path / "out", "--data-dir", data)
    assert f"{test_file}:{broken + 1}: invalid JSON" in message


def test_missing_language_key(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    train = data / "deen" / "train.de-en.json"
    lines = train.read_text().splitlines()
    lines[3] = json.dumps({"translation": {"fr": "Bonjour", "en": "Hello"}})
    train.write_text("\n".join(lines) + "\n")
    message = expect_error(tmp_path / "out", "--data-dir", data)
    assert f"{train}:4: the record has no 'de' key" in message
    # the same in a JSON array: the line of the record
    data2 = write_alma_layout(tmp_path / "data2")
    valid = data2 / "deen" / "valid.de-en.json"
    array = json.loads(valid.read_text())
    del array[2]["translation"]["en"]
    valid.write_text("[\n" + ",\n".join(json.dumps(r) for r in array) + "\n]\n")  # record i on line i+2
    message = expect_error(tmp_path / "out", "--data-dir", data2)
    assert f"{valid}:4: the record has no 'en' key" in message


def test_pair_with_no_files(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    message = expect_error(tmp_path / "out", "--data-dir", data, "--pairs", "de-en,cs-en")
    assert "no files for the pair cs-en" in message and "train.cs-en" in message
    # a pair whose test file is missing is an error too
    (data / "deen" / "test.en-de.json").unlink()
    message = expect_error(tmp_path / "out", "--data-dir", data, "--pairs", "de-en")
    assert "no test.en-de file for the pair de-en" in message


def test_text_files_with_different_line_counts(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    (data / "deen" / "train.de-en.json").unlink()
    (data / "deen" / "train.de-en.de").write_text("eins\nzwei\ndrei\n")
    (data / "deen" / "train.de-en.en").write_text("one\ntwo\n")
    message = expect_error(tmp_path / "out", "--data-dir", data)
    assert "train.de-en.de (3 lines)" in message and "train.de-en.en (2 lines)" in message
    assert "different line counts" in message


def test_unknown_language_and_bad_direction(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    message = expect_error(tmp_path / "out", "--data-dir", data, "--pairs", "xx-en")
    assert "unknown language code 'xx'" in message and "cs, de" in message
    message = expect_error(tmp_path / "out", "--data-dir", data, "--valid-directions", "en-cs")
    assert "en-cs is not a direction of --pairs" in message


def test_error_exit_code_from_the_command_line(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    (data / "deen" / "valid.de-en.json").write_text("[{]")
    result = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--data-dir", str(data),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "valid.de-en.json:1: invalid JSON" in result.stderr
    assert not (tmp_path / "out").exists()


# ---- what is dropped, and counted ----

def test_empty_and_duplicate_pairs_are_counted(tmp_path):
    train = [("eins", "one"), ("", "empty German"), ("zwei", "two"), ("leer", "   "),
             ("eins", "one"), ("drei", "three"), ("eins", "one"), ("eins", "one (other)")]
    data = write_alma_layout(tmp_path / "data", train=train)
    test_file = data / "deen" / "test.de-en.json"
    write_array(test_file, [("a", "b"), ("a", "b"), (" ", "c")], "de")

    stats = run_main("--data-dir", data, "--out", tmp_path / "keep")
    entries = {(e["split"], e["direction"]): e for e in stats["table"]}
    assert entries[("train", "de-en")] == {
        "split": "train", "direction": "de-en", "file": str(data / "deen" / "train.de-en.json"),
        "read": 8, "dropped_empty": 2, "dropped_duplicate": 0, "duplicates_kept": 2,
        "dropped_by_subset": 0, "kept": 6}
    assert len(read_jsonl(tmp_path / "keep" / "train.jsonl")) == 12
    assert (entries[("test", "de-en")]["read"], entries[("test", "de-en")]["kept"]) == (3, 2)
    assert entries[("test", "de-en")]["duplicates_kept"] == 1

    stats = run_main("--data-dir", data, "--out", tmp_path / "drop", "--drop-duplicates")
    saved = json.loads((tmp_path / "drop" / "stats.json").read_text())
    entries = {(e["split"], e["direction"]): e for e in saved["table"]}
    assert entries[("train", "en-de")]["dropped_duplicate"] == 2
    assert entries[("train", "en-de")]["kept"] == 4
    train_rows = read_jsonl(tmp_path / "drop" / "train.jsonl")
    assert sorted(r["source"] for r in train_rows if r["direction"] == "de-en") == ["drei", "eins", "eins", "zwei"]
    # the test set keeps its duplicate row (it must line up with the WMT22 references)
    assert [r["id"] for r in read_jsonl(tmp_path / "drop" / "test" / "de-en.jsonl")] == [
        "test-de-en-000000", "test-de-en-000001"]
    assert saved["drop_duplicates"] is True


# ---- the text-file layout, --subset, --valid-directions ----

def test_text_file_layout_gives_the_same_rows_as_json(tmp_path):
    json_data = write_alma_layout(tmp_path / "json")
    text_data = tmp_path / "text"
    text_data.mkdir()
    for path in (json_data / "deen").iterdir():
        stem = path.name[: -len(".json")]
        rows = json.loads(path.read_text()) if path.read_text().startswith("[") else \
            [json.loads(line) for line in path.read_text().splitlines()]
        for lang in ("de", "en"):  # aligned text files directly in DIR/ (no deen/ folder)
            (text_data / f"{stem}.{lang}").write_text("".join(r["translation"][lang] + "\n" for r in rows))
    run_main("--data-dir", json_data, "--out", tmp_path / "from_json")
    stats = run_main("--data-dir", text_data, "--out", tmp_path / "from_text")
    from_json, from_text = output_files(tmp_path / "from_json"), output_files(tmp_path / "from_text")
    del from_json["stats.json"], from_text["stats.json"]
    assert from_json == from_text
    assert stats["table"][0]["file"] == f"{text_data / 'train.de-en.de'} + train.de-en.en"


def test_subset_keeps_n_pairs_per_language_pair(tmp_path):
    data = write_alma_layout(tmp_path / "data", n_train=40)
    write_alma_layout(tmp_path / "data", lang="cs", n_train=25)
    stats = run_main("--data-dir", data, "--out", tmp_path / "small", "--subset", "10")
    train = read_jsonl(tmp_path / "small" / "train.jsonl")
    assert len(train) == 40
    for direction in ("de-en", "en-de", "cs-en", "en-cs"):
        assert sum(r["direction"] == direction for r in train) == 10
    assert stats["subset"] == 10 and "--subset 10" in stats["subset_note"]
    entries = {(e["split"], e["direction"]): e for e in stats["table"]}
    assert entries[("train", "de-en")]["dropped_by_subset"] == 30
    assert entries[("train", "cs-en")]["dropped_by_subset"] == 15
    # both directions of each chosen pair, and valid/test untouched
    de_en = {r["id"][len("train-de-en-"):] for r in train if r["direction"] == "de-en"}
    en_de = {r["id"][len("train-en-de-"):] for r in train if r["direction"] == "en-de"}
    assert de_en == en_de
    assert len(read_jsonl(tmp_path / "small" / "test" / "en-de.jsonl")) == 5
    run_main("--data-dir", data, "--out", tmp_path / "again", "--subset", "10")
    assert output_files(tmp_path / "small") == output_files(tmp_path / "again")
    run_main("--data-dir", data, "--out", tmp_path / "other", "--subset", "10", "--seed", "1")
    assert {r["id"] for r in read_jsonl(tmp_path / "other" / "train.jsonl")} != {r["id"] for r in train}


def test_valid_directions(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    write_alma_layout(tmp_path / "data", lang="cs")
    run_main("--data-dir", data, "--out", tmp_path / "default")
    valid = read_jsonl(tmp_path / "default" / "valid.jsonl")
    assert sorted({r["direction"] for r in valid}) == ["cs-en", "en-de"]
    assert valid[0]["source"].startswith("cs valid") or valid[0]["source"].startswith("en valid")
    run_main("--data-dir", data, "--out", tmp_path / "asked", "--valid-directions", "de-en,en-cs")
    valid = read_jsonl(tmp_path / "asked" / "valid.jsonl")
    assert [r["direction"] for r in valid] == ["de-en"] * 4 + ["en-cs"] * 4
    assert valid[0]["source"] == "de valid Satz 0" and valid[0]["reference"] == "en valid sentence 0"
    assert valid[4]["source"] == "en valid sentence 0" and valid[4]["reference"] == "cs valid Satz 0"


def test_hub_path_with_a_stand_in_for_datasets(tmp_path, monkeypatch):
    """The Hub cannot be reached here: a stand-in load_dataset checks the wiring of --hub
    (ALMA-Human-Parallel has a "translation" column, WMT22-Test a column named after the config)."""
    calls = []

    class Table:
        def __init__(self, column, rows):
            self.column_names, self.rows = [column], rows

        def __getitem__(self, column):
            assert column == self.column_names[0]
            return self.rows

    def load_dataset(name, config):
        calls.append((name, config))
        if name == "haoranxu/ALMA-Human-Parallel":
            return {"train": Table("translation", [{"de": "eins", "en": "one"}, {"de": "zwei", "en": "two"}]),
                    "validation": Table("translation", [{"de": "drei", "en": "three"}])}
        return {"test": Table(config, [{"de": f"Test {config}", "en": f"test {config}"}])}

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    stats = run_main("--hub", "--pairs", "de-en", "--out", tmp_path / "out")
    assert calls == [("haoranxu/ALMA-Human-Parallel", "de-en"), ("haoranxu/WMT22-Test", "de-en"),
                     ("haoranxu/WMT22-Test", "en-de")]
    assert stats["counts"] == {"train": 4, "valid": 1, "test/de-en": 1, "test/en-de": 1}
    valid = read_jsonl(tmp_path / "out" / "valid.jsonl")
    assert (valid[0]["direction"], valid[0]["source"], valid[0]["reference"]) == ("en-de", "three", "drei")
    test = read_jsonl(tmp_path / "out" / "test" / "en-de.jsonl")
    assert (test[0]["source"], test[0]["reference"]) == ("test en-de", "Test en-de")


# ---- ALMA's published human_written_data/ as it is ----

def write_published_alma(root):
    """The file list of ALMA's human_written_data/ (fe1ixxu/ALMA), small: every pair's train split
    is there as JSON and as aligned text files, csen/ also its test splits; isen/ has no valid file;
    the few-shot folders hold other files."""
    for lang in ("cs", "de", "is", "ru", "zh"):
        write_alma_layout(root, lang=lang, n_train=6)
        folder = root / f"{lang}en"
        # the aligned text copy of the training file (its first line differs: the JSON must be read)
        texts = sentence_pairs(lang, "train", 6)
        texts[0] = ("TEXT COPY", "TEXT COPY")
        (folder / f"train.{lang}-en.{lang}").write_text("".join(x + "\n" for x, _ in texts), "utf-8")
        (folder / f"train.{lang}-en.en").write_text("".join(e + "\n" for _, e in texts), "utf-8")
    for stem in ("test.cs-en", "test.en-cs"):
        rows = json.loads((root / "csen" / f"{stem}.json").read_text())
        for side in ("cs", "en"):
            (root / "csen" / f"{stem}.{side}").write_text("".join(r["translation"][side] + "\n" for r in rows))
    (root / "isen" / "valid.is-en.json").unlink()
    write_array(root / "Filtered-5-shot" / "shots.de-en.json", sentence_pairs("de", "shot", 5), "de")
    return root


def test_published_alma_layout_reads_the_json_files(tmp_path, capsys):
    data = write_published_alma(tmp_path / "human_written_data")
    out = tmp_path / "out"
    stats = run_main("--data-dir", data, "--out", out, "--valid-directions", "en-de,cs-en")
    assert stats["pairs"] == ["cs-en", "de-en", "is-en", "ru-en", "zh-en"]
    assert stats["counts"]["train"] == 5 * 2 * 6 and stats["counts"]["valid"] == 8
    assert all(r["source"] != "TEXT COPY" for r in read_jsonl(out / "train.jsonl"))
    preferred = {Path(e["read"]).name: sorted(Path(p).name for p in e["ignored"]) for e in stats["preferred_json"]}
    assert preferred["train.is-en.json"] == ["train.is-en.en", "train.is-en.is"]
    assert preferred["test.en-cs.json"] == ["test.en-cs.cs", "test.en-cs.en"]
    assert len(preferred) == 5 + 2
    assert json.loads((out / "stats.json").read_text())["preferred_json"] == stats["preferred_json"]
    log = capsys.readouterr().out
    assert f"{data / 'csen' / 'train.cs-en.json'}: read this JSON file" in log and "were not read" in log


def test_published_alma_layout_without_a_valid_file_names_the_flag(tmp_path):
    data = write_published_alma(tmp_path / "human_written_data")
    message = expect_error(tmp_path / "out", "--data-dir", data)  # default: is-en among the valid directions
    assert "no valid.is-en file for the pair is-en, which --valid-directions asks for" in message
    assert "pass --valid-directions naming pairs that have a valid file" in message
    (data / "deen" / "train.de-en.jsonl").write_text((data / "deen" / "train.de-en.json").read_text())
    message = expect_error(tmp_path / "out", "--data-dir", data, "--pairs", "de-en")
    assert "train.de-en is there twice (train.de-en.json, train.de-en.jsonl)" in message


# ---- all or nothing; what editors and other tools put into input files ----

def test_text_utf8_cannot_hold_stops_before_anything_changes(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    out = tmp_path / "out"
    run_main("--data-dir", data, "--out", out)
    before = output_files(out)
    # A lone surrogate is valid JSON ("\ud800") but no UTF-8 text: it used to fail while writing, after
    # train/valid and one test file were replaced.
    test_file = data / "deen" / "test.en-de.json"
    test_file.write_text(test_file.read_text().replace("en test-en sentence 2", "en test-en sentence \\ud800"))
    with pytest.raises(SystemExit, match=r"test\.en-de\.json:\d+: the 'en' value holds '\\ud800', which UTF-8 "
                                         r"cannot encode"):
        run_main("--data-dir", data, "--out", out, "--seed", 7)
    assert output_files(out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_changes_no_output_file(tmp_path):
    import shutil

    data = write_alma_layout(tmp_path / "data")
    out = tmp_path / "out"
    run_main("--data-dir", data, "--out", out)
    shutil.rmtree(out / "test")
    (out / "test").write_text("a file where the test folder belongs\n")  # the test files cannot be written
    before = output_files(out)
    with pytest.raises(SystemExit, match=r"test/de-en\.jsonl: could not be written"):
        run_main("--data-dir", data, "--out", out, "--seed", 7)  # another seed: another train.jsonl
    assert output_files(out) == before  # train.jsonl, valid.jsonl and stats.json unchanged
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_byte_order_mark_is_dropped_and_bad_bytes_are_named_by_line(tmp_path):
    data = write_alma_layout(tmp_path / "data")
    clean_out, bom_out = tmp_path / "clean", tmp_path / "bom"
    run_main("--data-dir", data, "--out", clean_out)
    for path in (data / "deen").iterdir():  # a BOM in front of every file: JSON Lines and JSON arrays
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    run_main("--data-dir", data, "--out", bom_out)
    assert output_files(bom_out)["train.jsonl"] == output_files(clean_out)["train.jsonl"]
    assert output_files(bom_out)["test/en-de.jsonl"] == output_files(clean_out)["test/en-de.jsonl"]

    text = tmp_path / "text"
    text.mkdir()
    for name in ("train", "valid", "test"):
        for direction in (("de-en",) if name != "test" else ("de-en", "en-de")):
            (text / f"{name}.{direction}.de").write_bytes(b"\xef\xbb\xbfErster Satz\nZweiter Satz\n")
            (text / f"{name}.{direction}.en").write_bytes(b"\xef\xbb\xbfFirst sentence\nSecond sentence\n")
    run_main("--data-dir", text, "--out", tmp_path / "text_out")
    first = read_jsonl(tmp_path / "text_out" / "test" / "de-en.jsonl")[0]
    assert (first["source"], first["reference"]) == ("Erster Satz", "First sentence")

    (text / "train.de-en.de").write_bytes(b"Erster Satz\nZweiter \xe4 Satz\n")  # Latin-1, not UTF-8
    message = expect_error(tmp_path / "bad_out", "--data-dir", text)
    assert "train.de-en.de:2: not UTF-8 (byte 0xe4 at column 9); convert the file to UTF-8" in message
