# Everything a fresh machine needs: `make test` and `make bench` create .venv, install the local
# CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package with its extras, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= bench-out

.PHONY: setup test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/longattn bench --suite kernels --out $(OUT)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
