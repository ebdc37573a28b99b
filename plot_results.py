"""PNG figures of the paper from evaluate.py's results JSON and train_kd.py's metrics.jsonl files.

    # the quickstart's figures: training curves of every run, teacher similarity (Fig. 4)
    python plot_results.py --runs runs/quickstart --results results/quickstart --out figures/quickstart

    # one figure only
    python plot_results.py --results results/fig2 --out figures/fig2 --which fig2
    python plot_results.py --runs runs/table1/selfevo runs/table1/skew --out figures/x --which curves

Figures (each skipped with a message when its inputs are absent; --which picks some):
    curves.png  training loss, validation loss and hard-token fraction over steps, one line per run
                (the paper's argument: the share of hard tokens falls as the student learns), and the
                threshold Γ of the runs with --gamma auto
    fig2.png    selfevo on the validation set against Gamma, against top-K, against beta
                (systems named selfevo_gamma<G>, selfevo_topk<K>, selfevo_beta<B>)
    fig3.png    progressive beta against static beta (systems selfevo_beta<START>-<END> and
                selfevo_beta<B>)
    fig4.png    teacher similarity: BLEU of each system against the teacher's hypotheses
                (the results' "teacher_bleu"; the system named teacher is left out)
    fig5.png    skew_teacher against lambda (systems skew_teacher_lambda<L>), with the other
                systems of the same results as horizontal reference lines
--runs takes run folders (with metrics.jsonl) or folders of them; --results takes results JSON
files or folders of them. Scores are the average over the directions; COMET is shown next to
BLEU when the results have it. Every PNG is written atomically (temporary file, then rename).
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from kd.io import replacing  # noqa: E402
from kd.systems import SYSTEMS, method_of, order_key  # noqa: E402

FIGURES = ("curves", "fig2", "fig3", "fig4", "fig5")
SWEEPS = {  # fig2 panel: (system-name pattern, x-axis label)
    "gamma": (re.compile(r"^selfevo_gamma(?P<x>[0-9.]+)$"), "threshold Γ"),
    "topk": (re.compile(r"^selfevo_topk(?P<x>[0-9.]+)$"), "top-K fraction of hard tokens"),
    "beta": (re.compile(r"^selfevo_beta(?P<x>[0-9.]+)$"), "β (student share of q̂)"),
}
PROGRESSIVE = re.compile(r"^selfevo_beta(?P<start>[0-9.]+)(?:-(?P<end>[0-9.]+))?$")
LAMBDA = re.compile(r"^skew_teacher_lambda(?P<x>[0-9.]+)$")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", nargs="*", default=[], type=Path,
                        help="run folders (with metrics.jsonl) or folders holding them")
    parser.add_argument("--results", nargs="*", default=[], type=Path,
                        help="results JSON files of evaluate.py or folders holding them")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG files")
    parser.add_argument("--which", default=",".join(FIGURES),
                        help=f"comma-separated subset of {','.join(FIGURES)} (default: all)")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    args.which = [name.strip() for name in args.which.split(",") if name.strip()]
    unknown = sorted(set(args.which) - set(FIGURES))
    if unknown:
        parser.error(f"--which: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    return args


# ---------------------------------------------------------------------------------------------
# Reading the inputs
# ---------------------------------------------------------------------------------------------

def read_results(paths):
    """{system: results dict} from results JSON files and folders of them (other files ignored)."""
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            print(f"plot_results.py: --results {path}: not found, ignored", file=sys.stderr)
    results = {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            print(f"plot_results.py: {file}: unreadable ({error}), ignored", file=sys.stderr)
            continue
        if isinstance(data, dict) and "average" in data:
            results[data.get("system") or file.stem] = data
    return results


def read_metrics(paths):
    """{run name: {"train": [rows], "valid": [rows]}} from run folders and folders of them."""
    run_dirs = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            run_dirs.append(path)
        elif path.is_dir():
            run_dirs.extend(sorted(p.parent for p in path.glob("*/metrics.jsonl")))
        else:
            print(f"plot_results.py: --runs {path}: not found, ignored", file=sys.stderr)
    runs = {}
    for run_dir in run_dirs:
        rows = {"train": [], "valid": []}
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed run
                if isinstance(row, dict) and row.get("type") in rows and "step" in row:
                    rows[row["type"]].append(row)
        if rows["train"] or rows["valid"]:
            rows["method"] = run_method(run_dir)
            runs[run_dir.name] = rows
    return runs


def run_method(run_dir):
    """The run's --method (its config.json, written by train_kd.py), else guessed from its name."""
    try:
        method = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("method")
    except (OSError, json.JSONDecodeError, AttributeError):
        method = None
    if method:
        return method
    name = re.sub(r"-s\d+$", "", run_dir.name)  # a study run: <system>-s<seed>
    return method_of(name) or name


def score(result, metric):
    """The average `metric` of a results dict, or None when absent."""
    value = (result.get("average") or {}).get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def metrics_present(results, metrics=("bleu", "comet")):
    """The metrics that at least one of the results has."""
    return [m for m in metrics if any(score(r, m) is not None for r in results)]


def paper_sort_key(name):
    """The order of kd/systems.py (the paper's systems first), then by name."""
    return (*order_key(name), name)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def save(fig, path, dpi):
    """Write the figure as PNG all-or-nothing (kd.io.replacing: a temporary file, then a rename)."""
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------

