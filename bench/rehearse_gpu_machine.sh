#!/usr/bin/env bash
# A rehearsal of the bare GPU machine, on a CPU: an environment that holds only what a lent GPU
# machine comes with (torch and transformers 5.x), the wheels of bench/wheels/ installed offline
# (--no-index) exactly as bench/gpu_check.py's docstring tells a GPU user, then the GPU check's CPU
# mode. What it finds missing here (a wheel, a dependency, a DeepSpeed op that wants a compiler) is
# what the GPU session would trip over.
#
#   bash bench/fetch_wheels.sh            # once, with network: bench/wheels/
#   bash bench/rehearse_gpu_machine.sh    # -> bench/results/rehearsal.json (and its log beside it)
#
# Settings: REHEARSAL_VENV (default /tmp/kd-bare-gpu-venv, made anew), TORCH_SPEC (torch==2.13.0: the
# CPU build on this machine's disk), TRANSFORMERS_SPEC ("transformers>=5,<6").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${REHEARSAL_VENV:=/tmp/kd-bare-gpu-venv}" "${TORCH_SPEC:=torch==2.13.0}" "${TRANSFORMERS_SPEC:=transformers>=5,<6}"
wheels=bench/wheels
[[ -d "$wheels" ]] || { echo "no $wheels: run bash bench/fetch_wheels.sh first (with network)"; exit 1; }
log=bench/results/rehearsal.log
mkdir -p bench/results
start=$SECONDS
{
  echo "# the bare machine: only torch and transformers (what a lent GPU machine has)"
  rm -rf "$REHEARSAL_VENV"
  python3 -m venv "$REHEARSAL_VENV"
  "$REHEARSAL_VENV/bin/pip" install --quiet "$TORCH_SPEC"
  "$REHEARSAL_VENV/bin/pip" install --quiet "$TRANSFORMERS_SPEC"
  echo "# the GPU check's own install line, offline"
  "$REHEARSAL_VENV/bin/pip" install --no-index --find-links "$wheels" accelerate deepspeed
  "$REHEARSAL_VENV/bin/pip" list --format=freeze
  echo "# the GPU check in its CPU mode, as its docstring runs it"
  HF_HUB_OFFLINE=1 "$REHEARSAL_VENV/bin/python" bench/gpu_check.py /tmp/kd-rehearsal --device cpu --tiny
} >"$log" 2>&1 && status=0 || status=$?
python3 - "$status" "$((SECONDS - start))" "$log" <<'EOF'
import json, sys
status, seconds, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
text = open(log, encoding="utf-8").read()
report = {"exit_status": status, "seconds": seconds, "log": log,
          "installed": [line for line in text.splitlines() if "==" in line and " " not in line],
          "last_lines": text.splitlines()[-15:]}
json.dump(report, open("bench/results/rehearsal.json", "w"), indent=1)
print(f"rehearsal: exit {status} after {seconds}s; bench/results/rehearsal.json, {log}")
EOF
exit "$status"
