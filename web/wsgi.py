"""Entry point for ``gunicorn web.wsgi:app``: the one module that builds the app at import.

The app's own log lines (``job_state …`` among them) go to standard error at
``MMBATCH_LOG_LEVEL``, as the worker's do; gunicorn keeps its own loggers.
"""

import logging

from mmbatch.settings import Settings
from web.app import create_app

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level,
                    format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s %(message)s")
app = create_app(settings)
