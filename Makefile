PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo explain bench-gpu clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

test: $(VENV)/.stamp
	$(PY) -m pytest -q -m "not cuda and not multigpu" tests

demo: $(VENV)/.stamp
	$(PY) -m fx_mla demo

explain: $(VENV)/.stamp
	$(PY) -m fx_mla explain

clean:
	rm -rf $(VENV)
