# grade_ray developer commands. `make demo` and `make test` install first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch by default. GPU: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu*),,https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=
# The test install includes the onnx extra (~38 MB of wheels, mostly onnxruntime) and the
# serve extra (~10 MB) so that the ONNX parity and Ray Serve tests run; EXTRAS=test
# installs without them (those tests then skip, saying why).
EXTRAS ?= test,onnx,serve

.PHONY: install demo test test-all lint format bench mutants clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install  # starts fresh: train refuses a run directory that already holds a run
	rm -rf runs/demo
	$(PY) -m grade_ray train --config configs/demo.yaml --evaluate

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check grade_ray tests
	$(VENV)/bin/ruff format --check grade_ray tests

format: install
	$(VENV)/bin/ruff format grade_ray tests
	$(VENV)/bin/ruff check --fix grade_ray tests

bench: install
	$(PY) -m grade_ray bench --out runs/bench/bench.json

# Plant known bugs one at a time in a temporary copy and check the tests catch each (~10 min).
mutants: install
	$(PY) scripts/mutants.py

clean:
	rm -rf runs .pytest_cache
