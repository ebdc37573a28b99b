"""Turn parallel data into the paper's instruction data: train.jsonl, valid.jsonl, test/<src>-<tgt>.jsonl.

The paper (and ALMA) train on the human-written WMT parallel data in both directions of every
language pair (de-en and cs-en: 2 x (14,211 + 12,076) = 52,574 examples), validate on WMT21
(En->De and Cs->En) and test on WMT22 (one file per direction).

    # the ALMA files on disk: human_written_data/ of a clone of the ALMA repository (fe1ixxu/ALMA)
    python prepare_data.py --data-dir ALMA/human_written_data --pairs de-en,cs-en --out data/alma

    # ALMA's own prompt instead of the paper's Alpaca-style prompt; other validation directions
    python prepare_data.py --data-dir ALMA/human_written_data --out data/alma_prompt \\
        --template alma --valid-directions en-de,en-cs

    # a quick run: 500 training pairs per language pair (x2 directions), full valid and test sets
    python prepare_data.py --data-dir ALMA/human_written_data --out data/alma_small --subset 500

    # the same data from the Hugging Face Hub (haoranxu/ALMA-Human-Parallel, haoranxu/WMT22-Test)
    python prepare_data.py --hub --pairs de-en,cs-en --out data/alma

    # the embedded synthetic task (kd/demo.py) that needs no download: the quickstart's data
    python prepare_data.py --demo --out data/demo --demo-train-pairs 4000 --seed 42

    # the demo with what real data has: monolingual text for a base model, several correct
    # translations for half the training pairs, 10 % noisy training references
    python prepare_data.py --demo --out data/demo_real --demo-monolingual 3000 --demo-ambiguity --demo-noise 0.1

Input layout (ALMA's), per language pair xx-en, in DIR/<xx>en/ or directly in DIR/:
    train.xx-en.json  valid.xx-en.json  test.xx-en.json  test.en-xx.json
each either JSON Lines or one JSON array of {"translation": {"xx": "...", "en": "..."}}; or plain
aligned text files instead of any of them: train.xx-en.xx + train.xx-en.en (one sentence a line).
Where a split is there both ways (ALMA's published csen/ and isen/ folders), the JSON file is read,
and the log and stats.json ("preferred_json") say which text files were not. ALMA publishes no
valid file for is-en: with that pair, pass --valid-directions naming pairs that have one.

Output rows (one JSON object a line, keys in this order):
    id         "<split>-<direction>-<index>", index = the pair's position in its input file from 0
    direction  "de-en";  src_lang "de";  tgt_lang "en"
    source     the sentence to translate;  reference  its human translation (the model's target)
    prompt     kd.prompts.build_prompt(source, src_lang, tgt_lang, template): the full prompt up
               to and including the response marker
train.jsonl holds both directions of every training pair, shuffled with --seed; valid.jsonl the
--valid-directions in file order; test/<src>-<tgt>.jsonl every WMT22 row in file order.

What is dropped, and why: a pair with an empty or whitespace-only side is dropped from every split
(it teaches nothing and cannot be scored). Exact duplicate pairs are counted everywhere but kept
unless --drop-duplicates: the paper's 52,574 training examples include the 9 duplicate pairs of
the ALMA training files, and the test sets must keep every row so that the hypotheses line up
with the official WMT22 references (--drop-duplicates therefore only touches the training split).
A table of read / kept / dropped per split and direction is printed and saved in stats.json.
Same input and seed give byte-identical files. The output is all or nothing: every input error
(including text that UTF-8 cannot hold) stops the run before anything is written, every file is
written under a temporary name first and renamed into place only when all of them are written, and
stats.json, renamed last, marks a complete folder.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

from kd.io import OutputGroup, fail, json_text, jsonl_text, read_text
from kd.prompts import LANGUAGE_NAMES, TEMPLATES, build_prompt

PAPER_VALID_DIRECTIONS = {"de": "en-de", "cs": "cs-en"}  # WMT21 En->De and Cs->En, as the paper
HUB_PARALLEL = "haoranxu/ALMA-Human-Parallel"
HUB_TEST = "haoranxu/WMT22-Test"
JSON_SUFFIXES = (".json", ".jsonl")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (head prepare_data.py) for the layout and the rules.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="folder with the ALMA layout: <xx>en/{train,valid,test}.<xx>-en.json, ...")
    source.add_argument("--hub", action="store_true",
                        help=f"read {HUB_PARALLEL} and {HUB_TEST} with datasets.load_dataset")
    source.add_argument("--demo", action="store_true",
                        help="generate the embedded synthetic de-en/cs-en task of kd/demo.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--pairs", default=None,
                        help="comma-separated xx-en pairs (en-xx means the same pair); default: "
                             "every pair found in --data-dir, de-en,cs-en with --hub and --demo")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="alpaca",
                        help="prompt template of kd/prompts.py (default: alpaca, the paper's)")
    parser.add_argument("--valid-directions", default=None,
                        help="comma-separated directions of the validation set; default: en-de "
                             "and cs-en as the paper (xx-en for any other pair)")
    parser.add_argument("--seed", type=int, default=42, help="shuffles train.jsonl (and --subset)")
    parser.add_argument("--subset", type=int, default=None,
                        help="keep N training pairs per language pair (before doubling), seeded")
    parser.add_argument("--drop-duplicates", action="store_true",
                        help="drop exact duplicate training pairs (off: the paper's count keeps them)")
    parser.add_argument("--demo-train-pairs", type=int, default=4000,
                        help="--demo: training pairs per language pair (x2 directions)")
    parser.add_argument("--demo-eval-pairs", type=int, default=200,
                        help="--demo: pairs per validation direction and per test file")
    parser.add_argument("--demo-monolingual", type=int, default=0, metavar="N",
                        help="--demo: also write mono.jsonl (N sentences per language, empty prompt: "
                             "train a base model with --method sft) and mono_valid.jsonl "
                             "(max(50, N/50) per language)")
    parser.add_argument("--demo-ambiguity", type=float, nargs="?", const=0.5, default=0.0, metavar="SHARE",
                        help="--demo: SHARE (default 0.5) of the training pairs drawn from several correct "
                             "renderings (synonyms, word orders, optional words); valid/test stay canonical")
    parser.add_argument("--demo-noise", type=float, default=0.0, metavar="P",
                        help="--demo: corrupt each training reference with probability P (a word dropped "
                             "or replaced, a span of another sentence appended or substituted)")
    return parser.parse_args(argv)


def parse_pair(text, flag):
    """'de-en' or 'en-de' -> 'de' (the non-English side of an English-centric pair)."""
    parts = text.strip().split("-")
    if len(parts) != 2 or "en" not in parts or parts[0] == parts[1]:
        fail(flag, f"{text!r} is not an English-centric pair", "write pairs as xx-en, e.g. de-en,cs-en")
    other = parts[0] if parts[1] == "en" else parts[1]
    if other not in LANGUAGE_NAMES:
        fail(flag, f"unknown language code {other!r}",
             f"use one of {', '.join(sorted(LANGUAGE_NAMES))} or add it to kd/prompts.py")
    return other


def parse_direction(text, flag):
    """'en-de' -> ('en', 'de'), checked like a pair."""
    parse_pair(text, flag)
    src, tgt = text.strip().split("-")
    return src, tgt


# ---- reading: JSON Lines, JSON arrays, aligned text files ----

def pair_from_record(record, lang, where):
    """{"translation": {lang: ..., "en": ...}} -> (lang text, en text)."""
    if not isinstance(record, dict) or not isinstance(record.get("translation"), dict):
        fail(where, 'the record is not {"translation": {...}}',
             f'write each record as {{"translation": {{"{lang}": "...", "en": "..."}}}}')
    translation = record["translation"]
    for key in (lang, "en"):
        if key not in translation:
            fail(where, f"the record has no {key!r} key (it has {sorted(translation)})",
                 f"every record needs both {lang!r} and 'en'; fix or remove the record")
        if not isinstance(translation[key], str):
            fail(where, f"the {key!r} value is {type(translation[key]).__name__}, not a string",
                 "write every sentence as a JSON string")
        try:  # checked here, not when writing: a lone surrogate ("\ud800") is valid JSON but not UTF-8
            translation[key].encode("utf-8")
        except UnicodeEncodeError as error:
            bad = translation[key][error.start:error.end]
            fail(where, f"the {key!r} value holds {bad!r}, which UTF-8 cannot encode (a lone surrogate)",
                 "fix or remove the record")
    return translation[lang], translation["en"]


def read_json_file(path, lang):
    """Pairs of a JSON Lines file or of one JSON array, detected by the first character."""
    text = read_text(path)  # UTF-8, a leading byte-order mark dropped
    stripped = text.lstrip()
    if not stripped:
        fail(path, "the file is empty", "remove it or fill it with records")
    if stripped[0] == "[":
        return read_json_array(path, text, lang)
    pairs = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # a blank line holds no record (the last line of most files)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"{path}:{line_number}", f"invalid JSON ({error.msg}, column {error.colno})",
                 "fix the line; each line must be one JSON record")
        pairs.append(pair_from_record(record, lang, f"{path}:{line_number}"))
    return pairs


def read_json_array(path, text, lang):
    """Walk the array element by element so that an error can name its line."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    pairs = []
    position = whitespace.match(text, 0).end() + 1  # past the "["
    position = whitespace.match(text, position).end()
    if text.startswith("]", position):
        return pairs
    while True:
        line_number = text.count("\n", 0, position) + 1
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}", f"invalid JSON ({error.msg}, column {error.colno})",
                 "fix the record; the file must be one JSON array of records")
        pairs.append(pair_from_record(record, lang, f"{path}:{line_number}"))
        position = whitespace.match(text, end).end()
        if text.startswith(",", position):
            position = whitespace.match(text, position + 1).end()
        elif text.startswith("]", position):
            break
        else:
            fail(f"{path}:{text.count(chr(10), 0, position) + 1}",
                 "invalid JSON (expected ',' or ']' after a record)", "fix the array")
    if text[position + 1:].strip():
        fail(f"{path}:{text.count(chr(10), 0, position) + 1}", "text after the closing ']'",
             "the file must hold exactly one JSON array")
    return pairs


