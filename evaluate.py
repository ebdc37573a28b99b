"""Score translations as the paper does (BLEU, COMET, significance †), and lay out Table 1.

    # one system: every direction of hyps/selfevo against the references of data/alma/test
    python evaluate.py --hyps hyps/selfevo --refs data/alma/test --baseline hyps/forward \\
        --teacher-hyps hyps/teacher --out results/selfevo.json

    # without COMET (or with a local COMET checkpoint: --comet-model path/to/wmt22-comet-da)
    python evaluate.py --hyps hyps/tiny --refs data/demo/test --comet-model none --out results/tiny.json

    # only some directions (the hyps folder may then lack the others)
    python evaluate.py --hyps hyps/x --refs data/alma/test --directions de-en,en-de --out results/x.json

    # COMET on a stack without unbabel-comet (requirements-latest.txt): through another
    # environment's Python that has it (requirements.txt installed there)
    python evaluate.py --hyps hyps/selfevo --refs data/alma/test --comet-python ../comet-env/bin/python \\
        --out results/selfevo.json

    # the table: rows in the paper's order (teacher, student, forward, reverse, noevo, skew, selfevo,
    # then the rest), whatever the order of the files; the Δ row is selfevo (or --compare NAME) minus
    # the baseline
    python evaluate.py table results/*.json --baseline forward --out table.md

Inputs: --hyps and --refs are folders of <src>-<tgt>.jsonl files (or single files): the hypotheses of
generate.py (`id`, `hypothesis`) and the test files of prepare_data.py (`id`, `source`, `reference`,
`tgt_lang`). Hypotheses are matched to references by `id` (the output is in reference order);
every direction of --hyps needs its reference file, and every reference file needs hypotheses
unless --directions names the directions to score. Different numbers of rows, ids that do not
match, an id twice, an empty file: an error naming the file, before anything is computed, and no
results file. --limit N scores the first N references of each file (for generate.py --limit N).

Per direction (results JSON, written atomically):
    n                    rows scored
    bleu, bleu_signature sacrebleu BLEU with the target language's tokenizer (13a; zh, ja-mecab, ...;
                         every direction's tokenizer is checked before the first is scored)
    chrf, chrf_signature sacrebleu chrF2
    comet                COMET system score x 100 (the paper's scale), null with --comet-model none;
                         in this process, or with --comet-python P through P (same numbers)
    teacher_bleu         BLEU against the teacher's hypotheses (--teacher-hyps; the paper's Fig. 4)
    off_target_rate      share of hypotheses not identified as the target language (py3langid,
                         guessing among ALMA's languages, English and the scored directions' languages)
    baseline             the baseline's system name (--baseline), and against it:
    bleu_p_value, bleu_significant     paired bootstrap, sacrebleu PairedTest, 1000 resamples, seed 12345
    comet_p_value, comet_significant   the same on COMET segment scores (kd/metrics.py); p < 0.05 = †
"average" holds the mean over the directions. COMET runs under plain python, not accelerate launch:
on a GPU if there is one, else on the CPU.

Table (`evaluate.py table`): Markdown like the paper's Table 1: one row per results file in the
paper's order (teacher, student_sft, forward, reverse, noevo, skew, selfevo, then the others in the
order given), BLEU and COMET per direction (xx->en, then en->xx: de-en, cs-en, en-de, en-cs first)
and their average (COMET columns only when some result has COMET); † where the result was tested
against --baseline and p < 0.05; a last row Δ = selfevo (the paper's method; --compare NAME picks
another) minus the baseline.
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

from kd.io import fail, read_json, read_jsonl, write_text
from kd.systems import order_key

PAPER_LANGUAGES = ("de", "cs")  # Table 1's order within xx->en and en->xx; other languages follow by code
PAPER_METHOD = "selfevo"
DIRECTION_PATTERN = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")
SIGNIFICANCE_LEVEL = 0.05


class InputError(Exception):
    """A bad input file; the message names it."""


# ---------------------------------------------------------------------------------------------
# Reading and matching the files
# ---------------------------------------------------------------------------------------------

def direction_files(path, argument):
    """{direction: file} of a folder of <src>-<tgt>.jsonl files, or of one such file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            fail(f"{argument} {path}", "no .jsonl files in this folder", "pass the folder made by generate.py / prepare_data.py")
    else:
        fail(f"{argument} {path}", "no such file or folder", "check the path")
    found = {}
    for file in files:
        if not DIRECTION_PATTERN.match(file.stem):
            fail(str(file), "the file name is not a direction like de-en.jsonl", "rename it or move it out of the folder")
        found[file.stem] = file
    return found


