"""gunicorn settings of every mmbatch web server (``gunicorn --config python:web.gunicorn_conf``).

They turn on prometheus-client's multiprocess mode, so that ``/metrics`` counts the requests of
all gunicorn worker processes, whichever answers the scrape: each process writes its counters to
files in ``PROMETHEUS_MULTIPROC_DIR`` (made here when not set; emptied at start, since files of
an earlier run would count twice). The variable must be set before any worker imports
prometheus_client, hence here, in the master, before the workers fork.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
_made: list[str] = []


def on_starting(server: Any) -> None:
    path = os.environ.get(ENV)
    if path:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="mmbatch-metrics-")
        _made.append(path)
        os.environ[ENV] = path


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
