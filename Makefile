# make demo: install the package alone into .venv (~40 s; the extras below add a minute the
# demo does not need) and run the main job on built-in data.
# make test: install with the test, interop and tpu extras (libtpu, for `cm3leon compile`)
# and run the whole suite; make test-fast: the suite without the tests marked slow or
# multiprocess (pytest.ini).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test test-fast demo bench clean

install: $(STAMP) $(FASHION_MNIST)

# Fashion-MNIST IDX files for the fashion_mnist source and its tests (Debian package).
$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist

# The FID references the parity tests compare with (tests/test_fid.py). They declare
# torchvision, which does not load against the CPU torch wheel and is never imported by the
# modules the tests use: installed without dependencies, so pip keeps torch as it is.
FID_REFERENCES := torch-fidelity==0.4.0 pytorch-fid==0.3.0 clean-fid==0.1.35

$(BASE): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): $(BASE)
	$(BIN)/pip install -q -e ".[test,interop,tpu]"
	$(BIN)/pip install -q --no-deps $(FID_REFERENCES)
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" tests

demo: $(BASE)
	$(BIN)/cm3leon demo --config configs/demo.yaml --workdir runs/demo

bench: install
	$(BIN)/python bench/train_step.py --config configs/tiny.yaml --steps 20

clean:
	rm -rf $(VENV) runs .pytest_cache