def read_rows(path, required, text_fields):
    """Rows of a hypotheses or references file: every row has `required`, `text_fields` are strings."""
    return read_jsonl(path, required=required, text_fields=text_fields, unique_ids=True, allow_empty=False)


def matched_hypotheses(path, references):
    """The `hypothesis` of each reference row, matched by id, in reference order."""
    rows = read_rows(path, required=("id", "hypothesis"), text_fields=("hypothesis",))
    if len(rows) < len(references):
        have = {row["id"] for row in rows}
        missing = [i for i, row in enumerate(references) if row["id"] not in have]
        if missing and missing == list(range(len(references) - len(missing), len(references))):
            todo = ("generate the missing rows (run generate.py again to resume), or pass --limit "
                    f"{len(references) - len(missing)} to score the first rows only")
        else:  # a hole in the middle (a row lost, a blank line where it was): --limit would not help
            first = missing[0] if missing else 0
            blank = next((i + 1 for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n")[:-1])
                          if not line.strip()), None)
            todo = (f"the first missing is id {references[first]['id']!r} (row {first + 1} of the references)"
                    + (f"; line {blank} of the file is blank" if blank else "")
                    + "; regenerate the file with generate.py (delete it first)")
        fail(str(path), f"{len(rows)} hypotheses for {len(references)} references", todo)
    if len(rows) > len(references):
        fail(str(path), f"{len(rows)} hypotheses for {len(references)} references (more hypotheses than references)",
             "pass the test folder these hypotheses were generated from, or the --limit used with generate.py")
    by_id = {row["id"]: row for row in rows}
    missing = [row["id"] for row in references if row["id"] not in by_id]
    if missing:
        extra = next(row["id"] for row in rows if row["id"] not in {r["id"] for r in references})
        fail(str(path), f"ids that do not match the references ({len(missing)} missing, first {missing[0]!r}; "
             f"first unknown {extra!r})", "hypotheses and references must come from the same test file")
    # ids alone do not tie a hypothesis to its reference (two test sets can share ids): each row must
    # carry the source it translates (generate.py keeps it), the reference's own
    for reference in references:
        hypothesis = by_id[reference["id"]]
        if "source" in reference and hypothesis.get("source") != reference["source"]:
            what = ("has no source to check it against its reference" if "source" not in hypothesis else
                    f"translates another source ({hypothesis['source']!r}; the reference's is {reference['source']!r})")
            fail(f"{path}: id {reference['id']!r}", what,
                 "score the hypotheses generate.py made from this very test file (it keeps each row's source)")
    return [by_id[row["id"]]["hypothesis"] for row in references]


def target_language(direction, references, path):
    tgt = direction.split("-")[1]
    stated = {row.get("tgt_lang", tgt) for row in references}
    if stated != {tgt}:
        fail(str(path), f"tgt_lang {sorted(stated)} does not match the file name {direction}", "fix the file")
    return tgt


# ---------------------------------------------------------------------------------------------
# Scoring one system
# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        usage="evaluate.py [-h] --hyps HYPS --refs REFS --out OUT [options]\n"
              "       evaluate.py table RESULTS.json... [--baseline NAME] [--compare NAME] [--out FILE]",
        description=__doc__.split("\n\n")[0],
        epilog="evaluate.py table lays results files out like the paper's Table 1 (evaluate.py table --help). "
               "See the module docstring (head evaluate.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hyps", required=True, type=Path, help="folder of <src>-<tgt>.jsonl made by generate.py (or one file)")
    parser.add_argument("--refs", required=True, type=Path, help="test folder of prepare_data.py (or one file)")
    parser.add_argument("--out", required=True, type=Path, help="results JSON to write")
    parser.add_argument("--system", help="name of the system (default: the --hyps folder name)")
    parser.add_argument("--baseline", type=Path, help="hypotheses of the baseline system, for the significance tests")
    parser.add_argument("--teacher-hyps", type=Path, help="hypotheses of the teacher, for teacher_bleu")
    parser.add_argument("--comet-model", default="Unbabel/wmt22-comet-da",
                        help="hub name, local checkpoint (folder or model.ckpt), or none (default Unbabel/wmt22-comet-da)")
    parser.add_argument("--comet-python", type=Path,
                        help="score COMET through this Python of another environment that has unbabel-comet "
                             "(e.g. one with requirements.txt installed), for a stack without it")
    parser.add_argument("--comet-batch-size", type=int, default=32)
    parser.add_argument("--directions", help="comma-separated directions to score (default: every file of --hyps)")
    parser.add_argument("--limit", type=int, help="score only the first N references of each file")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        fail(f"--limit {args.limit}", "must be at least 1", "pass a positive number")
    if args.comet_batch_size < 1:
        fail(f"--comet-batch-size {args.comet_batch_size}", "must be at least 1", "pass a positive number")
    return args