def plot_curves(runs, results, out, dpi):
    if not runs:
        return "no metrics.jsonl in --runs"
    # (rows, key, title, methods the quantity means something for: None = every method)
    panels = [("train", "loss", "training loss", None),
              ("valid", "valid_loss", "validation loss (student CE)", None),
              ("train", "hard_fraction", "hard-token fraction (selfevo)", {"selfevo"}),
              ("train", "mean_difficulty", "mean difficulty d = KL(ỹ‖q)", {"noevo", "skew", "selfevo"}),
              ("train", "gamma", "threshold Γ (--gamma auto)", None)]  # only runs with --gamma auto log it

    def series(name, kind, key, methods):
        if methods is not None and runs[name]["method"] not in methods:
            return []
        return [(row["step"], row[key]) for row in runs[name][kind] if row.get(key) is not None]

    panels = [p for p in panels if any(series(name, *p[:2], p[3]) for name in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    names = sorted(runs, key=paper_sort_key)
    for ax, (kind, key, title, methods) in zip(axes[0], panels):
        for index, name in enumerate(names):
            points = series(name, kind, key, methods)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, color=f"C{index % 10}", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8), fontsize=8,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Training curves", y=1.02)
    return save(fig, out / "curves.png", dpi)


def plot_fig2(runs, results, out, dpi):
    sweeps = {}
    for name, (pattern, label) in SWEEPS.items():
        points = sorted((float(m["x"]), r) for s, r in results.items() if (m := pattern.match(s)))
        if points:
            sweeps[name] = (label, points)
    if not sweeps:
        return "no selfevo_gamma*/selfevo_topk*/selfevo_beta* results"
    metrics = metrics_present([r for _, points in sweeps.values() for _, r in points])
    fig, axes = plt.subplots(len(metrics), len(sweeps), figsize=(4.5 * len(sweeps), 3.4 * len(metrics)),
                             squeeze=False)
    for col, (label, points) in enumerate(sweeps.values()):
        for row, metric in enumerate(metrics):
            xy = [(x, score(r, metric)) for x, r in points if score(r, metric) is not None]
            ax = axes[row][col]
            if xy:
                ax.plot(*zip(*xy), marker="o")
            ax.set_xlabel(label)
            ax.set_ylabel(f"average {metric.upper()}")
            ax.grid(alpha=0.3)
    fig.suptitle("Self-evolution KD: hyperparameter sweeps (validation set)")
    return save(fig, out / "fig2.png", dpi)


def plot_fig3(runs, results, out, dpi):
    schedules = []
    for name, result in results.items():
        match = PROGRESSIVE.match(name)
        if match:
            start = float(match["start"])
            end = float(match["end"]) if match["end"] is not None else start
            schedules.append((start != end, start, end, result))
    if not any(progressive for progressive, *_ in schedules):
        return "no progressive-β results (selfevo_beta<START>-<END>)"
    schedules.sort(key=lambda s: (s[0], -s[1], -s[2]))
    labels = [f"β {s:g}→{e:g}" if p else f"β {s:g} (static)" for p, s, e, _ in schedules]
    metrics = metrics_present([r for *_, r in schedules])
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5, 1.3 * len(labels)) * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [score(r, metric) or 0.0 for *_, r in schedules]
        colors = ["tab:orange" if p else "tab:gray" for p, *_ in schedules]
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right")
        ax.set_ylabel(f"average {metric.upper()}")
        low = min(values)
        ax.set_ylim(max(0.0, low - 0.1 * (max(values) - low + 1)), max(values) * 1.05 + 0.1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Progressive β against static β")
    return save(fig, out / "fig3.png", dpi)


def plot_fig4(runs, results, out, dpi):
    systems = sorted((s for s, r in results.items() if s != "teacher" and score(r, "teacher_bleu") is not None),
                     key=paper_sort_key)
    if not systems:
        return "no results with teacher_bleu (evaluate.py --teacher-hyps)"
    values = [score(results[s], "teacher_bleu") for s in systems]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(systems)), 3.8))
    bars = ax.bar(range(len(systems)), values, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
    ax.set_ylabel("BLEU against the teacher's output")
    ax.set_title("Teacher similarity (Fig. 4)")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out / "fig4.png", dpi)


def plot_fig5(runs, results, out, dpi):
    points = sorted((float(m["x"]), r) for s, r in results.items() if (m := LAMBDA.match(s)))
    if not points:
        return "no skew_teacher_lambda* results"
    references = {s: r for s, r in results.items() if not LAMBDA.match(s) and s in SYSTEMS}
    metrics = metrics_present([r for _, r in points])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        xy = [(x, score(r, metric)) for x, r in points if score(r, metric) is not None]
        ax.plot(*zip(*xy), marker="o", color="black", label="skew_teacher")
        for index, (system, result) in enumerate(sorted(references.items(), key=lambda i: paper_sort_key(i[0]))):
            value = score(result, metric)
            if value is not None:
                ax.axhline(value, linestyle="--", color=f"C{index}", label=system)
        ax.set_xlabel("λ (weight of the KD term)")
        ax.set_ylabel(f"average {metric.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Skewing the teacher (Eq. 10) against λ")
    return save(fig, out / "fig5.png", dpi)


PLOTTERS = {"curves": plot_curves, "fig2": plot_fig2, "fig3": plot_fig3, "fig4": plot_fig4, "fig5": plot_fig5}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = read_metrics(args.runs)
    results = read_results(args.results)
    print(f"read {len(runs)} run(s) with metrics, {len(results)} result file(s)")
    written = {}
    for name in args.which:
        outcome = PLOTTERS[name](runs, results, args.out, args.dpi)
        if isinstance(outcome, Path):
            written[name] = outcome
        else:
            print(f"skipped {name}: {outcome}")
    return written


if __name__ == "__main__":
    main()
