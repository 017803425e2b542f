#!/usr/bin/env bash
# Creates the two virtual environments that benchmarks/bench_peers.py runs its peers in:
#
#   FOLDER/tl4: transformer-lens 4.3.0 (TransformerBridge), nnsight 0.8.1, timm 1.0.31
#   FOLDER/tl3: transformer-lens 3.9.0 (HookedTransformer)
#
# Usage: benchmarks/peers_setup.sh [FOLDER]       (FOLDER defaults to /work/peers)
#
# Each is a fresh `python3 -m venv` (an existing one at that path is cleared), apart from the
# project's own .venv, whose packages stay as they are. torch is installed first and then held by
# a constraints file, so that resolving the peers neither upgrades nor replaces it. Override with
# PYTHON=python3.11 or TORCH_VERSION=2.13.0 in the environment.
set -euo pipefail

FOLDER="${1:-/work/peers}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TRANSFORMERS_VERSION="5.25.0"

mkdir -p "$FOLDER"
CONSTRAINTS="$FOLDER/constraints.txt"
printf 'torch==%s\ntransformers==%s\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" > "$CONSTRAINTS"

# make_venv NAME PACKAGE...: a fresh venv FOLDER/NAME with torch, then the pinned packages.
make_venv() {
    local name="$1"
    shift
    local venv="$FOLDER/$name"
    echo "== $venv: torch $TORCH_VERSION, then $*"
    "$PYTHON" -m venv --clear "$venv"
    "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$venv/bin/python" -m pip install -q -c "$CONSTRAINTS" "$@"
    "$venv/bin/python" -c "import torch, transformers; print('   torch', torch.__version__, '| transformers', transformers.__version__)"
}

make_venv tl4 "transformers==$TRANSFORMERS_VERSION" transformer-lens==4.3.0 nnsight==0.8.1 timm==1.0.31
make_venv tl3 "transformers==$TRANSFORMERS_VERSION" transformer-lens==3.9.0
echo "done: python benchmarks/bench_peers.py --peers $FOLDER"
