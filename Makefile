PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# pip install with retries: a dropped download of a large wheel must not fail CI.
PIP_INSTALL := bash tools/pip_retry.sh $(PY)

.PHONY: venv test demo explain bench-gpu clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -q --upgrade pip
	$(PIP_INSTALL) -q "$(TORCH_SPEC)"
	$(PIP_INSTALL) -q -e '.[test]'
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
