# xlb: demo, demo-ha, test, bench and lab-up set up what is missing first (scripts/setup.sh is
# idempotent); unit needs no root, so it takes the .venv that one of them made.
VENV := .venv
PY   := $(VENV)/bin/python

.PHONY: setup demo demo-ha test unit bench lab-up lab-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash netns-lab/demo.sh

# An active/backup pair (keepalived) failing over while a client runs.
demo-ha: setup
	@bash netns-lab/ha-demo.sh

# Every test, and every one must run: a missing prerequisite (root, promtool,
# prometheus, the dashboard SDK) fails the run instead of skipping (tests/conftest.py).
test: setup
	XLB_REQUIRE_ALL=1 $(PY) -m pytest -ra tests

# Tests that need no kernel, namespace or lab (model, config, scheduler, planner,
# Maglev, metrics text, ...): no root needed; tests whose tools are missing are skipped.
unit:
	@[ -x $(PY) ] || { echo "make unit: no $(PY): run 'make setup' (as root) first" >&2; exit 1; }
	$(PY) -m pytest -ra -m "not kernel and not netns and not lab" tests

bench: setup
	$(PY) netns-lab/bench.py
	$(PY) netns-lab/bench_health.py

lab-up: setup
	@bash netns-lab/lab.sh up

lab-down:
	@bash netns-lab/lab.sh down

clean: lab-down
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis build
