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

# The main job: dense vs MoE on the embedded Shakespeare corpus, 3 seeds each (about 7 minutes on 2 cores).
# The configuration comes from the study in BENCHMARKS.md ("What sparsity buys").
run: $(STAMP)
	$(PY) -m moekit compare --preset micro-moe --out runs/compare --seeds 3 --max-steps 1500 --lr 3e-3 \
		--schedule constant --eval-every 75 --eval-batches 10 --sample "ROMEO:"

# The GGUF export test runs moekit models in llama.cpp through llama-cpp-python, an optional extra
# that compiles llama.cpp (about 7 minutes on 2 cores, once). If it cannot build, that test skips.
LLAMA_STAMP := .venv/.llamacpp

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(PY) -m pip install --quiet -e ".[llamacpp]" \
		|| echo "warning: llama-cpp-python did not build; the llama.cpp test will be skipped"
	touch $(LLAMA_STAMP)

test: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check moekit tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf .venv build dist *.egg-info
