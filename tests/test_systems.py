"""kd/systems.py, the one table of systems: every system trains with train_kd.py's own command line,
the sweep points and LoRA variants resolve, bad names and missing settings stop in words, and the
scripts order their tables by it."""

import subprocess
import sys
from pathlib import Path

import pytest

from kd import systems
from kd.methods import HYPERPARAMETERS, METHODS

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"KD_RATIO": "0.5", "TARGET_MIX": "0.5", "BETA": "0.5", "GAMMA": "0.4", "TOP_K": "0.3",
            "SKEW_BETA": "0.9", "JSD_BETA": "0.5", "ON_POLICY_RATIO": "0.5", "MAX_NEW_TOKENS": "16", "LORA_R": "8",
            "LORA_ALPHA": "16"}


def test_settings_are_the_ones_the_flags_read():
    assert set(systems.SETTINGS) == set(SETTINGS)


@pytest.mark.parametrize("name", [*systems.ORDER, "selfevo_beta0.9", "selfevo_gamma1.0", "selfevo_topk0.1",
                                  "selfevo_beta0.5-0.0", "skew_teacher_lambda0.3", "forward_lora", "seqkd_lora",
                                  "selfevo_gamma0.1_lora"])
def test_every_system_is_a_valid_train_kd_command_line(name):
    import train_kd

    method, *flags = systems.spec(name, SETTINGS)
    assert method in METHODS and method == systems.method_of(name)
    args = train_kd.parse_args(["--method", method, *flags, "--student", "s", "--train-file", "t", "--output-dir", "o"])
    assert args.method == method
    for hyperparameter in HYPERPARAMETERS:  # each flag the system sets reached its argument
        flag = "--" + hyperparameter.replace("_", "-")
        if flag in flags:
            value = flags[flags.index(flag) + 1]
            assert str(getattr(args, hyperparameter)) == str(value if value == "auto" else float(value))


def test_sweep_points_and_variants_set_their_flag():
    assert systems.spec("selfevo_gamma1.0", SETTINGS) == ["selfevo", "--target-mix", "0.5", "--beta", "0.5",
                                                          "--gamma", "1.0"]
    assert systems.spec("selfevo_beta0.5-0.0", SETTINGS) == ["selfevo", "--target-mix", "0.5", "--beta", "0.5",
                                                             "--gamma", "0.4", "--beta-end", "0.0"]
    assert systems.spec("selfevo_topk0.1", SETTINGS)[-2:] == ["--top-k", "0.1"]
    assert systems.spec("skew_teacher_lambda0.3", SETTINGS) == ["skew_teacher", "--kd-ratio", "0.3", "--skew-beta",
                                                                "0.9"]
    assert systems.spec("forward_lora", SETTINGS) == ["forward", "--kd-ratio", "0.5", "--lora-r", "8",
                                                      "--lora-alpha", "16"]
    assert systems.spec("selfevo_gammaauto", SETTINGS)[-2:] == ["--gamma", "auto"]   # a system, not a sweep point
    assert systems.TABLE1_KD == ("forward", "reverse", "noevo", "skew", "selfevo")


def test_unknown_systems_and_missing_settings_are_refused_in_words():
    with pytest.raises(ValueError, match="system selfevo_typo: unknown; known: teacher, .*selfevo_beta0.9"):
        systems.spec("selfevo_typo", SETTINGS)
    with pytest.raises(ValueError, match="system jsd: needs the pipeline setting JSD_BETA, which is not set"):
        systems.spec("jsd", {k: v for k, v in SETTINGS.items() if k != "JSD_BETA"})
    done = subprocess.run([sys.executable, "kd/systems.py", "spec", "nope"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 1 and done.stderr.startswith("kd/systems.py: system nope: unknown")
    done = subprocess.run([sys.executable, "kd/systems.py", "spec", "forward"], capture_output=True, text=True,
                          cwd=REPO, env={**SETTINGS, "PATH": ""})
    assert done.returncode == 0 and done.stdout == "forward --kd-ratio 0.5\n"


def test_the_scripts_order_rows_by_the_table():
    import evaluate
    import plot_results

    names = ["my_variant", "selfevo_gamma0.1", "selfevo", "seqkd", "forward", "student", "teacher"]
    ordered = sorted(names, key=systems.order_key)
    assert ordered == ["teacher", "student", "seqkd", "forward", "selfevo", "selfevo_gamma0.1", "my_variant"]
    assert [r["system"] for r in evaluate.ordered_results([{"system": n} for n in names])] == ordered
    assert sorted(names, key=plot_results.paper_sort_key) == ordered
    assert plot_results.run_method(Path("/nonexistent/selfevo_beta0.3-s2")) == "selfevo"  # no config.json: by name
