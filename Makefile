# `make train` and `make test` set everything up on first use: a virtual environment in .venv,
# PyTorch, and this project with its dev tools and Hugging Face transformers (GPT-2's weights; the
# tests build small GPT-2s with it).
#
# PyTorch's build (scripts/_install_torch.py; one line says which): on Linux with no NVIDIA GPU
# (`nvidia-smi -L` lists none), the CPU build from https://download.pytorch.org/whl/cpu when that
# answers within 5 s, else whatever pip's configured index offers; otherwise pip's default choice.
# TORCH_INDEX=URL uses that index for torch, TORCH_INDEX= (empty) pip's configured one.
#
#   make train                                  # the CPU recipe on Tiny Shakespeare (offline)
#   make speedrun                               # the CPU speedrun to 1.88 (docs/speedrun.md)
#   make speedrun SPEEDRUN=configs/speedrun_char_cpu_155.yaml    # ... to 1.55
#   make train DATA=path/to/input.txt           # ... on your own text (a file, folder, glob or hub id)
#   make train CONFIG=configs/shakespeare_char.yaml ARGS="--trainer.max_steps 500"
#   make test                                   # the test suite (pytest)
#   make install TORCH="torch==2.13.0"          # pin the torch requirement (e.g. a local CPU build)
#   make install TORCH_INDEX=                   # torch from pip's configured index, no probing

# `make train` runs configs/shakespeare_char_cpu.yaml, the recipe docs/recipe.md walks through: a
# model worth sampling from in a couple of minutes. `make speedrun` runs the record config: a
# smaller model, as short a run as still reaches 1.88; the record, not the model to keep.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
TORCH_INDEX ?= auto
CONFIG ?= configs/shakespeare_char_cpu.yaml
SPEEDRUN ?= configs/speedrun_char_cpu.yaml
DATA   ?=
ARGS   ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train speedrun test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python scripts/_install_torch.py --index="$(TORCH_INDEX)" "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev,hf]"
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py fit --config $(CONFIG) $(if $(DATA),--data.source $(DATA)) $(ARGS)

speedrun: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python train.py fit --config $(SPEEDRUN) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
