"""Items' labels under /api/v1: a person's correction (or acceptance) of an item's label, its
history, the label issues a training found in its own archive
(``/api/v1/models/<id>/label-issues``), and the review queue of what a person should look at
next (``/api/v1/review``). Corrections are append-only events (``store.labels``)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from store import labels
from web import auth, service
from web.errors import ApiError
from web.paging import decode_cursor, encode_cursor, int_arg, int_cursor
from web.serializers import label_event_payload, label_history_payload, label_issue_payload

labels_api = Blueprint("labels_api", __name__)
labels_api.before_request(auth.authenticate)


def _services() -> service.Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


@labels_api.post("/api/v1/items/<int:item_id>/label")
def set_label(item_id: int):  # type: ignore[no-untyped-def]
    """Set an item's label: ``{"label": "…", "model": <version shown, optional>}``."""
    event = service.correct_label(_services(), item_id, request.get_json(silent=True))
    response = jsonify({"item": item_id, "label": event.new_label,
                        "event": label_event_payload(event)})
    response.status_code = 201
    return response


@labels_api.get("/api/v1/items/<int:item_id>/labels")
def get_labels(item_id: int):  # type: ignore[no-untyped-def]
    """An item's label history, oldest first, and its label now."""
    with _services().db.session() as s:
        item, _ = service.get_item_or_404(s, item_id)
        current = labels.current_labels(s, [item.id])[item.id]
        return jsonify(label_history_payload(item, current, labels.label_history(s, item.id)))


@labels_api.get("/api/v1/models/<int:model_id>/label-issues")
def get_label_issues(model_id: int):  # type: ignore[no-untyped-def]
    """The items of the model's train job whose given label looks wrong, worst first."""
    settings = _services().settings
    limit = int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    after = int_cursor(request.args.get("cursor"), "r") - 1  # ranks count from 0
    with _services().db.session() as s:
        model = service.get_model_or_404(s, model_id)
        rows = labels.label_issue_page(s, model.id, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        current = labels.current_labels(s, [r.item_id for r in rows])
        return jsonify({
            "model": model.id,
            "found": (model.metrics or {}).get("label_issues", {}).get("found"),
            "issues": [label_issue_payload(r, current[r.item_id]) for r in rows],
            "next_cursor": encode_cursor("r", str(rows[-1].rank + 1)) if more else None})


@labels_api.get("/api/v1/review")
def review():  # type: ignore[no-untyped-def]
    """What a person should look at next: ``?job=<classify job>&strategy=uncertain|diverse``,
    or ``?model=<id>&strategy=label-issues`` (the model's training archive's label issues)."""
    settings = _services().settings
    limit = int_arg("limit", 20, 1, settings.max_page_size)
    strategy = request.args.get("strategy", "uncertain")
    if strategy == "label-issues":
        model_id = int_arg("model", 0, 1, 2**31 - 1)
        if not model_id:
            raise ApiError(400, "invalid_model", "strategy=label-issues needs model=<id>")
        after = int_cursor(request.args.get("cursor"), "r") - 1
        with _services().db.session() as s:
            model = service.get_model_or_404(s, model_id)
            rows = labels.label_issue_page(s, model.id, after, limit + 1)
            current = labels.current_labels(s, [r.item_id for r in rows[:limit]])
        items = [{"item": r.item_id, "key": r.key, "job": r.job_id, "label": current[r.item_id],
                  "confidence": None, "top_k": None,
                  "reason": f"given label {r.given_label} looks wrong (quality "
                            f"{r.quality:.3f}); suggested {r.suggested_label}"}
                 for r in rows[:limit]]
        more = len(rows) > limit
        return jsonify({"items": items, "next_cursor":
                        encode_cursor("r", str(rows[limit - 1].rank + 1)) if more else None})
    job_id = request.args.get("job")
    if not job_id:
        raise ApiError(400, "invalid_job", "give job=<classify job id> (or model=<id> with "
                                           "strategy=label-issues)")
    page = service.review_page(_services(), job_id, strategy, limit,
                               _margin_cursor(request.args.get("cursor")))
    return jsonify({"items": page.items, "next_cursor": None if page.next_after is None
                    else encode_cursor("u", f"{page.next_after[0]!r}|{page.next_after[1]}")})


def _margin_cursor(raw: str | None) -> tuple[float, int] | None:
    if not raw:
        return None
    try:
        sureness, item_id = decode_cursor(raw, "u").split("|")
        return float(sureness), int(item_id)
    except ValueError:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
