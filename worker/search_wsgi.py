"""Entry point for ``gunicorn worker.search_wsgi:app`` (``mmbatch searcher``): the one module
that builds the search service at import, in gunicorn's worker process (after the fork), where
its encoders and indexes load once for all the process's threads."""

import logging

from mmbatch.settings import Settings
from worker.search_service import create_search_app

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level,
                    format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s %(message)s")
app = create_search_app(settings)
