PYTHON ?= .venv/bin/python
MOUNTPOINT ?= /run/encidfs

.PHONY: install install-test mount umount test test-fast bench
install: .venv/.installed
install-test: .venv/.installed-test

.venv/.installed: pyproject.toml scripts/install.sh
	scripts/install.sh
	touch $@

.venv/.installed-test: pyproject.toml scripts/install.sh
	scripts/install.sh --test
	touch $@ .venv/.installed

# Mounts encidfs with its default configuration (sev: 509 IDs, sev_es: 99).
mount: install
	mkdir -p $(MOUNTPOINT)
	.venv/bin/encidfs mount $(MOUNTPOINT)
	@echo "Try:  export PATH=$(CURDIR)/.venv/bin:\$$PATH"
	@echo "      cat $(MOUNTPOINT)/encids.sev.stat"
	@echo "      echo +encids > $(MOUNTPOINT)/cgroup.subtree_control; mkdir $(MOUNTPOINT)/vm1"
	@echo "      echo 4 > $(MOUNTPOINT)/vm1/encids.sev.max; echo \$$\$$ > $(MOUNTPOINT)/vm1/cgroup.procs"
	@echo "      encidfs run --type sev -- sleep 100 &  cat $(MOUNTPOINT)/vm1/encids.sev.current"
	@echo "Unmount with: make umount"

umount:
	.venv/bin/encidfs umount $(MOUNTPOINT)

# Lint and type checks first: they take seconds, the tests minutes.
test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q

# The quick loop: no mount (no root, no FUSE needed) and nothing that takes seconds.
test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow and not mount"

# Baselines measured beside today's: the release before one request loop and group commits
# (issue #12).  LXCFS is measured too where it is installed (apt-get install lxcfs).
BASELINES ?= eaec08b
bench: install
	$(PYTHON) scripts/bench.py $(addprefix --baseline ,$(BASELINES))
