# Two commands do all the set-up on a fresh Debian machine, as root:
#   make demo   installs what is missing, then mounts a repository and reads it
#   make test   installs the same, then runs every test
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup demo test bench bench-git bench-walks bench-packs bench-fleet bench-history bench-ready clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py $(if $(REPO),--remote $(REPO))

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench.py $(if $(REPO),--remote $(REPO)) $(BENCH_ARGS)
	$(PY) bench/git_in_mount.py $(BENCH_GIT_ARGS)
	$(PY) bench/walks.py $(BENCH_WALKS_ARGS)
	$(PY) bench/packs.py $(BENCH_PACKS_ARGS)
	$(PY) bench/fleet.py $(BENCH_FLEET_ARGS)
	$(PY) bench/history.py $(BENCH_HISTORY_ARGS)
	$(PY) bench/ready.py $(BENCH_READY_ARGS)

bench-git: setup
	$(PY) bench/git_in_mount.py $(BENCH_GIT_ARGS)

bench-walks: setup
	$(PY) bench/walks.py $(BENCH_WALKS_ARGS)

bench-packs: setup
	$(PY) bench/packs.py $(BENCH_PACKS_ARGS)

bench-fleet: setup
	$(PY) bench/fleet.py $(BENCH_FLEET_ARGS)

bench-history: setup
	$(PY) bench/history.py $(BENCH_HISTORY_ARGS)

bench-ready: setup
	$(PY) bench/ready.py $(BENCH_READY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
