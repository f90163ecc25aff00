# The commands of the README. Each creates .venv on a fresh machine and runs with the Hub switched off.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test bench lint sync-notebooks clean

$(PY): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(PY)

demo: $(PY)
	$(PY) scripts/run_notebooks.py

sync-notebooks: $(PY)
	$(PY) -m jupytext --to ipynb notebooks/[0-9][0-9]_*.py

test: $(PY)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

# Step cost against a plain diffusers-style step, memory per block at real width, the presets' peaks:
# prints a table, writes outputs/bench/bench.json and kontext_helpers/block_calibration.json (about 5 minutes).
bench: $(PY)
	$(PY) benchmarks/bench.py

lint: $(PY)
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
