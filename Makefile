# avatar-render: `make demo` renders the bundled example manifest, `make test` runs the test suite.
# Both create or reuse the virtual environment at .venv and install what they need.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SYSTAMP := $(VENV)/.system-stamp
PYTEST_ARGS ?= --durations=20

.PHONY: install system-deps vendor-js console-screenshots lint test demo examples train-tiny eval-tiny eval-tiny-stages ablation-mci-off bench-long bench-pipeline bench-service bench-gpu bench-batching clean

# torch is installed first and pinned: a looser resolution pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Debian packages the tests drive for real: prometheus (scrapes the service in the metrics test) and chromium
# (headless, drives the web console in tests/test_console.py through Playwright, which talks to it directly: no
# WebDriver).
$(SYSTAMP):
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@mkdir -p $(VENV) && touch $@

system-deps: $(SYSTAMP)

# The console's chart library, vendored into deploy/static/vendor (MIT; nothing is fetched at run time). This
# fetches the pinned npm package again, checks its hash and copies the built files and the licence.
UPLOT_VERSION := 1.6.32
UPLOT_SHA256 := 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
vendor-js:
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack -q uplot@$(UPLOT_VERSION) >/dev/null \
	  && echo "$(UPLOT_SHA256)  uplot-$(UPLOT_VERSION).tgz" | sha256sum -c --quiet - \
	  && tar xzf uplot-$(UPLOT_VERSION).tgz \
	  && cp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE $(CURDIR)/deploy/static/vendor/uplot/ \
	  && rm -rf $$tmp && echo "deploy/static/vendor/uplot: uPlot $(UPLOT_VERSION)"

# docs/img/console_*.png: the browser test's screenshots of a real run (login, job list, job page, a running job).
console-screenshots: install system-deps
	CONSOLE_SCREENSHOTS_DIR=docs/img $(PY) -m pytest -q tests/test_console.py -k real_browser

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/avatar-render run examples/manifest.jsonl --output outputs/

# Regenerate the bundled example inputs (they are committed; `make demo` does not need this).
examples: install
	$(PY) examples/make_examples.py

# The whole recipe from scratch (VAE, teacher, causal student, DMD, then the paste-back threshold chosen on validation
# clips), then the model goes to model/weights/tiny.
# The shipped run's stages took 54 + 120 + 27 + 18 minutes of wall time on this 2-core machine, the teacher's with
# about 29 minutes paused for test runs (model/weights/tiny/MODEL_CARD.md), plus data generation and latent encoding
# between them; it resumes where it stopped if interrupted.
train-tiny: install
	$(PY) -m model.train.recipe --out runs/tiny --threads 2

# docs/results.md's rows of the shipped model: held-out metrics (4 clips of 12 s: faces, voices and content seeds that
# training, tuning and calibration never used, model.eval.heldout.HeldOutSet) and a second such set, the astronaut,
# ablations at inference, 10-minute drift with and without URCR, the plots and the table. Needs only a clone and
# `make install` (JSON files go to $(EVAL)); about 1.5 hours on 2 cores at 128x128 (each 10-minute row about 30
# minutes; a 4-clip row 2-5 minutes).
RUN ?= runs/tiny
MODEL ?= model/weights/tiny
EVAL ?= $(RUN)/eval
HELDOUT := $(PY) -m model.eval.heldout --clips 4 --seconds 12
eval-tiny: install
	$(HELDOUT) --checkpoint $(MODEL) --out $(EVAL)/default.json
	$(HELDOUT) --checkpoint $(MODEL) --identity-base 400000 --speaker-base 450000 --content-base 40000000 \
		--out $(EVAL)/second-set.json
	$(HELDOUT) --checkpoint $(MODEL) --photo examples/astronaut.jpg --out $(EVAL)/astronaut.json
	$(HELDOUT) --checkpoint $(MODEL) --photo examples/astronaut.jpg --photo-framing face --out $(EVAL)/astronaut-face.json
	$(HELDOUT) --checkpoint $(MODEL) --no-paste-back --out $(EVAL)/paste-back-off.json
	$(HELDOUT) --checkpoint $(MODEL) --speech espeak --out $(EVAL)/espeak.json
	$(HELDOUT) --checkpoint $(MODEL) --step-plan 4 --out $(EVAL)/psb-off.json
	$(HELDOUT) --checkpoint $(MODEL) --t-mci 0 --out $(EVAL)/mci-off-inference.json
	$(PY) -m model.eval.heldout --checkpoint $(MODEL) --clips 1 --seconds 600 --no-references --out $(EVAL)/urcr-10min.json
	$(PY) -m model.eval.heldout --checkpoint $(MODEL) --clips 1 --seconds 600 --no-references --no-urcr --out $(EVAL)/no-urcr-10min.json
	$(PY) -m model.eval.drift_plot $(EVAL)/urcr-10min.json $(EVAL)/no-urcr-10min.json --label "URCR on" --label "URCR off" --out docs/img/drift_urcr.png
	$(PY) -m model.eval.results_table $(EVAL)/*.json

# The rows of a training run's intermediate models (the bidirectional teacher, the causal student before distillation).
# They are not shipped: `make train-tiny` writes them into $(RUN) (about 3.6 h of stage time on 2 cores).
eval-tiny-stages: install
	@test -d $(RUN)/teacher_model -a -d $(RUN)/student_model || { echo "$(RUN)/teacher_model and $(RUN)/student_model \
	come from a training run: run 'make train-tiny' first, or pass RUN=<a model.train.recipe --out directory>"; exit 1; }
	$(PY) -m model.train.teacher --clips 4 --seconds 12 --checkpoint $(RUN)/teacher_model --steps 32 --out $(EVAL)/teacher-32-steps.json
	$(HELDOUT) --checkpoint $(RUN)/student_model --step-plan 16 --out $(EVAL)/student-16-euler-steps.json
	$(PY) -m model.eval.results_table $(EVAL)/*.json

# The MCI-off training ablation: the same VAE and teacher, student and DMD trained with clean context (t_mci = 0).
ablation-mci-off: install
	$(PY) -m model.train.recipe --out $(RUN)-mci-off --reuse $(RUN) --mci-off --threads 2 --ship-to ''
	$(HELDOUT) --checkpoint $(RUN)-mci-off/final_model --out $(EVAL)/mci-off-training.json
	$(PY) -m model.eval.heldout --checkpoint $(RUN)-mci-off/final_model --clips 1 --seconds 600 --no-references --out $(EVAL)/mci-off-training-10min.json

bench-long: install
	$(PY) benchmarks/long_render.py

bench-pipeline: install
	$(PY) benchmarks/pipeline_throughput.py

bench-service: install
	$(PY) benchmarks/service_load.py

bench-gpu: install
	$(PY) benchmarks/gpu_throughput.py

# One render actor at 1, 2, 4, 8 rows in flight (the bundled model, this machine): docs/performance.md.
bench-batching: install
	$(PY) benchmarks/actor_batching.py --rows 8 --seconds 4 --batch 1,2,4,8 --out docs/perf/cpu-actor-batching.json
	$(PY) benchmarks/actor_batching.py --rows 8 --seconds 4 --batch 1,2,4,8 --overlap on \
		--out docs/perf/cpu-actor-batching-overlap.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
