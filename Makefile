# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing; the venv gets the
# optional extras too (Ray, Hugging Face, trackers), so the `--executor ray`, diffusers and tracker paths are tested.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,ray,hf,trackers]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/guard run pipelines/digits.yaml

lint: $(STAMP)
	$(BIN)/ruff check sfbd_guard fixtures tests benchmarks
	$(BIN)/mypy

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) prepared guard-ledger runs
