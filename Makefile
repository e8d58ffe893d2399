# Two commands do all the set-up on a fresh machine:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## the exploding CNN, plain (dies) then guarded (finishes)
	$(BIN)/python examples/exploding_cnn.py

test: $(STAMP)  ## the whole test suite, doctests included
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/python -m pytest

.PHONY: docs
docs: $(STAMP)  ## the user guide and API reference (docs/, mkdocs.yml) built into build/site
	$(BIN)/mkdocs build --strict --site-dir build/site

bench: $(STAMP)  ## guard overhead vs plain vs detect_anomaly (see BENCHMARKS.md)
	$(BIN)/python benchmarks/guard_overhead.py

lint: $(STAMP)  ## ruff, and mypy on the package and on the Python snippets of README.md and docs/
	$(BIN)/ruff check lightning_nan tests scripts conftest.py
	$(BIN)/python scripts/check_readme.py README.md docs/*.md docs/callbacks/*.md
test: lint  # `make test` runs the lint first
.PHONY: lint

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache *.egg-info