def read_text_lines(path):
    text = read_text(path)  # UTF-8, a leading byte-order mark dropped
    if text.endswith("\n"):
        text = text[:-1]
    # split on "\n" only: str.splitlines would also split inside a sentence at U+2028 and friends
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


def read_text_pair(lang_path, en_path):
    lang_lines, en_lines = read_text_lines(lang_path), read_text_lines(en_path)
    if len(lang_lines) != len(en_lines):
        fail(f"{lang_path} ({len(lang_lines)} lines) and {en_path} ({len(en_lines)} lines)",
             "the aligned text files have different line counts",
             "line i of one file must translate line i of the other; fix the alignment")
    return list(zip(lang_lines, en_lines))


def locate(folders, stem, lang):
    """The file(s) holding `stem` (e.g. train.de-en): ('json', path, ignored), ('text', (xx, en), ()) or None.

    ALMA's published csen/ and isen/ folders hold the same split twice, as a JSON file and as
    aligned text files: the JSON file is read and the text files are returned as `ignored`.
    """
    for folder in folders:
        json_paths = [folder / (stem + suffix) for suffix in JSON_SUFFIXES]
        json_paths = [path for path in json_paths if path.is_file()]
        text_paths = [folder / f"{stem}.{lang}", folder / f"{stem}.en"]
        present_text = [path for path in text_paths if path.is_file()]
        if len(json_paths) > 1:
            fail(folder, f"{stem} is there twice ({', '.join(p.name for p in json_paths)})",
                 "keep one of the two JSON files")
        if json_paths:
            return "json", json_paths[0], tuple(present_text)
        if len(present_text) == 1:
            missing = next(path for path in text_paths if not path.is_file())
            fail(present_text[0], f"its aligned partner {missing.name} is missing",
                 f"add {missing} or remove the file")
        if present_text:
            return "text", tuple(text_paths), ()
    return None


