# The two commands of the quick start: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo predict-sample test test-fast

venv:
	@bash scripts/setup_venv.sh

# Label Studio + the backend (embedded mode, shipped demo model) with a pre-labelled sample project; Ctrl-C stops it.
demo: venv
	$(PY) scripts/demo.py

# The model alone, no Label Studio: masks + overlay for a sample image in runs/sample/.
predict-sample: venv
	$(PY) -m evf_sam predict --image assets/sample.png --prompt "the red circle" --prompt "the blue square" --out runs/sample

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow and not e2e"
