# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA build also runs on CPUs; these exact releases install offline on our machines.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The slide viewer's browser library (OpenSeadragon), pinned by its lockfile, served locally.
VENDOR := src/histodetect/service/web/vendor

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml Makefile $(VENDOR)/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import histodetect.cli, torch, torchvision, timm, lightning, kornia"
	if command -v npm >/dev/null 2>&1; then npm ci --prefix $(VENDOR) --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: histodetect view will say that OpenSeadragon is missing"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/histodetect demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/deptry src
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/pack.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
