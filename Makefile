# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian packages the tests use (loop-mounted ext4 and exFAT-through-FUSE stick images, power-cut copies, network namespaces, nginx as an HTTP cache).
TEST_DEBS  := e2fsprogs util-linux mount systemd iproute2 nginx exfat-fuse exfatprogs
# The tools the benchmarks compare against.
BENCH_DEBS := rsync zstd
# Building the Debian package (debian/, scripts/build-deb.sh), and installing it
# into a fresh debootstrap'ed Debian in the package tests (tests/package/).
DEB_BUILD_DEBS := debhelper dpkg-dev python3-venv python3-pip
PACKAGE_TEST_DEBS := $(DEB_BUILD_DEBS) debootstrap

.PHONY: all venv demo test test-long lint bench deb clean

all: test

# -c requirements.lock: the runtime dependencies at exactly the versions the
# Debian package ships (docs/packaging.md); the test tools are not pinned.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	sh scripts/deb-deps.sh $(TEST_DEBS)
	$(BIN)/ruff check harmonicd tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not long"

test-long: venv
	sh scripts/deb-deps.sh $(TEST_DEBS) $(PACKAGE_TEST_DEBS)
	$(BIN)/pytest -q -m long

lint: venv
	$(BIN)/ruff check harmonicd tests benchmarks scripts
	$(BIN)/mypy

bench: venv
	sh scripts/deb-deps.sh $(BENCH_DEBS)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/daemon.py
	$(BIN)/python benchmarks/online.py
	$(BIN)/python benchmarks/schools.py
	$(BIN)/python benchmarks/stick.py

# build/harmonicd_<version>_<arch>.deb (docs/packaging.md).
deb:
	sh scripts/deb-deps.sh $(DEB_BUILD_DEBS)
	sh scripts/build-deb.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
