# make test    set up .venv (and the Debian Fashion-MNIST files) on a fresh machine, run the tests
# make ladder  set up, then train and show the default CPU ladder on Fashion-MNIST
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv test test-fast data clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test]'
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
