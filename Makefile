# Two commands matter: `make demo` (set up a local cluster and run an image on it)
# and `make test` (the test suite). Both install what they need on Debian 12/13.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv python3-dev gcc make util-linux mount procps \
	squashfs-tools-ng squashfs-tools zstd umoci skopeo docker-registry \
	slurm-wlm slurmctld slurmd libslurm-dev munge curl busybox-static
PYTEST_ARGS ?=

.PHONY: all deps venv plugin proto test demo demo-stop clean

all: venv plugin

deps: .deps-stamp
.deps-stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml .deps-stamp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

plugin: .deps-stamp
	$(MAKE) -C plugin

proto: venv
	$(PY) scripts/protogen.py

test: venv plugin
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv plugin
	scripts/demo.sh start

demo-stop:
	scripts/demo.sh stop

clean:
	$(MAKE) -C plugin clean
	rm -rf $(VENV) .deps-stamp build *.egg-info daemon/*.egg-info