def system_name(path):
    path = Path(path)
    return path.stem if path.is_file() else path.name


def evaluate(argv):
    args = parse_args(argv)
    from kd import metrics

    # ---- inputs: every file read and matched before anything is computed ----
    hyp_files = direction_files(args.hyps, "--hyps")
    ref_files = direction_files(args.refs, "--refs")
    if args.directions:
        directions = [d.strip() for d in args.directions.split(",") if d.strip()]
        for direction in directions:
            if direction not in hyp_files:
                fail(f"--hyps {args.hyps}", f"no {direction}.jsonl (asked for by --directions)", "generate it first")
    else:
        directions = list(hyp_files)
        unscored = [d for d in ref_files if d not in hyp_files]
        if unscored and args.refs.is_dir() and args.hyps.is_dir():
            fail(f"--hyps {args.hyps}", f"no hypotheses for {', '.join(unscored)} of {args.refs}",
                 "generate them, or name the directions to score with --directions")
    for direction in directions:
        if direction not in ref_files:
            where = args.refs if args.refs.is_dir() else args.refs.parent
            fail(str(hyp_files[direction]), f"no reference file {direction}.jsonl in {where}",
                 "pass the test folder these hypotheses were generated from")
    extra_systems = {"baseline": args.baseline, "teacher": args.teacher_hyps}
    extra_files = {role: direction_files(path, f"--{'baseline' if role == 'baseline' else 'teacher-hyps'}")
                   for role, path in extra_systems.items() if path is not None}
    data = {}
    for direction in directions:
        references = read_rows(ref_files[direction], required=("id", "source", "reference"),
                               text_fields=("source", "reference"))[:args.limit]
        entry = {
            "tgt": target_language(direction, references, ref_files[direction]),
            "sources": [row["source"] for row in references],
            "references": [row["reference"] for row in references],
            "hyps": matched_hypotheses(hyp_files[direction], references),
        }
        for role, files in extra_files.items():
            if direction not in files:
                fail(f"--{'baseline' if role == 'baseline' else 'teacher-hyps'} {extra_systems[role]}",
                     f"no {direction}.jsonl", "score the same directions for every system")
            entry[role] = matched_hypotheses(files[direction], references)
        data[direction] = entry

    # ---- every direction's BLEU tokenizer works (ja-mecab, ko-mecab need extras) before any scoring ----
    problems = []
    for tgt in sorted({entry["tgt"] for entry in data.values()}):
        try:
            metrics.check_bleu_tokenizer(tgt)
        except RuntimeError as error:
            problems.append(f"{', '.join(d for d, e in data.items() if e['tgt'] == tgt)}: {error}")
    if problems:
        fail("BLEU", "; ".join(problems),
             "install the missing extra (pip install -r requirements.txt has them), or leave the direction out with --directions")

    # ---- COMET first: a model that cannot be loaded fails before any other work ----
    comet_name = None if args.comet_model.lower() == "none" else args.comet_model
    comet = {}  # (direction, "system" | "baseline") -> (segment scores, system score)
    if comet_name:
        jobs = {}
        for direction, entry in data.items():
            jobs[(direction, "system")] = (entry["sources"], entry["hyps"], entry["references"])
            if "baseline" in entry:
                jobs[(direction, "baseline")] = (entry["sources"], entry["baseline"], entry["references"])
        try:
            if args.comet_python is not None:
                scored = metrics.comet_scores_in(args.comet_python, comet_name,
                                                 {"/".join(key): job for key, job in jobs.items()}, args.comet_batch_size)
                comet = {key: scored["/".join(key)] for key in jobs}
            else:
                comet_model = metrics.load_comet(comet_name)
                comet = {key: metrics.comet_scores(comet_model, *job, args.comet_batch_size) for key, job in jobs.items()}
        except RuntimeError as error:
            raise SystemExit(f"evaluate.py: {error}") from None
        except ImportError as error:
            fail("--comet-model", f"unbabel-comet is not installed here ({error})",
                 "install requirements.txt, score COMET through another environment with --comet-python PATH, "
                 "or pass --comet-model none")

    # ---- metrics per direction ----
    name = args.system or system_name(args.hyps)
    baseline_name = system_name(args.baseline) if args.baseline else None
    identifier = metrics.language_identifier({lang for d in data for lang in d.split("-")})
    results = {}
    for direction, entry in data.items():
        tgt, refs, hyps = entry["tgt"], entry["references"], entry["hyps"]
        bleu, bleu_signature = metrics.corpus_bleu(hyps, refs, tgt)
        chrf, chrf_signature = metrics.corpus_chrf(hyps, refs)
        row = {"n": len(hyps), "bleu": bleu, "bleu_signature": bleu_signature, "chrf": chrf,
               "chrf_signature": chrf_signature, "comet": None, "teacher_bleu": None,
               "off_target_rate": metrics.off_target_rate(hyps, tgt, identifier), "baseline": baseline_name,
               "bleu_p_value": None, "bleu_significant": None, "comet_p_value": None, "comet_significant": None}
        if comet:
            segment_scores, system_score = comet[(direction, "system")]
            row["comet"] = 100 * system_score
        if "teacher" in entry:
            row["teacher_bleu"] = metrics.corpus_bleu(hyps, entry["teacher"], tgt)[0]
        if "baseline" in entry:
            row["baseline_bleu"] = metrics.corpus_bleu(entry["baseline"], refs, tgt)[0]
            row["bleu_p_value"] = metrics.bleu_paired_bootstrap(entry["baseline"], hyps, refs, tgt)
            row["bleu_significant"] = row["bleu_p_value"] < SIGNIFICANCE_LEVEL
            if comet:
                baseline_scores, baseline_system = comet[(direction, "baseline")]
                row["baseline_comet"] = 100 * baseline_system
                row["comet_p_value"] = metrics.mean_paired_bootstrap(baseline_scores, segment_scores)
                row["comet_significant"] = row["comet_p_value"] < SIGNIFICANCE_LEVEL
        results[direction] = row
        print(f"{name} {direction}: n={row['n']} BLEU {bleu:.2f} chrF {chrf:.2f}"
              + (f" COMET {row['comet']:.2f}" if row["comet"] is not None else "")
              + (f" (p BLEU {row['bleu_p_value']:.3f})" if row["bleu_p_value"] is not None else ""))

    # ---- results JSON ----
    def mean(key):
        values = [row[key] for row in results.values()]
        return None if any(value is None for value in values) else sum(values) / len(values)

    output = {
        "system": name, "hyps": str(args.hyps), "refs": str(args.refs), "comet_model": comet_name,
        "comet_python": str(args.comet_python) if comet_name and args.comet_python else None, "comet_scale": 100, "bootstrap": {"samples": metrics.BOOTSTRAP_SAMPLES, "seed": metrics.BOOTSTRAP_SEED,
                                          "significance_level": SIGNIFICANCE_LEVEL},
        "directions": results,
        "average": {key: mean(key) for key in ("bleu", "comet", "chrf", "teacher_bleu", "off_target_rate")},
    }
    write_text(args.out, json.dumps(output, indent=2, ensure_ascii=False) + "\n")
    print(f"{args.out}: {name}, average BLEU {output['average']['bleu']:.2f}")
    return output


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def direction_key(direction):
    """The paper's order: xx->en, then en->xx, De and Cs first, then the other languages by code."""
    src, tgt = direction.split("-")
    group, other = (0, src) if tgt == "en" else (1, tgt) if src == "en" else (2, direction)
    rank = PAPER_LANGUAGES.index(other) if other in PAPER_LANGUAGES else len(PAPER_LANGUAGES)
    return group, rank, other