def describe_expected(folders, stem, lang):
    return " or ".join(f"{folder / stem}.json(l) / {folder / stem}.{{{lang},en}}" for folder in folders)


def read_local(data_dir, lang, needs_valid, preferred):
    """{'train': (label, pairs), 'valid': ..., 'test.xx-en': ..., 'test.en-xx': ...} of one pair.

    Appends {"read": json file, "ignored": [text files]} to `preferred` for every split that is
    there both as JSON and as aligned text files.
    """
    folders = [data_dir / f"{lang}en", data_dir]
    stems = {"train": f"train.{lang}-en", "valid": f"valid.{lang}-en",
             f"test.{lang}-en": f"test.{lang}-en", f"test.en-{lang}": f"test.en-{lang}"}
    located = {part: locate(folders, stem, lang) for part, stem in stems.items()}
    if not any(located.values()):
        fail(data_dir, f"no files for the pair {lang}-en",
             f"expected {describe_expected(folders[:1], stems['train'], lang)} and its valid/test "
             "files, or drop the pair from --pairs")
    parts = {}
    for part, stem in stems.items():
        if located[part] is None:
            if part == "valid" and not needs_valid:
                continue
            if part == "valid":  # ALMA publishes no valid file for some pairs (is-en)
                fail(data_dir, f"no {stem} file for the pair {lang}-en, which --valid-directions "
                     f"asks for (default: {', '.join(PAPER_VALID_DIRECTIONS.values())} as the paper, "
                     "xx-en for any other pair)",
                     f"pass --valid-directions naming pairs that have a valid file, or add "
                     f"{describe_expected(folders[:1], stem, lang)}")
            fail(data_dir, f"no {stem} file for the pair {lang}-en",
                 f"expected {describe_expected(folders, stem, lang)}")
        kind, where, ignored = located[part]
        if kind == "json":
            parts[part] = (str(where), read_json_file(where, lang))
            if ignored:
                preferred.append({"read": str(where), "ignored": [str(path) for path in ignored]})
        else:
            parts[part] = (f"{where[0]} + {where[1].name}", read_text_pair(*where))
    return parts


