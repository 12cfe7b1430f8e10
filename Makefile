# Two commands do all set-up:  `make app` (the Streamlit app) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup app test test-fast browser bench mutate clean

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
	CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

# Mutation testing of the DP path (README, "Mutation testing"): privacy/, methods.py,
# losses.py and train.py's step code. Slow (hours on 2 cores): run it before a change to
# the DP path lands, not in CI. A subset: make mutate MUTANTS='"dpstudy.losses.*"'
MUTANTS ?= "dpstudy.privacy.*" "dpstudy.methods.*" "dpstudy.losses.*" \
           "dpstudy.train.x__train_epoch*" "dpstudy.train.x__augmented*"
DEV_STAMP := $(VENV)/.installed-dev

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $(DEV_STAMP)

mutate: $(DEV_STAMP)
	$(VENV)/bin/mutmut run $(MUTMUT_ARGS) $(MUTANTS)
	$(VENV)/bin/mutmut results

bench: $(STAMP)
	$(PY) bench/dp_step.py

clean:
	rm -rf $(VENV) .pytest_cache mutants
