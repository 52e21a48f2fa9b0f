# `make test`, `make demo` and `make lint` create .venv on first use and pip-install the pinned packages
# (torch and torchvision from PyPI like the rest); `make lint` adds the development tools.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1

.PHONY: test demo lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PIP) -r requirements-dev.txt
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) demo.py --output_dir demo_output

lint: $(VENV)/.installed-dev
	$(PYTHON) -m ruff check .

clean:
	rm -rf demo_output .pytest_cache
