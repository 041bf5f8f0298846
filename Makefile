# Set-up commands. Each works on a fresh machine with nothing but Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench install lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-installs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -m pip freeze --exclude-editable > $(VENV)/requirements-ran.txt
	@touch $@

install: $(VENV)/.installed

## make demo: install, then run the main job on the built-in model organism
demo: install
	$(PY) -m clipscope demo --out clipscope-demo

## make test: install, then run the whole suite (prints its duration)
test: install
	@start=$$(date +%s); \
	$(PY) -m pytest; status=$$?; \
	echo "suite time: $$(( $$(date +%s) - start )) s"; \
	exit $$status

## make bench: print the benchmark figures (not part of the tests)
bench: install
	$(PY) bench/hook_overhead.py
	$(PY) bench/typographic_throughput.py
	$(PY) bench/optvis_vs_lucent.py
	$(PY) bench/audit_cache.py

clean:
	rm -rf $(VENV) clipscope-demo .pytest_cache
