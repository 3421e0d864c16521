#!/usr/bin/env bash
# Creates the separate environment used by benchmarks/bench_peers.py: torch 2.13.0 (CPU) and the
# PyTorch libraries a user might pick instead of ntkfunc. They are benchmark-only: none of them is,
# or may become, a dependency of ntkfunc (setup.cfg does not name them).
#
#   bash benchmarks/peers_setup.sh                  # -> benchmarks/.venv-peers
#   bash benchmarks/peers_setup.sh /some/path       # -> /some/path
#
# torch is taken first with --no-deps (a local CPU wheel where the machine has one, as in the
# Makefile), then again with its dependencies. The peers are installed with --no-deps as well where
# their declared dependencies would replace that torch (opacus and traker pin or pull torchvision /
# other torch builds); what they need at import time is installed explicitly.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.venv-peers}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q --no-deps torch==2.13.0
"$PIP" install -q torch==2.13.0 numpy scipy
"$PIP" install -q --no-deps "nngeometry==0.4" "asdfghjkl==0.1a5" "backpack-for-pytorch==1.7.1" \
    "opacus==1.6.0" "traker==0.3.2"
# Import-time dependencies of the peers (without letting any of them replace torch).
"$PIP" install -q "einops>=0.3,<1" "unfoldNd" "opt_einsum" "tqdm" "requests" "packaging"
"$VENV/bin/python" - <<'PY'
import torch
print("torch", torch.__version__)
for name in ("nngeometry", "asdl", "backpack", "opacus", "trak"):
    try:
        __import__(name)
        print("ok", name)
    except Exception as exc:  # recorded, not fatal: bench_peers.py reports the peer as unavailable
        print("FAILED", name, type(exc).__name__, exc)
PY
echo "ok: $VENV/bin/python"
