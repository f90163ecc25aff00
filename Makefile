# The commands of the README. Each creates .venv on a fresh machine and runs with the Hub switched off.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test bench lint sync-notebooks clean tiny-weights

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

# The shipped tiny weights (docs/tiny_model.md), resumable: the VAE on both cores, then the depth probe and the base
# transformer beside the VAE decoder on one core each, then one file with both (about 2 hours on 2 idle cores).
RUN := outputs/pretrain-tiny
tiny-weights: $(PY)
	$(PY) -m kontext_helpers pretrain-tiny --out $(RUN) --threads 2 --probe-steps 0 --base-steps 0 --decoder-steps 0 \
		--weights $(RUN)/vae-only.safetensors
	test -d $(RUN)-decoder || cp -r $(RUN) $(RUN)-decoder
	$(PY) -m kontext_helpers pretrain-tiny --out $(RUN)-decoder --probe-steps 0 --base-steps 0 --quiet \
		--weights $(RUN)-decoder/decoder-only.safetensors & decoder=$$!; \
	$(PY) -m kontext_helpers pretrain-tiny --out $(RUN) --decoder-steps 0 --weights $(RUN)/base-only.safetensors; \
	base=$$?; wait $$decoder && test $$base -eq 0
	$(PY) -m kontext_helpers pretrain-tiny --export-only --out $(RUN) --decoder-from $(RUN)-decoder

lint: $(PY)
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
