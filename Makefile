# The project's two commands: `make demo` and `make test`. Both create the
# virtualenv and install what is missing, so they work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages whose commands the tests use as independent judges or peers, and the peers and
# load generators the benchmarks measure against (the suite runs `make bench QUICK=1`'s harness).
DEB_TOOLS := openssl:openssl mosquitto:mosquitto mosquitto_pub:mosquitto-clients certtool:gnutls-bin \
             ocsptool:gnutls-bin curl:curl cfssl:golang-cfssl wrk:wrk testssl:testssl.sh chromium:chromium \
             systemd-analyze:systemd promtool:prometheus prometheus-blackbox-exporter:prometheus-blackbox-exporter
BENCH_STAMP := $(VENV)/.bench-installed
DEMO_DIR ?= demo-data

.PHONY: test demo bench fuzz screenshots deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Install the missing Debian tools when we may (root); otherwise say what is missing.
deps:
	@missing=""; for pair in $(DEB_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages (run as root or install them):$$missing"; fi; \
	fi

# two workers, each taking whole test files (module fixtures stay per file): the suite waits on
# servers, brokers and subprocesses much of the time, so 2 cores run it in about 60% of the time
PYTEST_ARGS ?= -n 2 --dist loadfile
test: venv deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv deps
	$(PY) -m cli.demo --dir $(DEMO_DIR)

# QUICK=1: small sizes, under 2 minutes (what the test suite runs)
bench: venv deps $(BENCH_STAMP)
	$(PY) -m bench.run $(if $(QUICK),--quick)

# every fuzz target under atheris for FUZZ_SECONDS each (default 60), then the seeded wire run:
# mutated requests against a real `iomtca serve` (FUZZ_REQUESTS, default 100000)
FUZZ_SECONDS ?= 60
FUZZ_REQUESTS ?= 100000
fuzz: venv deps
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)
	$(PY) -m fuzz.wire --requests $(FUZZ_REQUESTS)

# the console's pages as the browser test sees them, into docs/CONSOLE.md's pictures
screenshots: venv deps
	IOMTCA_SCREENSHOTS=$(CURDIR)/docs/console $(PY) -m pytest -q -p no:cacheprovider tests/console/test_console_browser.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .hypothesis
