"""A small HTTP client for the mmbatch API (used by the command line and the demo)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import requests

from cli.direct import DirectUnavailable, endpoint_of, upload_direct
from cli.resumable import UploadState, forget, upload


class ApiError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class MultipartFile:
    """A multipart/form-data body read from disk as it is sent, never held whole in memory.

    ``requests`` builds a ``files=`` body in memory (a 10 GB archive would need 10 GB); this
    object has a length, so the request carries a Content-Length, and a ``read`` that serves the
    form fields, then the file in the sizes the connection asks for, then the closing boundary.
    """

    def __init__(self, fields: dict[str, str], name: str, filename: str, f: BinaryIO) -> None:
        self.boundary = uuid.uuid4().hex
        quoted = filename.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
            f"{v}\r\n".encode() for k, v in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                 f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 ).encode()
        self._parts: list[bytes | BinaryIO] = [head, f, f"\r\n--{self.boundary}--\r\n".encode()]
        self._length = len(head) + os.fstat(f.fileno()).st_size - f.tell() + len(self._parts[2])

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        out = b""
        while self._parts and (size < 0 or len(out) < size):
            part = self._parts[0]
            want = -1 if size < 0 else size - len(out)
            if isinstance(part, bytes):
                chunk = part if want < 0 else part[:want]
                rest = b"" if want < 0 else part[want:]
                if rest:
                    self._parts[0] = rest
                else:
                    self._parts.pop(0)
            else:
                chunk = part.read(want if want >= 0 else -1)
                if not chunk or want < 0:
                    self._parts.pop(0)
            out += chunk
        return out


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.base = base_url.rstrip("/")
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, self.base + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:500])
        return response.json()

    def health(self) -> Any:
        return self._call("GET", "/healthz")

    def submit(self, archive: Path, kind: str, model: int | None = None,
               idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        data = {"kind": kind, **{k: str(v) for k, v in options.items() if v is not None}}
        if model is not None:
            data["model"] = str(model)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with open(archive, "rb") as f:
            body = MultipartFile(data, "archive", Path(archive).name, f)
            headers["Content-Type"] = body.content_type
            return self._call("POST", "/api/v1/jobs", data=body, headers=headers)

    def submit_resumable(self, archive: Path, kind: str, state: UploadState,
                         model: int | None = None, idempotency_key: str | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         **options: Any) -> dict[str, Any]:
        """Upload ``archive`` resumably, then make the job from it: straight to S3 in
        presigned parts when the server keeps blobs there (``cli.direct``), through the API
        with tus otherwise (``cli.resumable``); an earlier try of the same file goes on where
        it stopped. Without an Idempotency-Key the upload's own id serves as one, so that a
        retry after a lost answer finds the job."""
        try:
            endpoint = endpoint_of(self.base)
            upload_id = upload_direct(self.http, self.base, archive, state, progress=progress)
        except DirectUnavailable:
            endpoint = f"{self.base}/api/v1/uploads"
            url = upload(self.http, endpoint, archive, state, progress=progress)
            upload_id = url.rstrip("/").rsplit("/", 1)[1]
        data = {"kind": kind, "upload": upload_id,
                **{k: str(v) for k, v in options.items() if v is not None}}
        if model is not None:
            data["model"] = str(model)
        key = idempotency_key or f"upload-{upload_id}"
        job = self._call("POST", "/api/v1/jobs", data=data, headers={"Idempotency-Key": key})
        forget(state, archive, endpoint)
        return job  # type: ignore[no-any-return]

    def retrain(self, from_jobs: list[str], holdout: str | None = None,
                idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """A train job on earlier jobs' items with their current labels."""
        body = {"kind": "train", "from_jobs": from_jobs,
                **{k: v for k, v in options.items() if v is not None}}
        if holdout is not None:
            body["holdout"] = holdout
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/api/v1/jobs", json=body, headers=headers)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/jobs/{job_id}/cancel")

    def jobs(self, **filters: Any) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/jobs", params=filters)["jobs"]

    def reprocess(self, model: int | None = None, limit: int | None = None) -> Any:
        body = {k: v for k, v in {"model": model, "limit": limit}.items() if v is not None}
        return self._call("POST", "/api/v1/reprocess", json=body)

    def export(self, job_id: str, fmt: str, out: Any, embeddings: bool = False) -> None:
        params: dict[str, Any] = {"format": fmt}
        if embeddings:
            params["embeddings"] = 1
        with self.http.get(f"{self.base}/api/v1/jobs/{job_id}/results", params=params,
                           stream=True, timeout=self.timeout) as response:
            if response.status_code >= 400:
                self._call("GET", f"/api/v1/jobs/{job_id}/results", params=params)
            for chunk in response.iter_content(1 << 16):
                out.write(chunk)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}")

    def wait(self, job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
             interval: float = 0.5, timeout: float = 3600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
            time.sleep(interval)

    def results(self, job_id: str, embeddings: bool = False,
                page_size: int = 500) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if embeddings:
                params["embeddings"] = 1
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", f"/api/v1/jobs/{job_id}/results", params=params)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/models")["models"]

    def model(self, model_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/models/{model_id}")

    def promote(self, model_id: int) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/models/{model_id}/promote")

    def evaluate(self, model_id: int, archive: Path) -> dict[str, Any]:
        """Start classifying a labelled archive with the model; score it with evaluation()."""
        with open(archive, "rb") as f:
            return self._call("POST", f"/api/v1/models/{model_id}/evaluate",
                              files={"archive": (Path(archive).name, f)})

    def search(self, text: str | None = None, file: Path | None = None, k: int = 10,
               **options: Any) -> dict[str, Any]:
        """``POST /api/v1/search``: by text (JSON), or by an example file (multipart). Options:
        model, modality, jobs, labels, min_score, cursor."""
        body = {key: v for key, v in options.items() if v is not None}
        body["k"] = k
        if file is None:
            return self._call("POST", "/api/v1/search", json={**body, "text": text})
        if text:
            raise ValueError("search by text or by a file, not both")
        form = {key: ",".join(v) if isinstance(v, (list, tuple)) else str(v)
                for key, v in body.items()}
        with open(file, "rb") as f:
            return self._call("POST", "/api/v1/search", data=form,
                              files={"file": (Path(file).name, f)})

    def similar(self, item_id: int, k: int = 10, **options: Any) -> dict[str, Any]:
        """``GET /api/v1/items/<id>/similar``: the items like one of yours."""
        params = {key: v for key, v in options.items() if v is not None}
        return self._call("GET", f"/api/v1/items/{item_id}/similar", params={**params, "k": k})

    def evaluation(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}/evaluation")

    def label_issues(self, model_id: int, limit: int = 100) -> dict[str, Any]:
        """The first ``limit`` items whose given label looked wrong when the model trained."""
        return self._call("GET", f"/api/v1/models/{model_id}/label-issues",
                          params={"limit": limit})

    def set_label(self, item_id: int, label: str, model: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"label": label}
        if model is not None:
            body["model"] = model
        return self._call("POST", f"/api/v1/items/{item_id}/label", json=body)

    def review(self, job_id: str | None = None, model: int | None = None,
               strategy: str = "uncertain", limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"strategy": strategy, "limit": limit}
        if job_id is not None:
            params["job"] = job_id
        if model is not None:
            params["model"] = model
        return self._call("GET", "/api/v1/review", params=params)

    def labels(self, item_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/items/{item_id}/labels")
