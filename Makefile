# The README's two commands: `make demo` (install + run the main job) and `make test` (install + lint/types + tests).
# TORCH_SPEC pins the PyTorch build that this project is tested with; override it for another one,
# e.g. `make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo test lint docs install install-test clean

demo: $(VENV)/.installed
	$(BIN)/deconvnet demo --out out/demo

test: lint docs
	$(BIN)/python -m pytest -q

# lint and types (settings in pyproject.toml); `make test` runs this first, so CI does too
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy deconvnet

# the documentation site (mkdocs.yml): docs/*.md and the API reference from the docstrings, built
# strictly (a broken link or reference fails); `make test` runs it, so CI does too. Output: site/
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "docs: $(CURDIR)/site/index.html (open it in a browser; or $(BIN)/mkdocs serve, then http://127.0.0.1:8000)"

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[all]"  # every optional part (README: extras), so the README's commands run everything
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) out
