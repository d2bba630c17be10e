"""What the search routes and the dashboard's search page do, written once: check a query,
resolve its aligner (the tenant's serving index, or the one named), ask the search service,
and shape a page of hits with the items' rows.

A tenant only ever sees its own items: the index is per (tenant, aligner), the aligner and the
jobs filter are checked against the tenant here, and the hits' rows are read back through the
tenant again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from flask import g, url_for
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from mmbatch.contract import SEARCH_MODALITIES
from store import search as search_store
from store.registry import ModelNotFound, get_model
from store.schema import JOB_ID_LENGTH, MAX_ID, ModelVersion
from web import auth
from web.errors import ApiError
from web.service import Services
from web.uploads import read_upload

MAX_K = 100
MAX_FILTER_VALUES = 1000
MAX_TEXT = 2000
MAX_FILE_BYTES = 32 * 1024**2  # an example to search by: an image, a clip or a text


@dataclass(frozen=True)
class SearchRequest:
    """A search as the API takes it, checked: one of text, file or item, and the options."""

    text: str | None = None
    file: tuple[bytes, str] | None = None
    item: int | None = None
    k: int = 10
    model: int | None = None
    modality: str = "any"
    jobs: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    min_score: float | None = None
    offset: int = 0

    def fingerprint(self, model_id: int) -> str:
        """What a cursor must have been made for: the same query, aligner and filters."""
        what = [model_id, self.text, self.item, self.modality, self.jobs, self.labels,
                self.min_score, hashlib.sha256(self.file[0]).hexdigest() if self.file else None]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def parse(body: Any, upload: FileStorage | None = None, item: int | None = None
          ) -> SearchRequest:
    """A JSON body or a multipart form (``upload`` the example ``file``) as a SearchRequest;
    400 with a code naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "send a JSON object, or a multipart form")
    file = None
    if upload is not None:
        data = read_upload(upload, MAX_FILE_BYTES)
        if data is None:
            raise ApiError(413, "file_too_large",
                           f"an example file is at most {MAX_FILE_BYTES // 1024**2} MiB")
        if not data:
            raise ApiError(400, "empty_query", "the uploaded file is empty")
        file = (data, upload.filename or "")
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise ApiError(400, "invalid_text", "text must be a string")
    text = " ".join(text.split()) if text else None
    if text and len(text) > MAX_TEXT:
        raise ApiError(400, "invalid_text", f"text is at most {MAX_TEXT} characters")
    if item is None and file is None and not text:
        raise ApiError(400, "empty_query", "give a non-empty text, or a file to search by")
    if sum(x is not None for x in (text, file, item)) > 1:
        raise ApiError(400, "invalid_query", "search by one of text, file or item at a time")
    return SearchRequest(
        text=text, file=file, item=item,
        k=_int(body.get("k", 10), "k", 1, MAX_K),
        model=None if body.get("model") in (None, "") else _int(body["model"], "model", 1,
                                                                  MAX_ID, "unknown_model"),
        modality=_choice(body.get("modality") or "any"),
        jobs=_strings(body.get("jobs"), "jobs", JOB_ID_LENGTH),
        labels=_strings(body.get("labels"), "labels", 255),
        min_score=_score(body.get("min_score")),
        offset=_cursor(body.get("cursor")))


def _int(value: Any, name: str, low: int, high: int, code: str | None = None) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isascii() \
            and value.strip().lstrip("-").isdecimal():  # (isdigit also takes "²")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, code or f"invalid_{name}",
                       f"{name} must be an integer between {low} and {high}")
    return value


def _choice(value: Any) -> str:
    if value not in SEARCH_MODALITIES:
        raise ApiError(400, "invalid_modality",
                       f"modality must be one of {', '.join(SEARCH_MODALITIES)}")
    return str(value)


