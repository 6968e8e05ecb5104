# Two commands on a fresh machine:
#   make demo   set everything up, fetch SmolLM2-135M-Instruct, convert it at tp=2, run it under mpirun
#   make test   set everything up and run the test suite
#   make test-fast   the quick lane: the tests not marked slow (those on the real SmolLM2 model are left out)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENGINE ?= engines/smollm2-135m-tp2
PROMPT ?= When did the first world war end?

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

# torch first: the CPU build (torch==2.13.0) on machines without CUDA, so pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q 'torch>=2.5,<2.15'; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[all]'
	touch $@

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash launch/demo.sh "$(ENGINE)" "$(PROMPT)"

# Two pytest workers, each test file on one of them (its module fixtures built once): most tests wait on rank
# processes starting, so two workers keep both cores busy.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# Measurements, not tests (about 75 minutes on 2 cores; several GB of scratch space in /tmp).
bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	# llama.cpp as a peer: no wheel on PyPI, a source build (~10 minutes on 2 cores, once)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q 'llama-cpp-python>=0.3'
	$(BIN)/python benchmarks/bench_cpu_tp.py --rounds 2 --out benchmarks/results/cpu_tp.json
	$(BIN)/python benchmarks/roofline.py --tp_ceiling llama-1b-bench --rounds 5 --out benchmarks/results/tp_ceiling_1b.json
	$(BIN)/python benchmarks/bench_cpu_tp.py --model llama-1b --new_tokens 32 --rounds 3 --out benchmarks/results/cpu_tp_1b.json
	$(BIN)/python benchmarks/bench_allreduce.py --out benchmarks/results/allreduce.json
	$(BIN)/python benchmarks/bench_decode.py --out benchmarks/results/decode.json
	$(BIN)/tp-convert --model_dir "$$($(BIN)/python -m tp_runtime.assets smollm2 --hf)" \
		--output_dir engines/smollm2-135m-tp1 --tp_size 1 --force --no_progress
	$(BIN)/python benchmarks/roofline.py --engine engines/smollm2-135m-tp1 --out benchmarks/results/roofline.json
	$(BIN)/python benchmarks/bench_convert_memory.py --out benchmarks/results/convert_memory.json
	$(BIN)/python benchmarks/bench_20b_shapes.py --out benchmarks/results/20b_shapes.json
	$(BIN)/python benchmarks/bench_woq_kernels.py --json benchmarks/results/woq_kernels.json
	$(BIN)/python benchmarks/bench_quant.py --out benchmarks/results/quant.json
	$(BIN)/python benchmarks/bench_alternating.py --rounds 5 --out benchmarks/results/alternating.json
	$(BIN)/python benchmarks/bench_ray.py --out benchmarks/results/ray.json

clean:
	rm -rf engines
