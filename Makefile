# Two entry points: `make demo` runs the main experiment on the CPU, `make test` runs the tests.
# Both create .venv on first use. The venv sees the system's packages, so a machine that already has
# torch (a GPU build, say) keeps it; elsewhere the CPU build torch==2.13.0 is installed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean wheels

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m detmoe.experiments.ablate

test: $(STAMP)
	$(PY) -m pytest -q

# hydra and what it needs, as wheels in .whl/ for a GPU machine that has torch but no hydra and no network
# (benchmarks/gpu_checks.sh installs them); pyyaml built for that machine's python (GPU_PYTHON)
GPU_PYTHON ?= 3.12
wheels: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w .whl hydra-core "omegaconf<2.4" hydra-joblib-launcher joblib "antlr4-python3-runtime==4.9.*"
	$(PY) -m pip download -q --no-deps -d .whl pyyaml --python-version $(GPU_PYTHON) --only-binary=:all: \
	  --platform manylinux2014_x86_64

clean:
	rm -rf $(VENV) outputs multirun
