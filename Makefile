# Two commands for a fresh machine: `make test` and `make demo`.
# Each builds .venv from the pinned requirements.txt when it is missing or stale
# (the stamp holds the sha256 of requirements.txt and pyproject.toml it was built from), and installs this
# repository into it in editable mode, so `common` and `tools` import from anywhere. No pip cache: where torch
# comes from PyPI, its CUDA build and libraries (several GB) would sit on disk twice.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.sha256
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test demo demo-seeds demo-methods demo-unlearn-seeds world clean-venv gpu-wheels gpu-rehearsal

venv:
	@want=$$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1); \
	have=$$(cat $(STAMP) 2>/dev/null); \
	if [ "$$want" != "$$have" ]; then \
	  echo "building $(VENV) from requirements.txt"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet --no-cache-dir --upgrade pip && \
	  $(PY) -m pip install --quiet --no-cache-dir -r requirements.txt && \
	  $(PY) -m pip install --quiet --no-cache-dir --no-deps -e . && \
	  echo "$$want" > $(STAMP); \
	fi

# Two pytest-xdist workers (one per core), each running whole test modules (loadfile), so a module's fixtures (a toy
# world, a reference run) are built once. (--dist loadgroup would be the finer tool, but xdist 3.8 cannot rename a
# test under pytest 9.2, whose nodeid is read-only: its groups are ignored and fixtures were built on both workers.)
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The demo runs under the pinned numeric environment (common/numerics.py): the same bits on every x86-64 AVX2
# machine. PIN=0 lets torch pick its kernels and threads: faster on a big machine, but other numbers.
PIN ?= 1
DEMO_FLAGS := $(if $(filter 0,$(PIN)),--no_pin)

demo: venv
	$(PY) tools/demo.py $(DEMO_FLAGS)

# The sequential ESD-x, UCE and control runs over fine-tuning seeds 0, 1, 2 (same toy world), with intervals.
demo-seeds: venv
	$(PY) tools/demo.py --run_seeds 0,1,2 $(DEMO_FLAGS)

# The unlearning methods side by side in the toy world: each erases the red circle, is scored against the world's
# erasure targets, and is fine-tuned sequentially on the related and unrelated data beside one control.
demo-methods: venv
	$(PY) tools/demo.py --methods all $(DEMO_FLAGS)

# ESD-x and AC unlearned again at seeds 0, 1, 2, each model fine-tuned sequentially on the related data at fine-tuning
# seeds 0, 1, 2: how much of the Revival Point's spread comes from the unlearning seed, how much from fine-tuning's.
demo-unlearn-seeds: venv
	$(PY) tools/demo.py --run_seeds 0,1,2 --unlearn_seeds 0,1,2 $(DEMO_FLAGS)

# Train the toy world's CLIP, VAE, UNet and classifier again from their seeds (the demo assembles the world from
# the committed ones, tools/toy_world/weights/) and check them against the committed weights, bit for bit.
world: venv
	$(PY) tools/build_toy_world.py --retrain $(DEMO_FLAGS)

clean-venv:
	rm -rf $(VENV)

# The lent GPU machine has no package registry: .whl/ holds the wheels it lacks (diffusers, datasets, open_clip_torch
# and their missing dependencies, nudenet; ~20 MB; NUDENET=0 leaves nudenet out), to carry and install there as
# tools/gpu_wheels.sh says.
gpu-wheels:
	tools/gpu_wheels.sh

# Its run of tools/gpu_check.py, rehearsed here on the CPU under its package versions (Python 3.12, torch 2.11,
# transformers 5.17, huggingface_hub 1.33) plus .whl/: tools/gpu_rehearsal.sh. The first build downloads several GB.
gpu-rehearsal:
	tools/gpu_rehearsal.sh
