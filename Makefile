# Quick start:  make test   (set up .venv, build, run the tests)
#               make bench  (set up .venv, build, run bench/run.py)
#               make compat (the checks on the oldest supported torch/Triton, in .venv-compat and build/compat)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv build test bench clean compat-venv compat-build compat-test compat

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

# The compatibility stage: the oldest supported pair (requirements/compat.txt: torch 2.11 + Triton 3.6, the GPU
# machine's stack) in its own venv. The working tree (tracked and untracked files, not ignored ones) is copied to
# build/compat and built there, so the pinned build in dlkern/ stays as it is. Then: the launch-plan check, one
# forward and backward per op family in the interpreter (tests/test_compat.py), and the sm_90 compile check on a
# sample (every untuned variant and COMPAT_SAMPLE autotuned ones).
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(abspath $(COMPAT_VENV))/bin/python
COMPAT_DIR := build/compat
COMPAT_SAMPLE ?= 8
COMPAT_TESTS := tests/test_compat.py tests/test_launch_plans.py tests/test_gpu_compile.py

compat-venv: $(COMPAT_VENV)/.installed

$(COMPAT_VENV)/.installed: requirements/compat.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet -r requirements/compat.txt
	touch $@

compat-build: compat-venv
	rm -rf $(COMPAT_DIR)
	mkdir -p $(COMPAT_DIR)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	cd $(COMPAT_DIR) && $(COMPAT_PY) -c "import dlkern, triton; print('compat build:', dlkern.build_info, 'triton', triton.__version__)"

compat-test:
	cd $(COMPAT_DIR) && DLKERN_COMPILE_SAMPLE=$(COMPAT_SAMPLE) $(COMPAT_PY) -m pytest $(COMPAT_TESTS)

compat: compat-build
	$(MAKE) compat-test

clean:
	rm -rf build dlkern/_C*.so dlkern/_build_info.json *.egg-info