def read_hub(lang, needs_valid):
    """The same parts from the Hugging Face Hub (needs the network and the datasets library)."""
    from datasets import load_dataset  # only this path needs it

    def pairs_of(dataset, label):
        # ALMA-Human-Parallel names its column "translation", WMT22-Test after the config ("de-en")
        column = "translation" if "translation" in dataset.column_names else dataset.column_names[0]
        return [pair_from_record({"translation": t}, lang, f"{label} record {index}")
                for index, t in enumerate(dataset[column])]

    parallel = load_dataset(HUB_PARALLEL, f"{lang}-en")
    parts = {"train": (f"hub:{HUB_PARALLEL}/{lang}-en/train",
                       pairs_of(parallel["train"], f"{HUB_PARALLEL}/{lang}-en/train"))}
    if needs_valid:
        parts["valid"] = (f"hub:{HUB_PARALLEL}/{lang}-en/validation",
                          pairs_of(parallel["validation"], f"{HUB_PARALLEL}/{lang}-en/validation"))
    for config in (f"{lang}-en", f"en-{lang}"):
        test = load_dataset(HUB_TEST, config)["test"]
        parts[f"test.{config}"] = (f"hub:{HUB_TEST}/{config}/test",
                                   pairs_of(test, f"{HUB_TEST}/{config}/test"))
    return parts


def pairs_in_folder(data_dir):
    """Every xx of a train.xx-en.* file in DIR/<xx>en/ or DIR/."""
    pattern = re.compile(r"^train\.([a-z]{2,3})-en\.")
    found = set()
    for path in list(data_dir.glob("train.*")) + list(data_dir.glob("*/train.*")):
        match = pattern.match(path.name)
        if match and (path.parent == data_dir or path.parent.name == f"{match.group(1)}en"):
            found.add(match.group(1))
    return sorted(found)


# ---- dropping: empty sides everywhere, duplicates counted (dropped in training on request) ----

def clean(pairs, drop_duplicates):
    """[(index, lang text, en text)] kept, and the counts of what happened to the rest."""
    kept, seen = [], set()
    counts = {"read": len(pairs), "dropped_empty": 0, "dropped_duplicate": 0, "duplicates_kept": 0}
    for index, (lang_text, en_text) in enumerate(pairs):
        if not lang_text.strip() or not en_text.strip():
            counts["dropped_empty"] += 1
            continue
        if (lang_text, en_text) in seen:
            if drop_duplicates:
                counts["dropped_duplicate"] += 1
                continue
            counts["duplicates_kept"] += 1
        seen.add((lang_text, en_text))
        kept.append((index, lang_text, en_text))
    return kept, counts


