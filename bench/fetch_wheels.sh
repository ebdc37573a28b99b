#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU machine that has torch and transformers but no network:
# accelerate, DeepSpeed (built here as a pure-Python wheel: its CUDA ops compile on first use) and
# their dependencies (not those transformers brings: numpy, pyyaml, safetensors, tqdm, huggingface-hub),
# binary ones for CPython 3.10-3.13 on x86-64 Linux. Run once where PyPI is
# reachable; bench/wheels/ (git-ignored, ~15 MiB) then travels with the working tree:
#
#   bash bench/fetch_wheels.sh
#   # on the GPU machine, offline (pip keeps what is installed already):
#   pip install --no-index --find-links bench/wheels accelerate deepspeed
#
# Versions: requirements.txt's pins (accelerate 1.15.0, deepspeed 0.19.8). Building DeepSpeed's wheel
# imports torch, so run this in the project's environment.
set -euo pipefail
dest="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels"
mkdir -p "$dest"
pip=(python -m pip)

# Pure-Python packages (one wheel for every Python).
"${pip[@]}" download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  accelerate==1.15.0 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 nvidia-ml-py \
  pydantic==2.14.4 annotated-types typing-inspection "typing-extensions>=4.14" packaging

# DeepSpeed ships as source only: build a wheel without compiling any op (DS_BUILD_OPS=0).
DS_BUILD_OPS=0 "${pip[@]}" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dest" deepspeed==0.19.8

# Binary packages: one wheel per CPython version (psutil's abi3 wheel serves them all).
for version in 3.10 3.11 3.12 3.13; do
  "${pip[@]}" download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version "$version" \
    pydantic-core==2.50.5 msgpack==1.2.4 psutil==7.2.2 ninja==1.13.2
done
du -sh "$dest"
ls "$dest"
