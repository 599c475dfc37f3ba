# The two commands of the README. Both create .venv and install what they need on a fresh machine:
# torch first through constraints.txt (the CPU build on this machine's disk), then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= $(abspath ../shared/data)
export CHARLSTM_DATA ?= $(if $(wildcard $(DATA)),$(DATA),)

.PHONY: setup demo test test-fast test-reliability lint bench clean base-ru base-en

$(BIN)/charlstm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/charlstm

# Train on Byron's poems (the lab's corpus) for at most 2 minutes, as a new user would (the plain
# command: it starts from the Russian base model), then print three poems.
demo: setup
	$(BIN)/charlstm train --dataset byron-ru --out runs/byron --force --max-time 120
	$(BIN)/charlstm generate runs/byron --start-text "Мне " --temperature 0.5 --length 600 \
		--num-samples 3 --seed 7 --max-stanzas 2

# Every test (the README's command).
test: setup
	$(BIN)/python -m pytest -q

# The fast tier, to run after every edit: no test marked slow (training for more than a moment, a
# subprocess, a browser) and none of the reliability suite; under a minute on 2 cores.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not reliability"

test-reliability: setup
	$(BIN)/python -m pytest -q -m reliability

# What CI checks before the tests: ruff's rules (pyproject.toml [tool.ruff]) and its formatting.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rebuild a shipped base model from its named datasets (the collection is downloaded and checked the
# first time, the base corpus built and cached; about 80 minutes of 2 cores), then export it into
# the package. Pin the sha256 and size it prints in src/charlstm/runs/bases.py. The Russian base
# has a second phase on base-ru-verse (configs/base-ru-verse.toml says why). A base is the end of
# its fixed schedule (last/): the second phase's own validation split (104 k characters of Boris
# Godunov and Blok) ranked its step 250 first, while the held-out tail of base-ru, which no phase
# trained on, ranks the last step better (1.4462 nats/char against 1.4487).
base-ru: setup
	$(BIN)/charlstm train --config configs/base-ru.toml --out runs/base-ru-1 --force
	$(BIN)/charlstm train --config configs/base-ru-verse.toml --init-from runs/base-ru-1 \
		--out runs/base-ru --force
	$(BIN)/charlstm export runs/base-ru --format base --which last --out src/charlstm/bases/ru --force

base-en: setup
	$(BIN)/charlstm train --config configs/base-en.toml --out runs/base-en --force
	$(BIN)/charlstm export runs/base-en --format base --which last --out src/charlstm/bases/en --force

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
