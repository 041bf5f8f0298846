# Set-up commands. Each works on a fresh machine with nothing but Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Debian's Chromium, for the browser test (tests/test_browser.py, driven by Playwright; no browser download)
CHROMIUM ?= /usr/bin/chromium
# processes the suite runs on (`make test`; pytest-xdist's -n: auto is one per core)
TEST_WORKERS ?= auto
# the model `make lab` opens the notebooks on
CLIPSCOPE_MODEL ?= organism
# the model `make demo` runs the main job on (organism-vit: the ViT organism)
DEMO_MODEL ?= organism

.PHONY: demo test wheel-check bench install chromium lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-installs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -m pip freeze --exclude-editable > $(VENV)/requirements-ran.txt
	@touch $@

install: $(VENV)/.installed

# Installs Debian's chromium when it is absent, quietly, if apt-get exists and we are root;
# otherwise says why and goes on (the browser test is then skipped with the reason).
chromium:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: $(CHROMIUM) not found and no apt-get here: the browser test will be skipped"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note: $(CHROMIUM) not found and not root (run: sudo apt-get install chromium): the browser test will be skipped"; \
	else \
	  echo "installing Debian's chromium for the browser test (apt-get)..."; \
	  log=$$(mktemp); \
	  if DEBIAN_FRONTEND=noninteractive apt-get update -qq >$$log 2>&1 && \
	     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >>$$log 2>&1; \
	  then echo "installed $$($(CHROMIUM) --version 2>/dev/null)"; \
	  else tail -n 5 $$log; echo "note: apt-get could not install chromium: the browser test will be skipped"; fi; \
	  rm -f $$log; \
	fi

## make demo: install, then run the main job on the built-in model organism (DEMO_MODEL=organism-vit: the ViT one)
demo: install
	$(PY) -m clipscope demo --model $(DEMO_MODEL) --out clipscope-demo

## make test: install (Python packages, and Chromium for the browser test), then run the whole suite (prints its duration)
## on TEST_WORKERS processes (pytest-xdist; default auto: one per core, at most 8; TEST_WORKERS=0 runs it in this process)
test: install chromium
	@start=$$(date +%s); \
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 8; status=$$?; \
	echo "suite time: $$(( $$(date +%s) - start )) s"; \
	exit $$status

## make wheel-check: build the sdist and, from it, the wheel; install the wheel alone into a fresh venv that takes
## its dependencies from $(VENV) (a .pth file; clipscope only from the wheel); run `clipscope demo` outside the checkout
wheel-check: install
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; log="$$tmp/log"; venv="$$tmp/venv"; \
	fail() { echo "wheel-check: $$1"; tail -n 20 "$$log"; exit 1; }; \
	$(PY) -m build --no-isolation -o "$$tmp/dist" . >"$$log" 2>&1 || fail "the build failed"; \
	$(PY) -m venv --without-pip "$$venv"; \
	purelib='import sysconfig; print(sysconfig.get_path("purelib"))'; \
	$(PY) -c "$$purelib" >"$$("$$venv/bin/python" -c "$$purelib")/clipscope-deps.pth"; \
	$(PY) -m pip --python "$$venv/bin/python" install --quiet --no-deps --no-index "$$tmp"/dist/*.whl; \
	mkdir "$$tmp/run"; cd "$$tmp/run"; unset PYTHONPATH; \
	where=$$("$$venv/bin/python" -c 'import clipscope; print(clipscope.__file__)'); \
	case "$$where" in "$$venv/"*) ;; *) echo "wheel-check: clipscope came from $$where, not the wheel"; exit 1;; esac; \
	echo "wheel-check: $$(basename "$$tmp"/dist/*.whl): $$("$$venv/bin/clipscope" --version) from $$where"; \
	"$$venv/bin/clipscope" demo --out report --steps 8 >"$$log" 2>&1 || fail "clipscope demo failed"; \
	for f in index.html atlas/index.html attack/index.html audit/report.html; do \
	  test -s "report/$$f" || fail "report/$$f is missing"; done; \
	echo "wheel-check: \`clipscope demo\` ran outside the checkout and wrote its report ($$(tail -n 1 "$$log" | cut -d';' -f1))"

## make lab: install, then start JupyterLab on notebooks/ (CLIPSCOPE_MODEL defaults to organism; LAB_ARGS="--no-browser --port 8889" for more)
lab: install
	CLIPSCOPE_MODEL=$(CLIPSCOPE_MODEL) $(PY) -m jupyterlab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## make bench: print the benchmark figures (not part of the tests)
bench: install
	$(PY) bench/hook_overhead.py
	$(PY) bench/typographic_throughput.py
	$(PY) bench/optvis_vs_lucent.py --models RN50 organism --units 1 8 --steps 8 --repeats 2 --quality
	$(PY) bench/audit_cache.py
	$(PY) bench/mining_throughput.py
	$(PY) bench/image_loading.py
	$(PY) bench/attribution_cost.py
	$(PY) bench/text_encoding.py
	$(PY) bench/site_discovery.py
	$(PY) bench/load_memory.py
	$(PY) bench/head_capture.py
	$(PY) bench/endpoint_throughput.py
	$(PY) bench/sae_training.py
	$(PY) bench/sae_capture.py
	$(PY) bench/distributed_mining.py
	$(PY) bench/distributed_eval.py

clean:
	rm -rf $(VENV) clipscope-demo .pytest_cache test-artifacts