def make_row(split, src, tgt, index, source, reference, template):
    direction = f"{src}-{tgt}"
    return {"id": f"{split}-{direction}-{index:06d}", "direction": direction, "src_lang": src,
            "tgt_lang": tgt, "source": source, "reference": reference,
            "prompt": build_prompt(source, src, tgt, template)}


def rows_for(split, lang, src, kept, template):
    """Rows of one direction from kept (index, lang text, en text) pairs."""
    rows = []
    for index, lang_text, en_text in kept:
        source, reference = (en_text, lang_text) if src == "en" else (lang_text, en_text)
        rows.append(make_row(split, src, "en" if src == lang else lang, index, source, reference,
                             template))
    return rows


def format_table(table):
    columns = ["split", "direction", "read", "dropped_empty", "dropped_duplicate",
               "duplicates_kept", "dropped_by_subset", "kept"]
    widths = [max(len(c), *(len(str(entry[c])) for entry in table)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(entry[c]).rjust(w) for c, w in zip(columns, widths)) for entry in table]
    return "\n".join(lines)


def ambiguity_stats(share, report, langs):
    """stats.json's view of kd.demo's ambiguity report, per training direction (target side)."""
    directions = {}
    for lang in langs:
        counts = report[f"{lang}-en"]
        for src, tgt in ((lang, "en"), ("en", lang)):
            histogram = counts["alternatives"][tgt]
            ambiguous = sum(pairs for n, pairs in histogram.items() if n > 1)
            directions[f"{src}-{tgt}"] = {
                "alternatives_histogram": {str(n): pairs for n, pairs in histogram.items()},
                "sources_with_alternatives": ambiguous / counts["pairs"],
                "references_drawn": counts["drawn"] / counts["pairs"],
                "references_not_canonical": counts["not_canonical"][tgt] / counts["pairs"],
            }
    return {"share": share,
            "note": "per training direction, over the generated pairs (before --subset): how many "
                    "correct renderings each reference had (histogram of pairs by count), the share "
                    "with more than one, the share drawn from them (about SHARE), and the share whose "
                    "drawn reference differs from the canonical one; valid and test are canonical",
            "directions": directions}


