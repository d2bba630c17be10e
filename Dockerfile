FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MMBATCH_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch, torchaudio and torchvision first and pinned together, so nothing later swaps torch.
RUN pip install --no-cache-dir torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
COPY pyproject.toml README.md ./
COPY mmbatch mmbatch
COPY models models
COPY store store
COPY worker worker
COPY web web
COPY migrations migrations
COPY bench bench
# Everything else from pyproject.toml, flower, boto3 and prometheus-client among it.
RUN pip install --no-cache-dir -e .
VOLUME /data
# 8000 the API and /metrics, 9808 a worker's metrics (MMBATCH_WORKER_METRICS_PORT), 5555 Flower.
EXPOSE 8000 9808 5555
# web.gunicorn_conf: /metrics adds up all gunicorn workers (PROMETHEUS_MULTIPROC_DIR).
CMD ["gunicorn", "--config", "python:web.gunicorn_conf", "--bind", "0.0.0.0:8000", \
     "--worker-class", "gthread", "--workers", "2", "--threads", "8", "--timeout", "600", \
     "web.wsgi:app"]
