# The README's quick start: `make demo` and `make test`, on a fresh Debian machine with Python 3.11.
#
# TORCH pins the CPU build of PyTorch that these machines install from local disk. With a GPU,
# keep your own torch: `make test TORCH=torch` (or any pip requirement, e.g. torch==2.9.1).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= outputs/demo

.PHONY: setup system-deps demo test lint clean

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Debian packages the project uses: the real Fashion-MNIST data the embedded world is trained on.
system-deps:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	fi

demo: setup
	$(BIN)/nitrofusion generate --sampler native --steps 25 --guidance-scale 5 --seed 0 \
		--prompts nitrofusion/world/assets/demo_prompts.txt --out $(DEMO_OUT)/teacher-25-steps
	$(BIN)/nitrofusion generate --sampler shift-lcm --steps 1 --seed 0 \
		--prompts nitrofusion/world/assets/demo_prompts.txt --out $(DEMO_OUT)/teacher-1-step
	$(BIN)/nitrofusion grid $(DEMO_OUT)/teacher-25-steps $(DEMO_OUT)/teacher-1-step \
		--out $(DEMO_OUT)/grid.png

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check nitrofusion tests scripts benchmarks

clean:
	rm -rf $(VENV) outputs
