# Three targets for users: install, serve, test. Each is idempotent and quick when nothing changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test

install: $(STAMP)

# Re-installs only when the dependency list changes; the project itself is installed editable.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (e.g. pyenv install 3.11)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	@bash scripts/install-browser.sh || echo "note: Chromium not installed; the browser test will skip (see README)"
	touch $(STAMP)

serve: install
	$(BIN)/fashion serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
