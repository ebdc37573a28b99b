"""The systems of the pipelines and tables, defined once: a system's name, its train_kd.py method
and flags, and its place in every table (the order of SYSTEMS below).

A system is what a row of a table shows: the teacher, the student SFT baseline, sequence-level KD,
each distillation method at its settings. The bash pipelines ask this file for a system's method
and flags, the Python scripts (evaluate.py, summarize_study.py, plot_results.py) for the order:

    python kd/systems.py spec selfevo          # -> selfevo --target-mix 0.5 --beta 0.5 --gamma 0.4
    python kd/systems.py spec selfevo_gamma1.0 # a sweep point: selfevo with --gamma 1.0
    python kd/systems.py spec forward_lora     # any system with a LoRA student
    python kd/systems.py list table1           # the distillation rows of the paper's Table 1
    python kd/systems.py settings              # the pipeline settings the systems read

A flag value "$NAME" is the pipeline's setting NAME, read from the environment (pipelines/paper.sh
sets the paper's values: KD_RATIO=0.5, ...); a system whose setting is not set is an error naming
it. Adding a system to the study or a table is one line in SYSTEMS. This module imports nothing
heavy (no torch): the pipelines call it once per system.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class System:
    name: str
    method: str                 # train_kd.py --method
    flags: tuple = ()           # train_kd.py flags; "$NAME": the pipeline setting NAME
    table1: bool = False        # a distillation row of the paper's Table 1 (pipelines/table1.sh)
    note: str = ""              # what it is, where the name alone does not say


_MIX = ("--target-mix", "$TARGET_MIX")
SYSTEMS = {system.name: system for system in (
    System("teacher", "sft", note="the SFT teacher"),
    System("teacher_sft", "sft", note="the SFT teacher (the run's name in the Table 1 pipeline)"),
    System("student_sft", "sft", note="the student SFT baseline"),
    System("seqkd", "sft", note="sequence-level KD: SFT on the teacher's translations of the training set"),
    System("forward", "forward", ("--kd-ratio", "$KD_RATIO"), table1=True),
    System("reverse", "reverse", ("--kd-ratio", "$KD_RATIO"), table1=True),
    System("noevo", "noevo", _MIX, table1=True),
    System("skew", "skew", (*_MIX, "--beta", "$BETA"), table1=True),
    System("selfevo", "selfevo", (*_MIX, "--beta", "$BETA", "--gamma", "$GAMMA"), table1=True),
    System("selfevo_topk", "selfevo", (*_MIX, "--beta", "$BETA", "--top-k", "$TOP_K")),
    System("selfevo_token", "selfevo_token", (*_MIX, "--beta", "$BETA", "--gamma", "$GAMMA"),
           note="NOT the paper: hard tokens learn toward the detached mixture"),
    System("selfevo_gammaauto", "selfevo", (*_MIX, "--beta", "$BETA", "--gamma", "auto"),
           note="Γ without tuning (kd/gamma.py)"),
    System("skew_teacher", "skew_teacher", ("--kd-ratio", "$KD_RATIO", "--skew-beta", "$SKEW_BETA")),
    System("jsd", "jsd", ("--jsd-beta", "$JSD_BETA"), note="GKD's generalized JSD"),
    System("jsd_onpolicy", "jsd", ("--jsd-beta", "$JSD_BETA", "--on-policy-ratio", "$ON_POLICY_RATIO",
                                   "--on-policy-max-new-tokens", "$MAX_NEW_TOKENS"),
           note="GKD: a share of the batches on the student's own samples"),
    System("atkd", "atkd", note="ATKD: median split by the teacher's uncertainty (defaults of kd/methods.py)"),
    System("akl", "akl", ("--kd-ratio", "$KD_RATIO"), note="AKL: forward and reverse KL mixed per token"),
    System("taid", "taid", note="TAID: toward a moving interpolation of student and teacher (kd/taid.py)"),
    System("tvd", "tvd", ("--kd-ratio", "$KD_RATIO"), note="total variation distance"),
)}

# Sweep points: NAME<value> is a system of the table with one flag set to the value (Fig. 2, 3, 5).
SWEEPS = (
    (re.compile(r"^selfevo_beta(?P<start>[0-9.]+)-(?P<end>[0-9.]+)$"), "selfevo",   # Fig. 3: progressive β
     {"--beta": "start", "--beta-end": "end"}),
    (re.compile(r"^selfevo_beta(?P<x>[0-9.]+)$"), "selfevo", {"--beta": "x"}),
    (re.compile(r"^selfevo_gamma(?P<x>[0-9.]+)$"), "selfevo", {"--gamma": "x"}),
    (re.compile(r"^selfevo_topk(?P<x>[0-9.]+)$"), "selfevo_topk", {"--top-k": "x"}),
    (re.compile(r"^skew_teacher_lambda(?P<x>[0-9.]+)$"), "skew_teacher", {"--kd-ratio": "x"}),   # Fig. 5
)
# <system>_lora: the system with a LoRA student (train_kd.py --lora-r)
LORA_SUFFIX, LORA_FLAGS = "_lora", ("--lora-r", "$LORA_R", "--lora-alpha", "$LORA_ALPHA")
ORDER = tuple(SYSTEMS)
# other names of systems that a user may give their files
ALIASES = {"student": "student_sft", "sft": "student_sft", "self-evolution": "selfevo"}
TABLE1_KD = tuple(name for name, system in SYSTEMS.items() if system.table1)
# every pipeline setting a system reads
SETTINGS = tuple(dict.fromkeys(word[1:] for system in SYSTEMS.values() for word in system.flags + LORA_FLAGS
                               if word.startswith("$")))


def resolve(name: str) -> Optional[System]:
    """The system NAME (a row of SYSTEMS, a sweep point, or <system>_lora), or None if unknown."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    if name.endswith(LORA_SUFFIX):
        base = resolve(name[:-len(LORA_SUFFIX)])
        return None if base is None else System(name, base.method, base.flags + LORA_FLAGS)
    for pattern, base_name, set_flags in SWEEPS:
        match = pattern.match(name)
        if match:
            base = SYSTEMS[base_name]
            flags = list(base.flags)
            for flag, group in set_flags.items():
                if flag in flags:
                    flags[flags.index(flag) + 1] = match.group(group)
                else:
                    flags += [flag, match.group(group)]
            return System(name, base.method, tuple(flags))
    return None


