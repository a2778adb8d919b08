# tf-limaml: every install step lives here, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 3
# Test processes (pytest-xdist). A test file stays on one process, so its
# module fixtures are built once; two fit the 2-core CI machine.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-slow test-all demo demo-synthetic bench lint clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[beam,serving,report,test,dask]"
	# MovieLens-100K ships inside this wheel; --no-deps keeps torch out.
	$(PY) -m pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

install: $(STAMP)

## Fast suite (the CI gate): everything but the end-to-end tests marked slow.
test: install
	$(PYTEST) -m "not slow" --durations=10

## The slow end-to-end tests, less the heavy ones (wheel install): CI runs this after `test`.
test-slow: install
	$(PYTEST) -m "slow and not heavy" --durations=10

test-all: install
	$(PYTEST) --durations=20

## The main job: MovieLens-100K end to end, report in runs/demo/.
demo: install
	$(VENV)/bin/limaml demo

demo-synthetic: install
	$(VENV)/bin/limaml demo --dataset synthetic

bench: install
	@for b in bench/meta_train.py bench/startup.py bench/train_memory.py bench/serving.py bench/soak.py bench/make_tasks.py bench/large_ids.py; do \
	  if [ -f $$b ]; then echo "== $$b"; $(PY) $$b || exit 1; fi; done

## black + ruff, as pyproject.toml configures them.
lint: install
	$(PY) -m pip install -q black ruff
	$(PY) -m black --check tf_limaml beam_pipelines serving bench tests setup.py
	$(PY) -m ruff check tf_limaml beam_pipelines serving bench tests examples

clean:
	rm -rf runs .pytest_cache build *.egg-info
