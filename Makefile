# Two commands do all set-up:  `make app` (the Streamlit app) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup app test test-fast browser bench clean

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Debian's chromium for the end-to-end browser test (never a Playwright browser download).
browser:
	@test -x $(CHROMIUM) || { apt-get update && apt-get install -y --no-install-recommends chromium; }

app: $(STAMP)
	$(VENV)/bin/streamlit run streamlit_app.py

test: $(STAMP) browser
	$(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/dp_step.py

clean:
	rm -rf $(VENV) .pytest_cache
