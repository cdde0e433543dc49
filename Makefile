# avatar-render: `make demo` renders the bundled example manifest, `make test` runs the test suite.
# Both create or reuse the virtual environment at .venv and install what they need.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SYSTAMP := $(VENV)/.system-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps test demo examples train-tiny bench-long bench-pipeline bench-service bench-gpu clean

# torch is installed first and pinned: a looser resolution pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Debian packages the tests drive for real: prometheus (scrapes the service in the metrics test).
$(SYSTAMP):
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)
	@mkdir -p $(VENV) && touch $@

system-deps: $(SYSTAMP)

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/avatar-render run examples/manifest.jsonl --output outputs/

# Regenerate the bundled example inputs (they are committed; `make demo` does not need this).
examples: install
	$(PY) examples/make_examples.py

train-tiny: install
	$(PY) -m model.train.recipe --out runs/tiny

bench-long: install
	$(PY) benchmarks/long_render.py

bench-pipeline: install
	$(PY) benchmarks/pipeline_throughput.py

bench-service: install
	$(PY) benchmarks/service_load.py

bench-gpu: install
	$(PY) benchmarks/gpu_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
