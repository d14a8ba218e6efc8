# `make run` starts the service, `make test` runs the tests; each installs what it needs, once.
PYTHON ?= python3
VENV ?= .venv
LS_VERSION ?= 1.23.2
LS_VENV ?= $(HOME)/.cache/label-studio-sam3/ls-$(LS_VERSION)
PORT ?= 9090

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast docker-test install label-studio-venv browser bench constraints

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Label Studio lives in its own virtualenv: it pins versions the backend does not share.
$(LS_VENV)/.installed:
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q label-studio==$(LS_VERSION)
	touch $@

label-studio-venv: $(LS_VENV)/.installed

# The browser tests drive Debian's Chromium through ChromeDriver (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

run: install
	$(VENV)/bin/label-studio-sam3 serve --port $(PORT)

test: install label-studio-venv browser
	LS_VENV=$(LS_VENV) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Every test that needs no Label Studio, Redis, browser or Docker: the inner loop while changing code.
test-fast: install
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not e2e and not redis and not browser and not docker" $(PYTEST_ARGS)

# The image and the compose stack, built and run as people run them (needs root for dockerd and the stand-ins).
docker-test: install
	$(SUDO) tests/docker/host.sh
	$(SUDO) tests/docker/standins.sh
	$(SUDO) env PATH="$$PATH" $(VENV)/bin/python -m pytest -m docker tests/test_docker.py $(PYTEST_ARGS)

# Pins for the Docker image, from the environment the tests passed in (the base image brings torch and CUDA).
constraints: install
	{ echo "# Versions the tests passed with (pip constraints; the Docker image installs with them)."; \
	  echo "# torch, torchvision and the CUDA libraries come from the base image. Regenerate: make constraints"; \
	  $(VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch==|torchvision==|triton==|nvidia-|cuda-|pytest==|iniconfig==|pluggy==|pygments==|requests-mock==|setuptools==|pip==|label-studio-sam3)'; \
	} > constraints.txt
