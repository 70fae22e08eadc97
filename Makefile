# Two commands on a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv on first use. torch is installed first and pinned so that the CPU build already
# on this machine's disk is used (a bare `torch` would pull a multi-GB CUDA build).
PY := .venv/bin/python
BASE := .venv/.base
STAMP := .venv/.installed

.PHONY: run test lint bench clean

# `make run` needs moekit alone; `make test` adds the dev extras (transformers, the server, lm-eval, ...).
$(BASE): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The native decode kernels (moekit/native/kernels.cpp, a C++ extension for this CPU: about 40 s with
# the machine's compiler). If they cannot build, moekit says so and runs its PyTorch path.
NATIVE := .venv/.native

$(NATIVE): $(BASE) moekit/native/kernels.cpp
	$(PY) -m pip install --quiet ninja
	$(PY) -m moekit.native build || true
	touch $(NATIVE)

# The main job: dense vs MoE on the embedded Shakespeare corpus (about 10 minutes on 2 cores), in the
# regime where FFN capacity limits the dense model: a 300-token vocabulary (near byte level), width 64,
# 2 layers; the MoE holds 16 experts of 64 (top-2) against its dense twin's FFN of 128. 3 seeds each,
# and once (seed 0) the dense model with the MoE's total parameters, the ceiling sparsity aims at.
# The configuration comes from the study in BENCHMARKS.md ("What sparsity buys").
run: $(BASE) $(NATIVE)
	$(PY) -m moekit compare --preset micro-moe --vocab-size 300 --expert-ffn-dim 64 --out runs/compare \
		--seeds 3 --ceiling-seeds 1 --max-steps 2000 --lr 3e-3 --schedule constant --eval-every 100 \
		--eval-batches 20 --sample "ROMEO:"

# The GGUF export test runs moekit models in llama.cpp through llama-cpp-python, an optional extra
# that compiles llama.cpp (about 7 minutes on 2 cores, once). If it cannot build, that test skips.
LLAMA_STAMP := .venv/.llamacpp

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(PY) -m pip install --quiet -e ".[llamacpp]" \
		|| echo "warning: llama-cpp-python did not build; the llama.cpp test will be skipped"
	touch $(LLAMA_STAMP)

# The page tests (tests/test_browser.py) drive headless Chromium; without it they skip, and this says so.
test: $(STAMP) $(NATIVE) $(LLAMA_STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || test -n "$$MOEKIT_CHROMIUM" \
		|| echo "note: no Chromium, so the page tests will skip: sudo apt-get install -y chromium"
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check moekit tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf .venv build dist *.egg-info
