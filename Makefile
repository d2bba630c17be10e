# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test services up bench lint clean compose-check

# torch, torchaudio and torchvision are installed together first, pinned, so that no later
# requirement makes pip swap torch for another build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mmbatch demo

up: install
	$(BIN)/mmbatch up

services:
	@scripts/services.sh
	@scripts/test-deps.sh

test: install services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The throughput table of README's "Performance" section (bench/pipeline.py: bare loop, end to
# end, naive design, new head, 5x the items), then job-status latency under 50 pollers.
bench: install
	$(BIN)/python -m bench.pipeline --items 500 --scale 5 $(BENCH_ARGS)
	$(BIN)/python -m bench.api

# The deployment end to end in Docker, the pre-release check (scripts/compose-check.sh, as root):
# builds the images, brings docker-compose.yml up, trains and classifies the sample through the
# API, restarts the model worker mid-job, checks results, /metrics and Flower, tears it down.
# Needs no virtualenv: it runs on Docker and the system's python3.
compose-check:
	scripts/compose-check.sh

clean:
	rm -rf var .pytest_cache