def main(argv=None):
    args = parse_args(argv)

    # ---- check the arguments before reading anything ----
    if args.subset is not None and args.subset < 1:
        fail("--subset", f"{args.subset} is not a positive number of pairs", "pass N >= 1 or leave it out")
    if args.demo and (args.demo_train_pairs < 1 or args.demo_eval_pairs < 1):
        fail("--demo-train-pairs/--demo-eval-pairs", "must be positive", "pass N >= 1")
    if args.demo_monolingual < 0:
        fail("--demo-monolingual", f"{args.demo_monolingual} is negative", "pass N >= 0 sentences per language")
    for flag, value in (("--demo-ambiguity", args.demo_ambiguity), ("--demo-noise", args.demo_noise)):
        if not 0 <= value <= 1:  # also refuses nan
            fail(flag, f"{value} is not a share between 0 and 1", "pass a value in [0, 1]")
    if not args.demo and (args.demo_monolingual or args.demo_ambiguity or args.demo_noise):
        fail("--demo-monolingual/--demo-ambiguity/--demo-noise", "only the demo task has them",
             "add --demo or leave them out")
    if args.data_dir is not None and not args.data_dir.is_dir():
        fail(args.data_dir, "no such folder", "pass the folder that holds <xx>en/train.<xx>-en.json")
    if args.pairs is not None:
        langs = [parse_pair(text, "--pairs") for text in args.pairs.split(",") if text.strip()]
    elif args.data_dir is not None:
        langs = pairs_in_folder(args.data_dir)
        if not langs:
            fail(args.data_dir, "no train.<xx>-en.* file in it or in its <xx>en/ folders",
                 "pass human_written_data/ of a clone of the ALMA repository, or a folder of that layout")
    else:
        langs = ["de", "cs"]
    if len(set(langs)) != len(langs) or not langs:
        fail("--pairs", f"{args.pairs!r} names no pair or a pair twice", "list each pair once")
    if args.demo and not set(langs) <= {"de", "cs"}:
        fail("--pairs", "the demo task has only de-en and cs-en", "pass a subset of de-en,cs-en")
    if args.valid_directions is not None:
        valid_directions = [parse_direction(text, "--valid-directions")
                            for text in args.valid_directions.split(",") if text.strip()]
    else:
        valid_directions = [tuple(PAPER_VALID_DIRECTIONS.get(lang, f"{lang}-en").split("-"))
                            for lang in langs]
    for src, tgt in valid_directions:
        if (src if tgt == "en" else tgt) not in langs:
            fail("--valid-directions", f"{src}-{tgt} is not a direction of --pairs ({','.join(langs)})",
                 "choose directions of the requested pairs")

    # ---- read every file (every input error stops here, before anything is written) ----
    needs_valid = {lang: any(lang in direction for direction in valid_directions) for lang in langs}
    preferred_json = []  # splits there both as JSON and as aligned text files: the JSON is read
    if args.demo:
        from kd.demo import add_reference_noise, generate_demo_corpus, generate_monolingual

        ambiguity_report = {}
        demo = generate_demo_corpus(train_pairs=args.demo_train_pairs, eval_pairs=args.demo_eval_pairs,
                                    seed=args.seed, ambiguity=args.demo_ambiguity,
                                    ambiguity_report=ambiguity_report)
        corpus = {lang: {part: (f"kd/demo.py:{lang}-en:{part}", pairs)
                         for part, pairs in demo[lang].items()} for lang in langs}
        data_source = f"demo (kd/demo.py, seed {args.seed})"
        mono_rows, mono_valid_rows = [], []
        if args.demo_monolingual:
            # rows with an empty prompt: kd.data trains on BOS + sentence + EOS, the loss on the sentence
            held_out = {text for parts in demo.values() for part, pairs in parts.items() if part != "train"
                        for pair in pairs for text in pair}
            mono_valid_count = max(50, args.demo_monolingual // 50)
            mono = generate_monolingual(args.demo_monolingual, mono_valid_count, held_out, seed=args.seed,
                                        langs=["en", *langs], ambiguity=args.demo_ambiguity)
            for split, rows in (("mono", mono_rows), ("mono_valid", mono_valid_rows)):
                for lang, texts in mono[split].items():
                    rows += [{"id": f"{split}-{lang}-{index:06d}", "direction": f"mono-{lang}",
                              "src_lang": lang, "tgt_lang": lang, "source": "", "reference": text,
                              "prompt": ""} for index, text in enumerate(texts)]
            random.Random(f"mono-{args.seed}").shuffle(mono_rows)
    elif args.hub:
        corpus = {lang: read_hub(lang, needs_valid[lang]) for lang in langs}
        data_source = f"hub ({HUB_PARALLEL}, {HUB_TEST})"
    else:
        corpus = {lang: read_local(args.data_dir, lang, needs_valid[lang], preferred_json) for lang in langs}
        data_source = str(args.data_dir)

    # ---- drop, subsample, build the rows of every split ----
    table, train_rows, valid_rows, test_files = [], [], [], {}

    def note(split, src, tgt, label, counts, dropped_by_subset, kept):
        table.append({"split": split, "direction": f"{src}-{tgt}", "file": label, **counts,
                      "dropped_by_subset": dropped_by_subset, "kept": kept})

    for lang in langs:
        label, pairs = corpus[lang]["train"]
        kept, counts = clean(pairs, args.drop_duplicates)
        dropped_by_subset = 0
        if args.subset is not None and args.subset < len(kept):
            chosen = random.Random(f"subset-{args.seed}-{lang}").sample(range(len(kept)), args.subset)
            dropped_by_subset = len(kept) - args.subset
            kept = [kept[i] for i in sorted(chosen)]  # file order; train.jsonl is shuffled below
        for src, tgt in ((lang, "en"), ("en", lang)):
            train_rows += rows_for("train", lang, src, kept, args.template)
            note("train", src, tgt, label, counts, dropped_by_subset, len(kept))

    for src, tgt in valid_directions:
        lang = src if tgt == "en" else tgt
        label, pairs = corpus[lang]["valid"]
        kept, counts = clean(pairs, drop_duplicates=False)
        valid_rows += rows_for("valid", lang, src, kept, args.template)
        note("valid", src, tgt, label, counts, 0, len(kept))

    for lang in langs:
        for src, tgt in ((lang, "en"), ("en", lang)):
            label, pairs = corpus[lang][f"test.{src}-{tgt}"]
            kept, counts = clean(pairs, drop_duplicates=False)  # every row: they match WMT22 refs
            test_files[f"{src}-{tgt}"] = rows_for("test", lang, src, kept, args.template)
            note("test", src, tgt, label, counts, 0, len(kept))

    noise_report = None
    if args.demo and args.demo_noise > 0:  # before the shuffle: the corrupted rows depend on the seed only
        noise_report = add_reference_noise(train_rows, args.demo_noise, args.seed)
    random.Random(args.seed).shuffle(train_rows)

    # ---- write all or nothing (every file written first, then renamed; stats.json last) and report ----
    stats = {
        "data_source": data_source,
        "pairs": [f"{lang}-en" for lang in langs],
        "template": args.template,
        "seed": args.seed,
        "subset": args.subset,
        "subset_note": (f"--subset {args.subset}: at most {args.subset} training pairs per language "
                        "pair (x2 directions), chosen with the seed; not the paper's data")
                       if args.subset is not None else None,
        "drop_duplicates": args.drop_duplicates,
        "preferred_json": preferred_json,
        "counts": {"train": len(train_rows), "valid": len(valid_rows),
                   **{f"test/{direction}": len(rows) for direction, rows in test_files.items()}},
        "table": table,
    }
    if args.demo:
        stats["demo"] = {"train_pairs": args.demo_train_pairs, "eval_pairs": args.demo_eval_pairs}
        if args.demo_ambiguity:
            stats["demo"]["ambiguity"] = ambiguity_stats(args.demo_ambiguity, ambiguity_report, langs)
        if noise_report is not None:
            stats["demo"]["noise"] = noise_report
        if args.demo_monolingual:
            stats["demo"]["monolingual"] = {
                "per_language": args.demo_monolingual, "valid_per_language": mono_valid_count,
                "languages": ["en", *langs], "files": ["mono.jsonl", "mono_valid.jsonl"],
                "note": "direction mono-<lang>, src_lang = tgt_lang = <lang>, empty source and prompt, "
                        "the sentence as reference; no sentence is a rendering of a valid or test sentence"}
            stats["counts"].update({"mono": len(mono_rows), "mono_valid": len(mono_valid_rows)})
    with OutputGroup() as output:
        output.write_text(args.out / "train.jsonl", jsonl_text(train_rows))
        output.write_text(args.out / "valid.jsonl", jsonl_text(valid_rows))
        for direction, rows in test_files.items():
            output.write_text(args.out / "test" / f"{direction}.jsonl", jsonl_text(rows))
        if args.demo and args.demo_monolingual:
            output.write_text(args.out / "mono.jsonl", jsonl_text(mono_rows))
            output.write_text(args.out / "mono_valid.jsonl", jsonl_text(mono_valid_rows))
        output.write_text(args.out / "stats.json", json_text(stats))
        # Everything is written; the renames follow. stats.json marks a complete folder: it goes first
        # and comes back last, so a kill between the renames leaves a folder without it.
        (args.out / "stats.json").unlink(missing_ok=True)
    stale = sorted(path.name for path in (args.out / "test").glob("*.jsonl")
                   if path.stem not in test_files)
    for entry in preferred_json:
        print(f"{entry['read']}: read this JSON file; the same split's aligned text files "
              f"({', '.join(Path(path).name for path in entry['ignored'])}) were not read")
    print(format_table(table))
    print(f"wrote {args.out}: train {len(train_rows)}, valid {len(valid_rows)}, "
          + ", ".join(f"test/{d} {len(r)}" for d, r in test_files.items()))
    if stale:
        print(f"warning: {args.out / 'test'} also holds {', '.join(stale)} from an earlier run; "
              "delete them if they are not meant to be evaluated", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
