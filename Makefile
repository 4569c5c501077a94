# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# PyPI's torch for Linux carries the CUDA libraries (several GB); PyTorch's CPU index
# has the CPU build (wheels pip is told of on disk, its find-links, serve too). For a
# CUDA build, install torch into .venv first: this step is skipped where torch imports.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: demo test chaos compose-test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# A CPU build of torch first, where none is installed: a bare torch requirement
	@# would otherwise pull a CUDA build of several GB. torch alone from that index, then
	@# what it needs from PyPI, where the CPU build already meets torch==2.13.0.
	$(BIN)/python -c "import torch" 2>/dev/null || { \
		$(BIN)/pip install --no-deps $(TORCH) --index-url $(TORCH_INDEX_URL) && \
		$(BIN)/pip install $(TORCH); }
	$(BIN)/pip install -e '.[dev,baselines]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlstm demo

test: $(STAMP) lint
	$(BIN)/pytest --ignore=tests/chaos --ignore=tests/compose --durations=12

# Faults against a real server, each scenario judged on every input; a table at the end.
chaos: $(STAMP)
	$(BIN)/pytest tests/chaos

# docker-compose.yml run for real: images built here from Debian's packages, services up,
# forecasts checked from the host; skips with a reason where no Docker daemon can run.
compose-test: $(STAMP)
	tests/compose/run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo-out .mypy_cache .ruff_cache .pytest_cache
