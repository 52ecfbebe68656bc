# The two set-up commands: `make demo` and `make test`. Each creates .venv, installs the
# Debian headers the C parts need, installs the package with its extras, builds the guest and runs.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Headers and libraries the cffi extensions link against (the page server decompresses in C).
APT_PKGS  := liblz4-dev libzstd-dev libxxhash-dev libseccomp-dev
BUILD_DEPS := pyproject.toml setup.py $(wildcard vmm/*_build.py vmm/jail/_build.py vmm/jail/*.[ch] snapd/*_build.py vmm/guest/*.c vmm/guest/*.h vmm/guest/*.S vmm/guest/*.ld vmm/guest/Makefile snapd/csrc/*)

.PHONY: demo test test-fast bench system-deps guest clean

demo: $(STAMP)
	$(VENV)/bin/snapd demo

# Everything, including the suites marked slow (a real Linux kernel boot, large clone counts).
test: $(STAMP)
	$(VENV)/bin/pytest -q -m 'slow or not slow'

# Without the slow suites: seconds, for the edit-test loop.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) -m bench

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

guest:
	$(MAKE) -C vmm/guest

$(STAMP): $(BUILD_DEPS)
	$(MAKE) system-deps
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(MAKE) -C vmm/guest
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info vmm/_kvm_native*.so vmm/jail/_native*.so snapd/_uffd_native*.so snapd/_lane_native*.so
	$(MAKE) -C vmm/guest clean
