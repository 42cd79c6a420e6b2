# The two commands of the quick start: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-fast

venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(PY) -m evf_sam predict --image assets/sample.png --prompt "the red circle" --out runs/demo

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow and not e2e"
