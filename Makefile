# Two commands on a fresh machine: `make demo` and `make test` (each installs first if needed).
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
BIN         := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
SHARED      ?= ../shared
STAMP       := $(VENV)/.fedbridge-installed

# Real ImageNet weights usable offline, when the team folder is present.
ifneq ($(wildcard $(SHARED)/weights/*.safetensors),)
export FEDBRIDGE_WEIGHTS_DIR ?= $(abspath $(SHARED)/weights)
endif
# The demo runs on real chest X-rays when present, else on a generated SYNTHETIC phantom set.
ifneq ($(wildcard $(SHARED)/data/cxr),)
DEMO_DATA ?= --data $(SHARED)/data/cxr
# ... bridged on the large public Kermany set (3 classes; the target's COVID19 row starts fresh)
ifneq ($(wildcard $(SHARED)/data/bridge/cxr),)
DEMO_DATA += --bridge-data $(SHARED)/data/bridge/cxr
endif
endif
DEMO_ARGS ?= --quick $(DEMO_DATA) --out runs/demo

.PHONY: install system-packages demo test test-fast lint format clean bench bench-quick

# The tiers (markers in pyproject.toml, set by tests/conftest.py from each test's folder):
# `make test` runs everything, as CI does; `make test-fast` skips e2e, slow, netns, browser, pacs.
FAST        := not e2e and not slow and not netns and not browser and not pacs and not gpu

install: $(STAMP)

# Debian packages the coordinator and the tests need, installed when missing and apt-get can:
# nginx keeps Flower's Control API off the sites' network (server/fedbridge_server/front.py);
# chromium opens the HTML report and the explain index in tests/e2e/test_browser.py;
# orthanc (the PACS), dcmtk (storescu, the modality) and dicom3tools (dciodvfy) test
# `edge listen` in tests/edge/test_listen_pacs.py.
system-packages:
	@missing=""; \
	{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || missing="$$missing nginx-light"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium fonts-dejavu-core"; \
	{ command -v Orthanc >/dev/null 2>&1 || test -x /usr/sbin/Orthanc; } || missing="$$missing orthanc"; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	test -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc || missing="$$missing fonts-noto-cjk"; \
	test -f /usr/share/fonts/truetype/noto/NotoSansArabic-Regular.ttf || missing="$$missing fonts-noto-core"; \
	test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || missing="$$missing fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "install$$missing (Debian: apt-get install$$missing) for server start and the tests" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(PY) -m pip check
	touch $(STAMP)

demo: install
	$(BIN)/fedbridge demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint system-packages
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "$(FAST)" --durations=25 $(PYTEST_ARGS)

# Benchmarks (issue #6): scripts under bench/, JSON in bench/results/, then BENCHMARKS.md.
bench: install
	BENCH_MAKE_TARGET=bench $(PY) -m bench.run

bench-quick: install
	BENCH_MAKE_TARGET=bench-quick $(PY) -m bench.run --quick

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
