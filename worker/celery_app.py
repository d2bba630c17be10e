"""Entry point for ``celery -A worker.celery_app worker`` (and ``beat``): the app of the full
worker.

Its workers run every task, the model side's (torch) among them. ``worker.ingest_app`` is the
torch-free entry point of the ingest worker, beat and Flower.
"""

from worker.app import entry_app

app = entry_app()