def base_name(name: str) -> str:
    """The row of SYSTEMS a name derives from (itself or its alias, or the system of a sweep point or a
    LoRA variant)."""
    name = ALIASES.get(name, name)
    if name in SYSTEMS or resolve(name) is None:
        return name
    if name.endswith(LORA_SUFFIX):
        return base_name(name[:-len(LORA_SUFFIX)])
    return next(base for pattern, base, _ in SWEEPS if pattern.match(name))


def order_key(name: str):
    """Sort key of a table row: the system's place in SYSTEMS (sweep points and variants after their
    system); unknown names last, in the order given (Python's sort is stable)."""
    base = base_name(name)
    return (ORDER.index(base), base != name) if base in SYSTEMS else (len(ORDER), False)


def method_of(name: str) -> Optional[str]:
    system = resolve(name)
    return None if system is None else system.method


def spec(name: str, settings: Mapping[str, str] = os.environ) -> list:
    """[method, flags...] of system NAME with the pipeline settings filled in; ValueError in words."""
    system = resolve(name)
    if system is None:
        raise ValueError(f"system {name}: unknown; known: {', '.join(ORDER)}, sweep points "
                         "(selfevo_beta0.9, selfevo_gamma1.0, selfevo_topk0.1, selfevo_beta0.5-0.0, "
                         "skew_teacher_lambda0.3) and <system>_lora")
    words = [system.method]
    for word in system.flags:
        if word.startswith("$"):
            value = settings.get(word[1:], "")
            if not value:
                raise ValueError(f"system {name}: needs the pipeline setting {word[1:]}, which is not set")
            word = value
        words.append(word)
    return words


def main(argv):
    usage = "usage: python kd/systems.py spec NAME | list table1|all | settings"
    if len(argv) == 2 and argv[0] == "spec":
        try:
            print(" ".join(spec(argv[1])))
        except ValueError as error:
            print(f"kd/systems.py: {error}", file=sys.stderr)
            return 1
        return 0
    if argv == ["settings"]:
        print(" ".join(SETTINGS))
        return 0
    if argv in (["list", "table1"], ["list", "all"]):
        print(" ".join(TABLE1_KD if argv[1] == "table1" else ORDER))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
