# Two entry points (see README): `make demo` and `make test`. Both install what they
# need first and are fast when everything is already there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages: runtime libraries and the real components the tests talk to (JACK, Pd,
# liblo's oscsend, Chromium for the control page); benchmarks install the recorded sound they use.
APT_PACKAGES := libsndfile1 libportaudio2 jackd2 libjack-jackd2-0 puredata-core liblo-tools chromium chromium-driver
DEMO_OUT ?= demo-out

.PHONY: demo test system-deps python-deps clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[train,test]'
	@touch $@

python-deps: $(VENV)/.installed

demo: system-deps python-deps
	$(PY) -m training demo $(DEMO_OUT)

test: system-deps python-deps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
