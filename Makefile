# `make demo` and `make test` build the environment in .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sinq-env-stamp
ENV_INPUTS := requirements/cpu.txt requirements/test.txt requirements/assets.txt scripts/setup_env.sh \
              setup.py build_ext_config.py $(wildcard csrc/cpu/*)

.PHONY: env demo test bench clean-env

env: $(STAMP)

$(STAMP): $(ENV_INPUTS)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/demo.py

test: $(STAMP)
	$(VENV)/bin/pytest -ra

clean-env:
	rm -rf $(VENV)
