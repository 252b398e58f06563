# websockify: the README's commands.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PORT ?= 6080

.PHONY: run test bench conformance install deb clean venv

# The editable install also builds rebind.c in place (websockify/_rebind*.so),
# the library a wrapped program (websockify PORT -- PROGRAM) is started with.
$(VENV)/.installed: setup.py setup.cfg rebind.c
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

## make run: the demo (echo target + websockify with the demo page) on port $(PORT)
run: venv
	$(VPY) -m websockify.demo $(PORT)

## make test: the whole test suite in its own virtualenv; two test files run at
## once (pytest-xdist, a file per process, so module-scoped servers are shared)
TEST_PROCESSES ?= 2
test: venv
	$(VPY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

## make bench: this project against websockify 0.13.0 from PyPI
bench: venv
	$(VPY) scripts/bench $(BENCH_ARGS)

## make conformance: the Autobahn cases (sections 1-10) against websockify --echo,
## with kosoku's HTML reports in reports/conformance
conformance: venv
	$(VPY) scripts/conformance reports/conformance

## make install: the package with its rebind library (needs a C compiler for
## wrapping), and the man pages in $(DESTDIR)$(MANDIR)/man1
PREFIX ?= /usr/local
MANDIR ?= $(PREFIX)/share/man
install:
	$(PYTHON) -m pip install .
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 man/*.1 $(DESTDIR)$(MANDIR)/man1/

## make deb: the Debian package (debian/) built with dpkg-buildpackage in a
## temporary copy of the tree, into dist/deb/; where lintian is installed it
## checks the package, and an error it reports fails the target
DEB_OUT ?= dist/deb
deb:
	$(PYTHON) scripts/build-deb --out $(DEB_OUT) $(if $(shell command -v lintian),--lintian)

clean:
	rm -rf $(VENV) .bench build dist *.egg-info .pytest_cache websockify/_rebind*.so
