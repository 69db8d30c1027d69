# xlb: every entry point sets up what is missing first (scripts/setup.sh is idempotent).
VENV := .venv
PY   := $(VENV)/bin/python

.PHONY: setup demo test unit bench lab-up lab-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash netns-lab/demo.sh

test: setup
	$(PY) -m pytest -ra tests

# Kernel-free tests only (model, scheduler, planner): no root needed.
unit:
	$(PY) -m pytest -ra -m "not kernel and not lab" tests

bench: setup
	$(PY) netns-lab/bench.py
	$(PY) netns-lab/bench_health.py

lab-up: setup
	@bash netns-lab/lab.sh up

lab-down:
	@bash netns-lab/lab.sh down

clean: lab-down
	rm -rf $(VENV) *.egg-info .pytest_cache
