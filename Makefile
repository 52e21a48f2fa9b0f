# `make test` and `make demo` set up .venv on first use (torch comes from the machine's wheel store via pip).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: test demo setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) demo.py --output_dir demo_output

clean:
	rm -rf demo_output .pytest_cache
