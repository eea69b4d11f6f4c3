# Quick start:  make test   (set up .venv, build, run the tests)
#               make bench  (set up .venv, build, run bench/run.py)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv build test bench clean

venv: $(VENV)/.installed

# The pinned environment (requirements/dev.txt): the CUDA build of torch, so CUDA sources compile here too.
$(VENV)/.installed: requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

# Builds dlkern._C in place against the venv's torch, again whenever a C++/CUDA source or setup.py changes.
build: dlkern/_build_info.json

dlkern/_build_info.json: $(VENV)/.installed setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest

bench: build
	$(PY) bench/run.py

clean:
	rm -rf build dlkern/_C*.so dlkern/_build_info.json *.egg-info
