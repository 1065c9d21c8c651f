# make test    set up .venv (and the Debian Fashion-MNIST files) on a fresh machine, run the tests
# make ladder  set up, then train and show the default CPU ladder on Fashion-MNIST
# make bench   set up (with PyTorch/timm), then time JAX against timm (README, "Speed on CPU")
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
STAMP_CORE := $(VENV)/.installed-core
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The default CPU ladder (README, "The ladder"): Fashion-MNIST at 32x32, model scale 'cpu',
# 2 seeds, every adopted step.
LADDER_OUT ?= runs/ladder
LADDER_OPTIONS ?= data=fashion_mnist,scale=cpu,image_size=32,batch=128,length=0.004
LADDER_SEEDS ?= 2

.PHONY: venv venv-core test test-fast ladder bench data clean

venv: $(STAMP)
venv-core: $(STAMP_CORE)

$(STAMP_CORE): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[plot]'
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

test: venv data
	$(BIN)/python -m pytest tests -q -ra --durations=15

# Without the PyTorch reference tests.
test-fast: venv data
	$(BIN)/python -m pytest tests -q -ra -m 'not torch'

ladder: venv-core data
	$(BIN)/python -m experiments.ladder run --out $(LADDER_OUT) --seeds $(LADDER_SEEDS) \
	  --options $(LADDER_OPTIONS) --show

# Every ladder step at batch 32, 32x32 and 64x64, beside timm where it has the network; the
# CPU ladder's training against its input pipeline. The table at the end; JSON lines in
# runs/bench.jsonl (`python -m experiments.bench --show runs/bench.jsonl [--markdown]`).
BENCH_OPTIONS ?= --steps all --shapes 32x32,64x64
bench: venv data
	mkdir -p runs
	$(BIN)/python -m experiments.bench $(BENCH_OPTIONS) --json > runs/bench.jsonl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
