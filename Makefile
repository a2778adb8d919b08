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
# The docs tools live in their own venv: they need neither TensorFlow nor Beam
# (mkdocstrings reads the docstrings statically), and the same constraints.txt
# pins them, so they cannot drift from the project's shared pins.
DOCS_VENV := .venv-docs
DOCS_PY := $(DOCS_VENV)/bin/python
DOCS_STAMP := $(DOCS_VENV)/.installed-stamp
DOCS_PACKAGES := mkdocs mkdocs-material "mkdocstrings[python]"
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test test-slow test-all demo demo-synthetic bench bench-peers lint clean docs docs-install docs-serve docs-results

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

## The step against hand-written JAX and torch.func MAML (bench/peers.py). The
## peers live in their own venv, so the main one never gets jax or torch.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp

$(PEERS_STAMP):
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q "jax[cpu]" optax torch numpy  # setup.py extra "peers"
	touch $(PEERS_STAMP)

bench-peers: install $(PEERS_STAMP)
	$(PY) bench/peers.py --peer-python $(PEERS_VENV)/bin/python

## The docs site: mkdocs build --strict into site/ (CI runs it; a broken link, an
## unknown API name or a missing measured record fails it).
$(DOCS_STAMP): constraints.txt
	test -x $(DOCS_PY) || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_PY) -m pip install -q --upgrade pip
	$(DOCS_PY) -m pip install -q -c constraints.txt $(DOCS_PACKAGES)
	touch $(DOCS_STAMP)

docs-install: $(DOCS_STAMP)

docs: docs-install
	$(DOCS_PY) -m mkdocs build --strict

docs-serve: docs-install
	$(DOCS_PY) -m mkdocs serve -a 127.0.0.1:8000

## Copies the last `make demo` table into docs/results/movielens/, which the
## MovieLens page reads (runs/ is not committed; the copy is).
docs-results:
	test -f runs/demo/README_table.md || { echo "runs/demo/README_table.md is missing: run make demo first"; exit 1; }
	mkdir -p docs/results/movielens
	cp runs/demo/README_table.md docs/results/movielens/README_table.md
	if [ -f runs/demo/report.json ]; then cp runs/demo/report.json docs/results/movielens/report.json; fi
	printf '{"note": "", "source": "runs/demo (make demo), copied by make docs-results"}\n' > docs/results/movielens/provenance.json

## black + ruff, as pyproject.toml configures them.
lint: install
	$(PY) -m pip install -q black ruff
	$(PY) -m black --check tf_limaml beam_pipelines serving bench tests setup.py
	$(PY) -m ruff check tf_limaml beam_pipelines serving bench tests examples

clean:
	rm -rf runs .pytest_cache build *.egg-info site
