"""Entry point for the torch-free processes: ``celery -A worker.ingest_app`` runs the ingest
worker (``-Q ingest``), beat and Flower.

Its workers load ``worker.ingest_tasks`` only, never ``worker.model_tasks``, so these processes
never import torch and run from the web image (Dockerfile, target ``web``). Model work goes to
the model queue by task name, as the API sends it, for a worker of ``worker.celery_app``.
"""

from worker.app import INGEST_TASK_MODULES, entry_app

app = entry_app(INGEST_TASK_MODULES)
