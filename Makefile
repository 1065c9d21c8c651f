# make test    set up .venv (and the Debian Fashion-MNIST files) on a fresh machine, run the tests
# make ladder  set up, then train and show the default CPU ladder on Fashion-MNIST
# make ladder-quick  a rough ladder in minutes (one seed, a tenth of the training; not at plateau)
# make ladder-gpu  the same ladder as `make ladder` on one NVIDIA GPU (docs/gpu.md; not yet run on a GPU)
# make references  after `make ladder`: Swin-T and ViT-S beside it, then the analyses against them
# make bench   set up (with PyTorch/timm), then time JAX against timm (docs/performance.md)
# make mutate  plant the deliberate bugs of tests/mutations.toml one at a time; report which the tests catch
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
STAMP_CORE := $(VENV)/.installed-core
STAMP_GPU := $(VENV)/.installed-gpu
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The default CPU ladder (docs/ladder.md): Fashion-MNIST at 32x32, model scale 'cpu', the
# calibrated CPU miniature recipe (configs/ladder.py, MINIATURE), every adopted step.
LADDER_OUT ?= runs/ladder
LADDER_OPTIONS ?= data=fashion_mnist,scale=cpu,image_size=32,batch=128,miniature
LADDER_SEEDS ?= 4
# Runs trained at once, each pinned to its share of the cores: on 2 cores two single-core runs
# train more images/s than one run on both (docs/ladder.md, "Running and showing a ladder").
LADDER_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
# A rough look in minutes: the same ladder, one seed, a tenth of the training. Not at plateau.
QUICK_OUT ?= runs/ladder-quick
QUICK_OPTIONS ?= data=fashion_mnist,scale=cpu,image_size=32,batch=128,miniature,longer=0.1
# The same ladder on one GPU (docs/gpu.md, "The GPU ladder"): the training split on the device, 8
# updates per dispatch, LADDER_GPU_JOBS trainer processes sharing the GPU (--share-device: none
# pinned to cores, each preallocating 0.9/LADDER_GPU_JOBS of its memory, seed-major so that later
# seeds reuse a step's compiled programs). Its own step table: the runs hash as the CPU ladder's.
LADDER_GPU_OUT ?= runs/ladder_gpu
LADDER_GPU_JOBS ?= 4
# JAX's CUDA plugin installed into .venv by `make ladder-gpu` (cuda12 for an older driver).
JAX_CUDA ?= cuda13

.PHONY: venv venv-core venv-gpu test test-fast lint mutate ladder ladder-quick ladder-gpu references \
  bench data clean

venv: $(STAMP)
venv-core: $(STAMP_CORE)
venv-gpu: $(STAMP_GPU)

$(STAMP_CORE): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[plot]'
	touch $@

# JAX for NVIDIA GPUs on top of the core (the same jax version, constraints.txt).
$(STAMP_GPU): $(STAMP_CORE)
	$(BIN)/python -m pip install -q -c constraints.txt 'jax[$(JAX_CUDA)]'
	touch $@

# The tests add PyTorch, torchvision and timm (the numerical references).
$(STAMP): $(STAMP_CORE)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist package.
data: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# Two worker processes (pytest-xdist): much of a test's time is one-threaded (compiling,
# starting a subprocess), so two at a time use two cores better than one does.
TEST_WORKERS ?= 2
test: venv data lint
	$(BIN)/python -m pytest tests -q -ra --durations=25 -n $(TEST_WORKERS) --dist worksteal

# The style (pyproject.toml); tests/test_style.py runs it too, with the indentation check.
lint: venv
	$(BIN)/ruff check .

# Without the PyTorch reference tests.
test-fast: venv data
	$(BIN)/python -m pytest tests -q -ra -m 'not torch' -n $(TEST_WORKERS) --dist worksteal

# Deliberate bugs, one at a time, in a scratch copy: every one must make its tests fail.
mutate: venv data
	$(BIN)/python tests/mutate.py

ladder: venv-core data
	$(BIN)/python -m experiments.ladder run --out $(LADDER_OUT) --seeds $(LADDER_SEEDS) \
	  --jobs $(LADDER_JOBS) --options $(LADDER_OPTIONS) --show

# Refuses, in one line, where JAX sees no GPU (it would train on the CPU, unpinned).
ladder-gpu: venv-gpu data
	@XLA_PYTHON_CLIENT_PREALLOCATE=false $(BIN)/python -c "import jax, sys; b = jax.default_backend(); sys.exit(0 if b != 'cpu' else \
	  'error: JAX sees no GPU here (backend cpu); make ladder trains on the CPU')"
	$(BIN)/python -m experiments.ladder run --out $(LADDER_GPU_OUT) --seeds $(LADDER_SEEDS) \
	  --jobs $(LADDER_GPU_JOBS) --share-device --options $(LADDER_OPTIONS) \
	  --set data.placement=device --set steps_per_dispatch=8 --show

# The transformer references beside the default CPU ladder, same options and seeds
# (docs/ladder.md), then every step's CKA, shape bias and error consistency against them
# (docs/analysis.md).
references: venv-core data
	$(BIN)/python -m experiments.ladder run --out $(LADDER_OUT) --seeds $(LADDER_SEEDS) \
	  --jobs $(LADDER_JOBS) --options $(LADDER_OPTIONS) --references --steps swin_t,vit_s --show
	$(BIN)/python -m experiments.analyze cka --out $(LADDER_OUT) --reference swin_t,vit_s
	$(BIN)/python -m experiments.analyze bias --out $(LADDER_OUT) --reference swin_t,vit_s

ladder-quick: venv-core data
	$(BIN)/python -m experiments.ladder run --out $(QUICK_OUT) --seeds 1 --jobs $(LADDER_JOBS) \
	  --options $(QUICK_OPTIONS) --show --note 'QUICK LOOK: one seed, a tenth of the training; not at plateau, not evidence'

# Every ladder step at batch 32, 32x32 and 64x64, beside timm where it has the network; the
# CPU ladder's training against its input pipeline. The table at the end; JSON lines in
# runs/bench.jsonl (`python -m experiments.bench --show runs/bench.jsonl [--markdown]`).
BENCH_OPTIONS ?= --steps all --shapes 32x32,64x64
bench: venv data
	mkdir -p runs
	$(BIN)/python -m experiments.bench $(BENCH_OPTIONS) --json > runs/bench.jsonl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
