"""Celery workers: ingest archives, process batches, train. Import ``worker.app`` for the factory."""
