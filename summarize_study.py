"""Summarise one regime of the study (pipelines/study.sh): every system over its seeds.

    python summarize_study.py --regime R1 --runs runs/study_R1 --hyps hyps/study_R1 \\
        --results results/study_R1 --refs data/study_R1/test --out study/R1

Reads the runs named <system>-s<seed> (train_kd.py output folders), their hypotheses and
evaluate.py results, and the teacher's (`teacher`). Writes, complete or not at all:
  OUT/summary.json   per system: seeds, mean ± std over seeds of BLEU and chrF per direction and
                     averaged, BLEU against the teacher's outputs (the paper's Fig. 4), best
                     validation loss and the epoch it was reached, epochs trained, hard fraction and
                     mean difficulty at the start and end of training, significance against the
                     baseline (forward KD)
  OUT/table.md       the same as a Markdown table
  OUT/curves.png     validation loss, hard fraction and mean difficulty against the epoch (mean
                     over seeds)

Significance against the baseline: paired bootstrap resampling over test sentences (Koehn 2004),
1000 samples, seed 12345. In each sample the same sentence indices are drawn for both systems and
for every seed; the statistic is the difference of the seed-averaged corpus BLEU (per direction,
and averaged over the directions for "avg"). p is two-sided: twice the share of samples on the
other side of zero than the observed difference (at most 1). With 3 seeds the seed-to-seed spread
is reported next to it (mean ± std, and in how many seeds the system beats the baseline), since
the bootstrap measures the test-set sampling error only, not the training variance.
"""

import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: find kd/

from kd.io import OutputGroup, fail as io_fail, json_text, read_appended_jsonl, read_jsonl, read_json
from kd.systems import method_of, order_key

RUN_NAME = re.compile(r"^(?P<system>.+)-s(?P<seed>\d+)$")
DIRECTION_ORDER = ("de-en", "cs-en", "en-de", "en-cs")
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 1000, 12345

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", required=True, help="the regime's name (R0, R1, ...), written into the outputs")
    parser.add_argument("--runs", required=True, type=Path, help="folder of the train_kd.py runs <system>-s<seed>")
    parser.add_argument("--hyps", required=True, type=Path, help="folder of the hypotheses <system>-s<seed>/<dir>.jsonl")
    parser.add_argument("--results", required=True, type=Path, help="folder of evaluate.py's <system>-s<seed>.json")
    parser.add_argument("--refs", required=True, type=Path, help="the test folder the hypotheses were generated from")
    parser.add_argument("--out", required=True, type=Path, help="output folder (summary.json, table.md, curves.png)")
    parser.add_argument("--baseline", default="forward", help="the system every other is tested against")
    parser.add_argument("--settings", type=Path, help="a JSON file of the regime's settings, copied into summary.json")
    parser.add_argument("--checkpoint", default="best", help="which checkpoint the systems were evaluated with (a label)")
    parser.add_argument("--kd-checkpoint", choices=("best", "final"), default="best",
                        help="the checkpoint the KD systems were scored at (the SFT systems: best/); decides how "
                             "a seed that did not learn is recognised")
    return parser.parse_args(argv)


