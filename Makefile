# make test / make demo work on a fresh machine: each creates .venv if missing and installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
JOBS    ?= 2

.PHONY: test demo venv clean test-fast arm-check

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[compile,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m models.demo

# Train an x86-compiled artifact under emulated aarch64 (shared/arm; cached in .cache/aarch64) and compare
# losses with x86 (rtol 1e-4). Skips with the reason, exit 0, where the emulator cannot be built.
arm-check: $(STAMP)
	$(BIN)/python -m tests.runtime.arm_check

clean:
	rm -rf $(VENV) out .pytest_cache
