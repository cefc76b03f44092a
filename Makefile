# Two commands matter: `make demo` (set up a local cluster and run an image on it)
# and `make test` (the test suite). Both install what they need on Debian 12 (Slurm 22.05),
# Debian 13 (Slurm 24.11) and Debian unstable (Slurm 26.05); `make test-matrix` checks all three.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
# Python dependencies come from Debian too: the same versions on every machine
# of a release (and what distribution packages of this project would use).
APT_PACKAGES := python3-venv python3-dev gcc libc6-dev make util-linux mount procps \
	squashfs-tools-ng squashfs-tools zstd isal pigz umoci skopeo docker-registry \
	slurm-wlm slurmctld slurmd libslurm-dev munge curl busybox-static \
	python3-requests python3-filelock python3-zstandard python3-grpcio python3-protobuf \
	python3-prometheus-client python3-yaml python3-setuptools python3-wheel \
	python3-pytest python3-cryptography python3-bcrypt \
	protobuf-compiler protobuf-compiler-grpc file groff-base rpm mpich libmpich-dev \
	strace
PYTEST_ARGS ?=

.PHONY: all deps venv plugin proto man contract rpm test test-matrix demo demo-stop clean

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
# The venv sees Debian's packages; pip only links this project in, offline.
$(VENV)/.installed: setup.cfg pyproject.toml .deps-stamp
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	@touch $@

plugin: .deps-stamp
	$(MAKE) -C plugin

proto: .deps-stamp
	$(PYTHON) scripts/protogen.py

# docs/man/ from the argparse parsers and the plugin's option table (a test
# fails when the committed pages are stale)
man:
	$(PYTHON) scripts/manpages.py

# plugin/options_gen.h, the README's and docs/configuration.md's tables and docs/man from
# daemon/ociimage/contract.py and configkeys.py (tests/test_contract.py: they are fresh)
contract:
	$(PYTHON) scripts/gencontract.py

# The RPM, from the working tree (tracked and untracked-but-not-ignored files),
# into build/rpm/ (RPMS/, SRPMS/). RPMBUILD_FLAGS: e.g. --define 'slurm_include /opt/slurm/include'.
# Where the rpm database does not know slurm-devel & co. (Debian), BuildRequires are not checked.
RPM_TOPDIR ?= $(CURDIR)/build/rpm
RPMBUILD_FLAGS ?= $(if $(wildcard /etc/debian_version),--nodeps)
rpm:
	packaging/rpm/build.sh "$(RPM_TOPDIR)" $(RPMBUILD_FLAGS)

test: venv plugin
	$(PY) -m pytest $(PYTEST_ARGS)

# The README's two commands on a fresh Debian 12, 13 and unstable system each: a clean clone
# of the committed HEAD in a new chroot (../shared/tools/fresh-debian), one release after the
# other. Logs: $(MATRIX_DIR)/<suite>.log (the demo's output and pytest's summary at the end);
# the squeue --json each release's cluster printed: $(MATRIX_DIR)/<suite>/out/ (what
# tests/data/squeue-*-recorded.json are). Fails if any release fails.
FRESH_DEBIAN ?= ../shared/tools/fresh-debian
MATRIX_SUITES ?= bookworm trixie sid
MATRIX_DIR ?= /var/tmp/oci-image-matrix
MATRIX_CMD ?= make demo && make demo-stop && OCI_SAVE_SQUEUE_JSON=/root/matrix-out make test
test-matrix:
	@mkdir -p $(MATRIX_DIR); failed=; \
	for s in $(MATRIX_SUITES); do \
		echo "== $$s: $(MATRIX_CMD)"; \
		FRESH_SUITE=$$s FRESH_DIR=$(MATRIX_DIR)/$$s $(FRESH_DEBIAN) \
			'mkdir -p /root/matrix-out && $(MATRIX_CMD)' >$(MATRIX_DIR)/$$s.log 2>&1; rc=$$?; \
		mkdir -p $(MATRIX_DIR)/$$s/out; cp $(MATRIX_DIR)/$$s/root/root/matrix-out/* $(MATRIX_DIR)/$$s/out/ 2>/dev/null; \
		grep -E '^(node n[0-9]|[0-9]+: node )|^=+ .*(passed|failed|error).* in ' $(MATRIX_DIR)/$$s.log | tail -n 5; \
		echo "== $$s: exit status $$rc (log: $(MATRIX_DIR)/$$s.log)"; \
		[ $$rc = 0 ] || failed="$$failed $$s"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-matrix failed on:$$failed"; exit 1; fi

demo: venv plugin
	scripts/demo.sh start

demo-stop:
	scripts/demo.sh stop

clean:
	$(MAKE) -C plugin clean
	rm -rf $(VENV) .deps-stamp build *.egg-info daemon/*.egg-info
