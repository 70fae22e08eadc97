# Two commands on a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv on first use. torch is installed first and pinned so that the CPU build already
# on this machine's disk is used (a bare `torch` would pull a multi-GB CUDA build).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m moekit demo --preset tiny-moe

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check moekit tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf .venv build dist *.egg-info
