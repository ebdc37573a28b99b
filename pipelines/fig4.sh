#!/usr/bin/env bash
# Figure 4 of the paper: teacher similarity, the BLEU of each system's output against the teacher's
# output (evaluate.py --teacher-hyps, the "teacher_bleu" of the results), from Table 1's outputs.
#
#   DATA_DIR=path/to/ALMA/human_written_data bash pipelines/fig4.sh
#   SOURCE_TABLE=table2 bash pipelines/fig4.sh            # from Table 2 (the 30B teacher) instead
#   OUT=/tmp/qs SOURCE_TABLE=quickstart bash pipelines/fig4.sh   # from a finished quickstart
#
# Runs pipelines/$SOURCE_TABLE.sh first (its finished steps are skipped; it trains, generates and
# scores what is missing, with the same environment), then draws figures/fig4/fig4.png from
# results/$SOURCE_TABLE.
set -euo pipefail

# ---- settings (each overridable from the environment; the table script reads the rest) ----
: "${EXP:=fig4}"
: "${SOURCE_TABLE:=table1}"      # table1, table2 or quickstart
: "${OUT:=}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$here/$SOURCE_TABLE.sh" ]] || { echo "SOURCE_TABLE=$SOURCE_TABLE: no pipelines/$SOURCE_TABLE.sh" >&2; exit 1; }
OUT="$OUT" bash "$here/$SOURCE_TABLE.sh"

# shellcheck source=pipelines/paper.sh disable=SC1091
source "$here/paper.sh"
use_experiment "$EXP"
plot fig4 fig4 "$FIGURES/fig4.png" --results "$OUT/results/$SOURCE_TABLE"
echo "figure: $FIGURES/fig4.png"
