"""Every payload the web layer shows, built once: a job, an item's result, a model version, an
item's label history and a model's label issues. The API, the exports and the dashboard all call
these."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
from flask import url_for
from sqlalchemy.orm import Session

from mmbatch.contract import MODALITIES
from store.labels import IssueRow
from store.schema import Item, Job, LabelEvent, ModelVersion, Result


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite drops the zone; everything is stored in UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def job_payload(s: Session, job: Job) -> dict[str, Any]:
    """The polling payload of a job, with the model version it runs (or made), if any."""
    model = s.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    processed = job.done + job.failed
    report = job.report or {}
    throughput, eta = _rate(job, processed)
    if job.walking:
        eta = None  # of a total still growing
    training = report.get("training") if job.stage == "training" else None
    progress = round(processed / job.total, 4) if job.total else 0.0
    if job.kind == "train" and job.state == "running":  # half extraction, half training
        epochs = training or {}
        trained = (min(1.0, epochs["epoch"] / max(1, epochs.get("stops_by") or 1))
                   if epochs.get("phase") == "training" else 0.0)
        progress = round(0.5 * progress + 0.5 * trained, 4)
        eta = _training_eta(epochs) if job.stage == "training" else None
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "stage": job.stage,
        "total": job.total,
        # the archive is still being walked: total grows, and the job cannot finish yet
        "walking": job.walking,
        "done": job.done,
        "failed": job.failed,
        "progress": progress,
        "model": None if model is None else {"id": model.id, "name": model.name,
                                             "version": model.version},
        "throughput": throughput,
        "eta_seconds": eta,
        "error": job.error,
        "warnings": list(job.warnings or []),
        # while a train job trains: its epoch, the last it may run, the best validation score
        "training": training,
        "priority": job.priority,
        "idempotency_key": job.idempotency_key,
        "callback_url": job.callback_url,
        "archive": {"name": job.archive_name, "bytes": job.archive_bytes},
        "skipped_files": report.get("skipped_count", 0),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
        "links": {"self": url_for("api.get_job", job_id=job.id),
                  "results": url_for("api.get_results", job_id=job.id),
                  "errors": url_for("api.get_errors", job_id=job.id),
                  "report": url_for("api.get_report", job_id=job.id),
                  "cancel": url_for("api.cancel_job", job_id=job.id)},
    }


def _rate(job: Job, processed: int) -> tuple[float | None, float | None]:
    """Items per second since the job started, and the seconds left at that rate."""
    if job.started_at is None or processed == 0:
        return None, None
    started = job.started_at if job.started_at.tzinfo else \
        job.started_at.replace(tzinfo=dt.timezone.utc)
    end = job.finished_at or dt.datetime.now(dt.timezone.utc)
    end = end if end.tzinfo else end.replace(tzinfo=dt.timezone.utc)
    seconds = max((end - started).total_seconds(), 1e-3)
    rate = processed / seconds
    left = max(job.total - processed, 0)
    eta = None if job.state not in ("running",) else round(left / rate, 1)
    return round(rate, 3), eta


def _training_eta(training: dict[str, Any]) -> float | None:
    """Seconds left to a training at its pace so far, when it has one."""
    pace = training.get("seconds_per_epoch")
    if training.get("phase") != "training" or pace is None or not training.get("stops_by"):
        return None
    return round(max(0, training["stops_by"] - training["epoch"]) * pace, 1)


def result_payload(item: Item, result: Result | None, with_embeddings: bool = False,
                   embedding_digits: int | None = 6) -> dict[str, Any]:
    """An item and its result (None while pending); the fused embedding on request, rounded
    to ``embedding_digits`` (None: as stored)."""
    info = (result.info or {}) if result is not None else {}
    media = item.media or {}
    out: dict[str, Any] = {
        "item_id": item.id,
        "key": item.key,
        # what the item has (less what its clip turned out to lack: no sound track, …)
        "modalities": [m for m in MODALITIES if m in media and m not in info.get("absent", ())],
        # "video" when the item's audio is its clip's sound track, "file" for an audio file
        "audio_source": (media["audio"].get("source", "file")
                         if "audio" in media and "audio" not in info.get("absent", ()) else None),
        "status": "pending" if result is None else result.status,
        "label": None if result is None else result.label,
        "confidence": None if result is None else result.confidence,
        "top_k": None if result is None else result.top_k,
        "given_label": item.label,
        "split": item.split,
        "group": item.group,
        "error": None if result is None else result.error,
        "explanation": None if result is None else result.explanation,
        # how a caption was read (None without text, or while pending)
        "text_encoding": (result.info or {}).get("text_encoding") if result else None,
        "text_truncated": (result.info or {}).get("text_truncated") if result else None,
        # the model version that gave the result (None: features only, or pending)
        "model_version": (result.model_version_id or None) if result else None,
    }
    if with_embeddings:
        vector = None
        if result is not None and result.embedding:
            vector = np.frombuffer(result.embedding, dtype="<f4")
            vector = vector.round(embedding_digits) if embedding_digits is not None else vector
        out["embedding"] = None if vector is None else vector.tolist()
    return out


def item_payload(item: Item, label: str | None) -> dict[str, Any]:
    """An item on its own (``GET /api/v1/items/<id>``): its key, job, modalities, its current
    label (given, else predicted), and links."""
    media = item.media or {}
    return {
        "id": item.id,
        "job": item.job_id,
        "key": item.key,
        "modalities": [m for m in MODALITIES if m in media],
        "label": label,
        "given_label": item.label,
        "split": item.split,
        "group": item.group,
        "links": {"self": url_for("search_api.get_item", item_id=item.id),
                  "job": url_for("api.get_job", job_id=item.job_id),
                  "thumbnail": url_for("search_api.item_thumbnail", item_id=item.id)
                  if "image" in media else None,
                  "similar": url_for("search_api.similar_items", item_id=item.id)},
    }


def model_payload(m: ModelVersion, full: bool = False) -> dict[str, Any]:
    """A model version; the list shows scalar metrics only (``full``: all of them)."""
    metrics = dict(m.metrics or {})
    if not full:
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    return {
        "id": m.id,
        "name": m.name,
        "version": m.version,
        "fusion": m.fusion,
        "classes": m.classes,
        "encoders": m.encoders,
        "metrics": metrics,
        "is_default": m.is_default,
        "kind": m.kind,
        "job_id": m.job_id,
        "created_at": iso(m.created_at),
    }


def label_event_payload(event: LabelEvent) -> dict[str, Any]:
    """One change of an item's label: from what to what, the model version shown, who, when."""
    return {
        "id": event.id,
        "old_label": event.old_label,
        "new_label": event.new_label,
        "model": event.model_version_id,
        "verified": event.verified,
        "key_id": event.api_key_id,
        "created_at": iso(event.created_at),
    }


def label_history_payload(item: Item, current: str | None, events: list[LabelEvent]
                          ) -> dict[str, Any]:
    """An item's label as its archive gave it, as it is now, and every change between."""
    return {"item": item.id, "key": item.key, "job": item.job_id, "given_label": item.label,
            "label": current, "events": [label_event_payload(e) for e in events],
            "links": {"job": url_for("api.get_job", job_id=item.job_id)}}


def label_issue_payload(row: IssueRow, current: str | None) -> dict[str, Any]:
    """An item whose given label looked wrong to the model trained on it; ``label`` is its
    label now (a correction made since shows here)."""
    return {"item": row.item_id, "key": row.key, "job": row.job_id,
            "given_label": row.given_label, "suggested_label": row.suggested_label,
            "quality": round(row.quality, 4), "label": current,
            "links": {"labels": url_for("labels_api.get_labels", item_id=row.item_id)}}
