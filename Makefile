# The README's quick start: `make demo` and `make test`, on a fresh Debian machine with Python 3.11.
#
# TORCH pins the CPU build of PyTorch that these machines install from local disk. With a GPU,
# another build into a fresh venv: `rm -rf .venv; make test TORCH=torch` (or any pip requirement,
# e.g. torch==2.9.1); an existing .venv is kept as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= outputs/demo

.PHONY: setup system-deps demo app test soak lint clean

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,app]"
	touch $@

# Debian packages the project uses: the real Fashion-MNIST data the embedded world is trained on,
# and Chromium for the app's browser tests (driven by pip's playwright; `playwright install` is never run).
system-deps:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	fi
	@if [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; \
	fi

# The main job, short: distil the shipped teacher (512 pairs, one-step stage), evaluate the
# student against the teacher at 25 and 1 steps on the embedded world's metrics, print the
# table and write the side-by-side grid. About 10 minutes on 2 CPU cores after set-up.
DEMO_N ?= 500
demo: setup
	$(BIN)/nitrofusion distill --preset demo --set run.output_dir=$(DEMO_OUT)/student \
		--set data.pairs=$(DEMO_OUT)/pairs --resume latest
	$(BIN)/nitrofusion evaluate --model embedded-teacher --sampler native --steps 25 --n $(DEMO_N) \
		--label "teacher (Euler, CFG 5)" --out $(DEMO_OUT)/eval-teacher-native
	$(BIN)/nitrofusion evaluate --model embedded-teacher --sampler shift-lcm --steps 1 --n $(DEMO_N) \
		--label "teacher (shift-LCM)" --out $(DEMO_OUT)/eval-teacher-lcm
	$(BIN)/nitrofusion evaluate --model $(DEMO_OUT)/student/pipeline --steps 1 --n $(DEMO_N) \
		--label "student (make demo)" --out $(DEMO_OUT)/eval-student
	$(BIN)/nitrofusion compare $(DEMO_OUT)/eval-teacher-native $(DEMO_OUT)/eval-teacher-lcm \
		$(DEMO_OUT)/eval-student --out $(DEMO_OUT)
	@echo "Your student: $(BIN)/nitrofusion generate --model $(DEMO_OUT)/student/pipeline \"a photo of a sneaker\""

# The local real-time app on http://127.0.0.1:7860: the shipped student and, in the page's model
# menu, its teacher at its own 25 steps (CFG 5): about 80 ms against 1.3 s an image on the 2-core
# CPU machine (README, App).
app: setup
	$(BIN)/nitrofusion app --model embedded --model embedded-teacher

# Lint first (a second): CI runs `make test`, so the code stays ruff-clean and formatted.
# The suite runs in TEST_WORKERS processes of one torch thread each, a test file per process at a
# time (its module fixtures built once): the tiny models' ops are too small for torch's threads, so
# two processes on two cores take 55% of the time one process with two threads does (the tests
# alone: 893 s against 1627 s for the same suite, measured back to back on 2026-11-28). TEST_WORKERS=0 runs it in one process, with
# TEST_THREADS torch threads (one unless given).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: lint
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Fault injection at volume (docs/reliability.md): random kill -9s, the fault points at random steps,
# NaN storms, damaged checkpoints and SOAK_EXAMPLES fuzz examples per fuzz test. About 15 minutes.
SOAK_EXAMPLES ?= 1000
SOAK_TRIALS ?= 4
soak: setup
	$(BIN)/python scripts/soak.py --out outputs/soak --trials $(SOAK_TRIALS) --fuzz-examples $(SOAK_EXAMPLES)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs
