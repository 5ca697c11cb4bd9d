# Three targets for users: install, serve, test. Each is idempotent and quick when nothing changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev serve test

install: $(STAMP)

install-dev: $(DEV_STAMP)

# What serving, training and export need (the `all` extra, ImageNet weights included). Re-installs only when
# the dependency list changes; the project itself is installed editable.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (e.g. pyenv install 3.11)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# What the tests add: pytest, linters, Helm rendering, and Chromium for the browser test.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	@bash scripts/install-browser.sh || echo "note: Chromium not installed; the browser test will skip (see README)"
	touch $(DEV_STAMP)

serve: install
	$(BIN)/fashion serve $(ARGS)

# Lint and type-check first (seconds), then the suite on TEST_WORKERS processes (pytest-xdist; one test file
# per worker, longest files first, see tests/conftest.py; TEST_WORKERS=0 runs it in this process). Any failure
# fails the target (and CI). The results go to TEST_RESULTS (JUnit XML), where CI checks that every skip is a
# known one (tests/known_skips.txt, docs/testing.md).
TEST_WORKERS ?= 2
TEST_RESULTS ?= build/test-results.xml
test: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--junitxml=$(TEST_RESULTS) $(PYTEST_ARGS)