def _strings(value: Any, name: str, longest: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or len(value) > MAX_FILTER_VALUES or not all(
            isinstance(v, str) and 0 < len(v.strip()) <= longest and v.isprintable()
            for v in value):
        raise ApiError(400, f"invalid_{name}", f"{name} must be a list of at most "
                       f"{MAX_FILTER_VALUES} non-empty strings of at most {longest} characters")
    return tuple(v.strip() for v in value)


def _score(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not (math.isfinite(score) and -1.0 <= score <= 1.0):
        raise ApiError(400, "invalid_min_score", "min_score must be a number between -1 and 1")
    return score


def _cursor(raw: Any) -> int:
    """The offset a cursor carries (its fingerprint is checked once the aligner is known)."""
    if raw in (None, ""):
        return 0
    if not isinstance(raw, str):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        prefix, offset, _ = decoded.split(":", 2)
        if prefix != "s" or not 0 < int(offset) < 10_000:
            raise ValueError(raw)
        return int(offset)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None


def _cursor_print(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    return decoded.split(":", 2)[2]


def _encode_cursor(offset: int, fingerprint: str) -> str:
    return base64.urlsafe_b64encode(f"s:{offset}:{fingerprint}".encode()).decode().rstrip("=")


def resolve_aligner(s: Session, requested: int | None) -> ModelVersion:
    """The aligner a search uses: the one named (400 if it is not the tenant's aligner), else
    the one whose index serves the tenant (409 when the tenant has no aligner, or while its
    first index is being built)."""
    tenant = auth.tenant_id()
    if requested is not None:
        try:
            model = get_model(s, requested, tenant)
        except ModelNotFound:
            raise ApiError(400, "unknown_model", f"no model version with id {requested}")
        if model.kind != "aligner":
            raise ApiError(400, "not_an_aligner", f"model {requested} is a {model.kind}, not "
                                                  "an aligner: train one with a kind=align job")
        return model
    serving = search_store.serving_index(s, tenant)
    if serving is not None:
        return get_model(s, serving.model_version_id)
    if search_store.has_aligner(s, tenant):
        raise ApiError(409, "index_not_ready", "the aligner's index is still being built; "
                                               "try again shortly", headers={"Retry-After": "5"})
    raise ApiError(409, "no_aligner", "no aligner exists yet: train one with a kind=align job "
                                      "on a paired archive first")


def search(svc: Services, req: SearchRequest, raw_cursor: Any = None) -> dict[str, Any]:
    """A page of hits, best first: ``{"results", "next_cursor", "model"}``. Where the time
    went is left in ``g.server_timing`` (milliseconds by stage), for a Server-Timing header."""
    tenant = auth.tenant_id()
    started = time.perf_counter()
    with svc.db.session() as s:
        model = resolve_aligner(s, req.model)
        fingerprint = req.fingerprint(model.id)
        if raw_cursor and _cursor_print(raw_cursor) != fingerprint:
            raise ApiError(400, "invalid_cursor", "the cursor belongs to another query")
        if req.jobs is not None:
            unknown = set(req.jobs) - search_store.owned_jobs(s, tenant, req.jobs)
            if unknown:
                raise ApiError(400, "unknown_job", f"no job {min(unknown)}")
        if req.item is not None and search_store.item_of(s, tenant, req.item) is None:
            raise ApiError(404, "not_found", f"no item {req.item}")
        model_ref = {"id": model.id, "name": model.name, "version": model.version}
    body = {"model": model_ref["id"], "tenant": tenant, "k": req.k, "offset": req.offset,
            "modality": req.modality, "text": req.text, "item": req.item,
            "jobs": list(req.jobs) if req.jobs is not None else None,
            "labels": list(req.labels) if req.labels is not None else None,
            "min_score": req.min_score}
    asked = time.perf_counter()
    answer = svc.search.search(body, req.file)  # type: ignore[union-attr]
    answered = time.perf_counter()
    hits = answer["hits"]
    with svc.db.session() as s:
        rows = search_store.hit_rows(s, tenant, [h["item"] for h in hits])
        results = [hit_payload(rows[h["item"]][0], rows[h["item"]][1], h)
                   for h in hits if h["item"] in rows]
    more = answer.get("more")
    spent = answer.get("seconds") or {}
    g.server_timing = {"resolve": asked - started, "service": answered - asked,
                       "encode": spent.get("encode", 0.0), "index": spent.get("search", 0.0),
                       "rows": time.perf_counter() - answered}
    return {"results": results,
            "next_cursor": _encode_cursor(req.offset + req.k, fingerprint) if more else None,
            "model": model_ref}


def hit_payload(item: Any, label: str | None, hit: dict[str, Any]) -> dict[str, Any]:
    """One search result: the item, its job, key, the modality that matched, the cosine, its
    current label, links, and for a clip's frame the second it shows (``time``)."""
    media = item.media or {}
    timed = {"time": float(hit["time"])} if hit.get("time") is not None else {}
    return {"item": item.id, "job": item.job_id, "key": item.key, "modality": hit["modality"],
            "score": hit["score"], "label": label, **timed,
            "links": {"item": url_for("search_api.get_item", item_id=item.id),
                      "job": url_for("api.get_job", job_id=item.job_id),
                      "thumbnail": url_for("search_api.item_thumbnail", item_id=item.id)
                      if "image" in media else None,
                      "similar": url_for("search_api.similar_items", item_id=item.id)}}


def item_or_404(s: Session, item_id: int) -> tuple[Any, str | None]:
    found = search_store.item_of(s, auth.tenant_id(), item_id) if 0 < item_id <= MAX_ID else None
    if found is None:
        raise ApiError(404, "not_found", f"no item {item_id}")
    return found