def fail(where, what, todo):
    io_fail(where, what, todo)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def read_metrics(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return [], []
    rows, _ = read_appended_jsonl(path, required=("type", "step"))
    return [r for r in rows if r["type"] == "train"], [r for r in rows if r["type"] == "valid"]


def did_not_learn(results, valid_rows, checkpoint):
    """Why a run's scored checkpoint is not a trained model, in words; None when it is. `checkpoint`:
    "best" (the best validation score by the run's --best-metric) or "final"."""
    metric = results.get("best_metric", "loss")
    key = f"valid_{metric}"
    scored = [row for row in valid_rows if row.get(key) is not None]
    if not scored:
        return None
    first = scored[0]
    if checkpoint == "best":
        if results["best_step"] == first["step"] and results["steps"] > first["step"]:
            return (f"kept the checkpoint of its first validation (step {first['step']}): no later validation "
                    f"{metric} of its {results['steps']} steps was better")
        return None
    final = scored[-1]
    worse = final[key] > first[key] if metric == "loss" else final[key] < first[key]
    if worse and final["step"] > first["step"]:
        return (f"its final validation {metric} ({final[key]:.2f}) is worse than at its first validation "
                f"({first[key]:.2f}, step {first['step']}): it unlearned")
    return None


def run_facts(run, checkpoint="best"):
    """What one training run says about itself: best validation loss and epoch, epochs, hard fraction,
    and whether the checkpoint scored (best/ or final/) is a trained model (did_not_learn)."""
    results = read_json(run / "all_results.json")
    train_rows, valid_rows = read_metrics(run)
    steps_per_epoch = results["steps"] / results["epochs"] if results["epochs"] else None
    facts = {"best_valid_loss": results["best_valid_loss"], "epochs_trained": results["epochs"],
             "best_epoch": (results["best_step"] / steps_per_epoch
                            if results["best_step"] is not None and steps_per_epoch else None),
             "stopped_early": results.get("stopped_early"),
             "did_not_learn": did_not_learn(results, valid_rows, checkpoint)}
    for key in ("hard_fraction", "mean_difficulty"):
        with_key = [r for r in train_rows if r.get(key) is not None]
        facts[f"{key}_start"] = with_key[0][key] if with_key else None
        facts[f"{key}_end"] = with_key[-1][key] if with_key else None
    return facts


def bleu_statistics(hyps_dir, refs_dir, directions):
    """{direction: [sentences, 10] int array of sacrebleu's sufficient statistics}, in reference order."""
    from kd import metrics

    out = {}
    for direction in directions:
        refs = read_jsonl(refs_dir / f"{direction}.jsonl", required=("id", "reference", "tgt_lang"))
        by_id = {row["id"]: row["hypothesis"] for row in read_jsonl(
            hyps_dir / f"{direction}.jsonl", required=("id", "hypothesis"),
            todo=f"translate the test set with this run (the pipeline's step 'generate {hyps_dir.name}', "
                 "generate.py; a re-run of the pipeline resumes it)")}
        missing = [row["id"] for row in refs if row["id"] not in by_id]
        if missing:
            fail(str(hyps_dir / f"{direction}.jsonl"), f"no hypothesis for {len(missing)} reference ids "
                 f"(first: {missing[0]})", "rerun the study's generate step of this system")
        bleu = metrics.bleu_metric(refs[0]["tgt_lang"])
        stats = bleu._extract_corpus_statistics([by_id[row["id"]] for row in refs], [[row["reference"] for row in refs]])
        out[direction] = (np.asarray(stats, dtype=np.int64), bleu)
    return out


def bootstrap_p(system_stats, baseline_stats, directions):
    """Two-sided paired-bootstrap p-values of seed-averaged BLEU(system) − BLEU(baseline), per
    direction and for the average over directions (see the module docstring)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    deltas = {}
    for direction in directions:
        n = system_stats[0][direction][0].shape[0]
        indices = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))

        def seed_mean(per_seed):
            observed, samples = [], []
            for stats in per_seed:
                array, bleu = stats[direction]
                observed.append(bleu._compute_score_from_stats(list(array.sum(0))).score)
                sums = array[indices].sum(1)
                samples.append([bleu._compute_score_from_stats(list(row)).score for row in sums])
            return float(np.mean(observed)), np.mean(np.asarray(samples), axis=0)

        sys_obs, sys_samples = seed_mean(system_stats)
        base_obs, base_samples = seed_mean(baseline_stats)
        deltas[direction] = (sys_obs - base_obs, sys_samples - base_samples)
    deltas["avg"] = (float(np.mean([deltas[d][0] for d in directions])),
                     np.mean([deltas[d][1] for d in directions], axis=0))
    out = {}
    for key, (observed, samples) in deltas.items():
        other_side = np.mean(samples <= 0) if observed > 0 else np.mean(samples >= 0)
        out[key] = {"delta": observed, "p_value": float(min(1.0, 2 * other_side)) if observed != 0 else 1.0}
    return out


def not_a_result(entry):
    """The words of a table row that must show no number: a seed missing, or seeds that did not learn."""
    if entry.get("incomplete"):
        return "incomplete: " + "; ".join(f"seed {seed}: {why}" for seed, why in sorted(entry["incomplete"].items()))
    failed = entry.get("did_not_learn") or {}
    if failed:
        seed, why = sorted(failed.items())[0]
        return f"did not learn in {len(failed)}/{len(entry['seeds'])} seeds (seed {seed}: {why})"
    return None


def runs_seeds(system_runs):
    return [seed for seed, _ in system_runs]


def fmt(entry, digits=2):
    if entry is None:
        return "–"
    if entry["n"] == 1:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def stuck_at_first_epoch(entry):
    """Seeds stopped by early stopping whose best validation loss is their first epoch's."""
    best = (entry.get("best_epoch") or {}).get("values") or []
    return sum(stopped is True and epoch is not None and epoch <= 1.0
               for stopped, epoch in zip(entry["stopped_early"], best))


def make_table(summary):
    directions = summary["directions"]
    baseline = summary["baseline"]
    head = (["system", "seeds"] + [f"{d} BLEU" for d in directions]
            + ["avg BLEU", "avg chrF", "BLEU vs teacher", f"Δ avg BLEU vs {baseline} (p)", "wins",
               "best valid loss", "best epoch", "epochs", "hard frac. start → end"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    teacher = summary.get("teacher")
    if teacher:
        cells = (["teacher", "1"] + [f"{teacher['bleu'][d]:.2f}" for d in directions]
                 + [f"{teacher['bleu']['avg']:.2f}", f"{teacher['chrf']['avg']:.2f}", "–", "–", "–",
                    "–" if teacher.get("best_valid_loss") is None else f"{teacher['best_valid_loss']:.4f}",
                    "–" if teacher.get("best_epoch") is None else f"{teacher['best_epoch']:.1f}",
                    "–" if teacher.get("epochs_trained") is None else f"{teacher['epochs_trained']:.1f}", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    for name, entry in summary["systems"].items():
        words = not_a_result(entry)
        if words:  # no number that looks like a result: the row says what happened, summary.json has the rest
            cells = [name, str(len(entry["seeds"]))] + ["–"] * len(directions) + [words] + ["–"] * (len(head) - 3 - len(directions))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        test = entry.get("significance")
        delta = "–" if not test else f"{test['avg']['delta']:+.2f} (p={test['avg']['p_value']:.3f})"
        wins = "–" if entry.get("seeds_beating_baseline") is None else \
            f"{entry['seeds_beating_baseline']}/{len(entry['seeds'])}"
        start, end = entry.get("hard_fraction_start"), entry.get("hard_fraction_end")
        hard = "–" if start is None else f"{start['mean']:.2f} → {end['mean']:.2f}"
        epochs = fmt(entry.get("epochs_trained"), 1)
        at_cap = sum(stopped is False for stopped in entry["stopped_early"])
        if at_cap:  # ran to --epochs without early stopping: possibly not converged
            epochs += f" ({at_cap}/{len(entry['seeds'])} at the cap)"
        stuck = stuck_at_first_epoch(entry)
        if stuck:  # stopped early without ever beating its first epoch: kept an almost untrained model
            epochs += f" ({stuck}/{len(entry['seeds'])} best at epoch 1)"
        cells = ([name, str(len(entry["seeds"]))] + [fmt(entry["bleu"].get(d)) for d in directions]
                 + [fmt(entry["bleu"]["avg"]), fmt(entry["chrf"]["avg"]), fmt(entry.get("teacher_bleu")), delta, wins,
                    fmt(entry.get("best_valid_loss"), 4), fmt(entry.get("best_epoch"), 1), epochs, hard])
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nRegime {summary['regime']}: mean ± std over seeds; systems evaluated with their "
            f"`{summary['checkpoint']}` checkpoint. Δ and p: paired bootstrap over test sentences of the "
            f"seed-averaged BLEU against {baseline} (two-sided, {BOOTSTRAP_SAMPLES} samples); wins: seeds in "
            f"which the system's average BLEU beats {baseline}'s of the same seed; 'at the cap': seeds that ran "
            f"to the epoch limit without stopping early (their validation loss was still improving within "
            f"the patience: not shown to have converged); 'best at epoch 1': seeds stopped by early stopping "
            f"whose validation loss never went below its first epoch's (they keep an almost untrained model: "
            f"stopped, not converged). A system with a seed that did not learn (its scored checkpoint is its first "
            f"validation's, or its final one scores worse than its first validation) or with a seed missing is "
            f"shown in words, without numbers (summary.json keeps them).\n")
    return "\n".join(lines) + "\n" + note


def plot_curves(summary_runs, regime):
    """The curves figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("valid", "valid_loss", "validation loss (student CE)"),
              ("train", "hard_fraction", "hard-token fraction (d > Γ)"),
              ("train", "mean_difficulty", "mean difficulty d = KL(ỹ‖q)")]
    for axis, (kind, key, title) in zip(axes, panels):
        drawn = False
        for system, runs in summary_runs.items():
            curves = []
            for run in runs:
                train_rows, valid_rows = read_metrics(run)
                rows = valid_rows if kind == "valid" else train_rows
                points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    curves.append(points)
            if not curves or (key == "hard_fraction" and system in ("student_sft", "forward", "reverse", "noevo")):
                continue
            if key == "hard_fraction" and all(abs(v - 1.0) < 1e-12 for c in curves for _, v in c):
                continue  # skew: every token takes the skewed branch
            length = min(len(c) for c in curves)
            epochs = [curves[0][i][0] for i in range(length)]
            values = np.mean([[c[i][1] for i in range(length)] for c in curves], axis=0)
            axis.plot(epochs, values, label=system)
            drawn = True
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if drawn:
            axis.legend(fontsize=7)
    fig.suptitle(f"Regime {regime}: mean over seeds")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def main(argv=None):
    args = parse_args(argv)
    for name in ("runs", "hyps", "results", "refs"):
        if not getattr(args, name).is_dir():
            fail(f"--{name} {getattr(args, name)}", "no such folder", "run the study's steps first")
    runs = {}
    for run in sorted(args.runs.iterdir()):
        match = RUN_NAME.match(run.name)
        if match and run.is_dir():  # an incomplete run is reported as such (never silently left out)
            runs.setdefault(match["system"], []).append((int(match["seed"]), run))
    if not any((run / "COMPLETED").is_file() for system_runs in runs.values() for _, run in system_runs):
        fail(f"--runs {args.runs}", "no completed <system>-s<seed> run", "run the study's training steps first")
    systems = sorted(runs, key=lambda s: (*order_key(s), s))  # kd/systems.py's order
    directions = [d for d in DIRECTION_ORDER if (args.refs / f"{d}.jsonl").is_file()] + sorted(
        p.stem for p in args.refs.glob("*.jsonl") if p.stem not in DIRECTION_ORDER)

    per_seed_stats = {}
    summary = {"regime": args.regime, "baseline": args.baseline, "checkpoint": args.checkpoint,
               "directions": directions, "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED},
               "settings": read_json(args.settings, "--settings") if args.settings else None, "systems": {}}
    teacher_result = args.results / "teacher.json"
    if teacher_result.is_file():
        teacher = read_json(teacher_result)
        summary["teacher"] = {"bleu": {**{d: teacher["directions"][d]["bleu"] for d in directions},
                                       "avg": teacher["average"]["bleu"]},
                              "chrf": {"avg": teacher["average"]["chrf"]}}
        teacher_run = args.runs / "teacher"
        if (teacher_run / "all_results.json").is_file():
            summary["teacher"].update(run_facts(teacher_run))
    for system in systems:
        method = method_of(system) or system
        checkpoint = "best" if method == "sft" else args.kd_checkpoint
        seeds, results, facts, incomplete = [], [], [], {}
        for seed, run in sorted(runs[system]):
            result_file = args.results / f"{run.name}.json"
            if not (run / "COMPLETED").is_file():
                incomplete[seed] = f"{run.name} has no COMPLETED (its training did not finish)"
            elif not result_file.is_file():
                incomplete[seed] = f"{result_file.name} is missing (its generate and evaluate steps did not run)"
            if seed in incomplete:
                continue
            seeds.append(seed)
            results.append(read_json(result_file))
            facts.append(run_facts(run, checkpoint))
            per_seed_stats[(system, seed)] = bleu_statistics(args.hyps / run.name, args.refs, directions)
        if incomplete:  # never a mean over fewer seeds than the system ran: the cell says what is missing
            summary["systems"][system] = {"seeds": sorted(runs_seeds(runs[system])), "incomplete": incomplete}
            continue
        entry = {"seeds": seeds, "checkpoint": checkpoint,
                 "bleu": {d: mean_std([r["directions"][d]["bleu"] for r in results]) for d in directions},
                 "chrf": {d: mean_std([r["directions"][d]["chrf"] for r in results]) for d in directions},
                 "teacher_bleu": mean_std([r["average"].get("teacher_bleu") for r in results]),
                 "off_target_rate": mean_std([r["average"].get("off_target_rate") for r in results])}
        entry["bleu"]["avg"] = mean_std([r["average"]["bleu"] for r in results])
        entry["chrf"]["avg"] = mean_std([r["average"]["chrf"] for r in results])
        for key in facts[0]:
            if key not in ("stopped_early", "did_not_learn"):
                entry[key] = mean_std([f[key] for f in facts])
        entry["stopped_early"] = [f["stopped_early"] for f in facts]
        entry["did_not_learn"] = {seed: f["did_not_learn"] for seed, f in zip(seeds, facts) if f["did_not_learn"]}
        entry["_results"] = {seed: r["average"]["bleu"] for seed, r in zip(seeds, results)}
        summary["systems"][system] = entry

    # significance against the baseline, over the seeds both have (not for a system that did not learn)
    avg_by_seed = {system: entry.pop("_results", {}) for system, entry in summary["systems"].items()}
    baseline = summary["systems"].get(args.baseline, {})
    if args.baseline in summary["systems"] and "incomplete" not in baseline and not baseline.get("did_not_learn"):
        for system, entry in summary["systems"].items():
            shared = [s for s in entry["seeds"] if s in avg_by_seed[args.baseline]]
            if system == args.baseline or not shared or "incomplete" in entry or entry.get("did_not_learn"):
                continue
            entry["significance"] = bootstrap_p([per_seed_stats[(system, s)] for s in shared],
                                                [per_seed_stats[(args.baseline, s)] for s in shared], directions)
            entry["seeds_beating_baseline"] = sum(avg_by_seed[system][s] > avg_by_seed[args.baseline][s] for s in shared)

    # the three outputs appear together or not at all (kd.io.OutputGroup)
    table = make_table(summary)
    png = plot_curves({s: [run for _, run in sorted(runs[s]) if (run / "COMPLETED").is_file()] for s in systems},
                      args.regime)
    with OutputGroup() as outputs:
        outputs.write_text(args.out / "summary.json", json_text(summary))
        outputs.write_text(args.out / "table.md", table)
        outputs.write_bytes(args.out / "curves.png", png)
    print(table)
    print(f"wrote {args.out}/summary.json, table.md, curves.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
