# Two entry points: `make demo` runs the main experiment on the CPU, `make test` runs the tests.
# Both create .venv on first use. The venv sees the system's packages, so a machine that already has
# torch (a GPU build, say) keeps it; elsewhere the CPU build torch==2.13.0 is installed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.ablate

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun
