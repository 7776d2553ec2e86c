# `make test` and `make demo` create .venv themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases this workplace ships on disk (a CPU-capable build).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo bench lint clean

$(BIN)/anomalens: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,serve,export]"
	touch $(BIN)/anomalens

venv: $(BIN)/anomalens

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/anomalens demo

# CPU smoke benchmark on random weights; per-method benchmarks: benchmarks/bench_<method>.py
bench: venv
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/anomalens bench --backbone test-tiny --pretrained none --image-size 256 --out runs/bench

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .anomalens_cache build *.egg-info
