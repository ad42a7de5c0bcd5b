# Two commands do everything: `make run` (the main job) and `make test`.
# Both create or reuse the project-local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines take the CPU wheel of torch; set TORCH_SPEC="torch" on a GPU node.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,hf]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# the demo starts over each time: --overwrite replaces runs/default's checkpoints and logs
run: $(STAMP)
	$(VENV)/bin/distattn train configs/default.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs outputs