def ordered_directions(found):
    return sorted(found, key=direction_key)


def ordered_results(results):
    """Rows in the order of kd/systems.py (the paper's: teacher, student SFT, forward, reverse, noevo,
    skew, selfevo, with the other known systems between and after them); unknown systems follow in the
    order given (sorted is stable)."""
    return sorted(results, key=lambda r: order_key(r["system"]))


def format_number(value, mark=""):
    return "–" if value is None else f"{value:.2f}{mark}"


def format_delta(value, base):
    return "–" if value is None or base is None else f"{value - base:+.2f}"


def make_table(results, baseline=None, compare=None):
    """Markdown table of results dicts: rows in the paper's order, Δ = compare (default selfevo,
    else the last row) minus the baseline."""
    results = ordered_results(results)
    names = [r["system"] for r in results]
    if baseline is not None and baseline not in names:
        raise InputError(f"--baseline {baseline}: no results for this system (systems: {', '.join(names)})")
    if compare is not None and compare not in names:
        raise InputError(f"--compare {compare}: no results for this system (systems: {', '.join(names)})")
    directions = ordered_directions({d for r in results for d in r["directions"]})
    with_comet = any(scores.get("comet") is not None for r in results for scores in r["directions"].values())
    shown = ("bleu", "comet") if with_comet else ("bleu",)
    labels = {"bleu": "BLEU", "comet": "COMET"}
    header = (["System"] + [f"{d} {labels[m]}" for d in directions for m in shown]
              + [f"Avg. {labels[m]}" for m in shown])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def cells(result):
        row = [result["system"]]
        for direction in directions:
            scores = result["directions"].get(direction)
            if scores is None:
                row += ["–"] * len(shown)
                continue
            tested = baseline is not None and scores.get("baseline") == baseline and result["system"] != baseline
            for metric in shown:
                row.append(format_number(scores.get(metric), "†" if tested and scores.get(f"{metric}_significant") else ""))
        row += [format_number(result["average"].get(metric)) for metric in shown]
        return row

    for result in results:
        lines.append("| " + " | ".join(cells(result)) + " |")
    if baseline is not None:
        others = [r for r in results if r["system"] != baseline]
        if others:
            top_name = compare or (PAPER_METHOD if PAPER_METHOD in names and PAPER_METHOD != baseline else others[-1]["system"])
            top = next(r for r in results if r["system"] == top_name)
            base = next(r for r in results if r["system"] == baseline)
            row = [f"Δ ({top['system']} − {baseline})"]
            for direction in directions:
                for metric in shown:
                    mine = top["directions"].get(direction, {}).get(metric)
                    theirs = base["directions"].get(direction, {}).get(metric)
                    row.append(format_delta(mine, theirs))
            for metric in shown:
                row.append(format_delta(top["average"].get(metric), base["average"].get(metric)))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        footer = (f"† p < {SIGNIFICANCE_LEVEL} against {baseline} (paired bootstrap resampling, "
                  "1000 resamples).")
        if with_comet:
            models = sorted({Path(r["comet_model"]).name for r in results if r.get("comet_model")})
            footer += f" COMET: {', '.join(models) or 'COMET'} x 100."
        lines.append(footer)
    return "\n".join(lines) + "\n"


def table(argv):
    parser = argparse.ArgumentParser(prog="evaluate.py table", description="Markdown table of results JSON files, "
                                     "rows in the paper's order (teacher, student_sft, forward, reverse, noevo, skew, "
                                     "selfevo, then the others in the order given).")
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files of evaluate.py")
    parser.add_argument("--baseline", help="system name the † and the Δ row refer to")
    parser.add_argument("--compare", "--delta", dest="compare",
                        help="system of the Δ row (default: selfevo, the paper's method; else the last row)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        result = read_json(path, todo="run evaluate.py first")
        if not isinstance(result, dict) or not {"system", "directions", "average"} <= set(result):
            fail(str(path), "not a results file of evaluate.py (no system/directions/average)", "pass results files written by evaluate.py")
        results.append(result)
    names = [r["system"] for r in results]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        fail("results", f"system {duplicates[0]!r} appears twice", "pass each system once (or rename with --system)")
    try:
        text = make_table(results, args.baseline, args.compare)
    except InputError as error:
        raise SystemExit(f"evaluate.py table: {error}") from None
    sys.stdout.write(text)
    if args.out:
        write_text(args.out, text)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "table":
        return table(argv[1:])
    return evaluate(argv)


if __name__ == "__main__":
    main()
