#!/usr/bin/env bash
# Creates the separate JAX + neural-tangents environment used by benchmarks/bench_vs_nt.py.
#
#   bash benchmarks/nt_setup.sh              # -> /work/nt-venv
#   bash benchmarks/nt_setup.sh /some/path   # -> /some/path
#
# Versions are pinned: neural-tangents 0.6.5 is the last release and works with
# jax 0.4.23; numpy < 2, ml_dtypes < 0.5 and scipy < 1.13 are the versions that jax
# release was built against. neural-tangents is installed with --no-deps because its
# declared dependency on TensorFlow is only needed by neural_tangents.experimental,
# which benchmarks/nt_side.py replaces by a stub module before importing it.
set -euo pipefail
VENV="${1:-/work/nt-venv}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "jax==0.4.23" "jaxlib==0.4.23" "numpy<2" "ml_dtypes<0.5" "scipy<1.13" frozendict
"$VENV/bin/pip" install --no-deps "neural-tangents==0.6.5"
"$VENV/bin/python" - <<'PY'
import sys, types
sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
import jax, neural_tangents as nt
print("jax", jax.__version__, "neural_tangents", getattr(nt, "__version__", "?"), "devices", jax.devices())
PY
echo "ok: $VENV/bin/python"
