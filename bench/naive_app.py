"""Entry point for ``celery -A bench.naive_app worker``: the naive design's app (bench.naive)."""

from bench.naive import create_naive_celery
from mmbatch.settings import Settings

app = create_naive_celery(Settings.from_env())
