"""The API's side of the search service (``worker.search_service``): one HTTP call per query,
to the first of MMBATCH_SEARCH_URL's services that answers. The API never loads an encoder or
an index itself (it never imports torch)."""

from __future__ import annotations

import itertools
import json
import logging
import threading
from typing import Any

import requests

from web.errors import ApiError

log = logging.getLogger(__name__)

TIMEOUT = (2.0, 60.0)  # connect, read: a first query may load an index


class SearchClient:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._next = itertools.cycle(range(len(urls)))
        self._local = threading.local()
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def search(self, body: dict[str, Any], file: tuple[bytes, str] | None = None
               ) -> dict[str, Any]:
        """The service's answer; its 4xx as an ApiError with the same code; 503 when no
        service answers."""
        with self._lock:
            start = next(self._next)
        order = self.urls[start:] + self.urls[:start]  # round robin, then the others
        for url in order:
            try:
                if file is None:
                    r = self._session().post(f"{url}/search", json=body, timeout=TIMEOUT)
                else:
                    r = self._session().post(
                        f"{url}/search", data={"request": json.dumps(body)},
                        files={"file": (file[1], file[0], "application/octet-stream")},
                        timeout=TIMEOUT)
            except requests.RequestException as exc:
                log.warning("search_service_unreachable url=%s error=%s", url, exc)
                continue
            if r.status_code < 400:
                return r.json()  # type: ignore[no-any-return]
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                log.warning("search_service_error url=%s status=%s", url, r.status_code)
                continue
            if r.status_code >= 500:
                continue
            raise ApiError(r.status_code, err["code"], err["message"])
        raise ApiError(503, "search_unavailable",
                       "the search service is unavailable; try again shortly")
