"""The search API: ``POST /api/v1/search`` (by text as JSON, or by example as a multipart
``file``), an item (``GET /api/v1/items/<id>``), its thumbnail, and the items like it
(``GET /api/v1/items/<id>/similar``). Views parse, call ``web.search``, serialise."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify, request

from web import auth, search
from web.errors import ApiError
from web.serializers import item_payload
from web.service import Services
from web.thumbnails import thumbnail_response

search_api = Blueprint("search_api", __name__)
search_api.before_request(auth.authenticate)


@search_api.after_request
def server_timing(response: Response) -> Response:
    """Where a search's time went (``Server-Timing``, milliseconds): the API's checks and
    lookups (resolve), the search service's round trip (service; of which encode and index
    are the query's encoding and the vector search), and reading the hits' rows (rows)."""
    spent = g.pop("server_timing", None)
    if spent:
        response.headers["Server-Timing"] = ", ".join(
            f"{name};dur={seconds * 1000:.1f}" for name, seconds in spent.items())
    return response


def _services() -> Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


@search_api.post("/api/v1/search")
def search_items():  # type: ignore[no-untyped-def]
    """Search by text (JSON) or by example (multipart ``file`` plus the same fields)."""
    if request.mimetype == "multipart/form-data":
        body = {k: v for k, v in request.form.items()}
        for name in ("jobs", "labels"):
            if name in request.form:
                body[name] = [v for raw in request.form.getlist(name) for v in raw.split(",")
                              if v.strip()]
        upload = request.files.get("file")
        if upload is None and not body.get("text"):
            raise ApiError(400, "empty_query", "send a file field named 'file', or a text")
        req = search.parse(body, upload)
    else:
        body = request.get_json(silent=True) if request.data else None
        req = search.parse(body)
    return jsonify(search.search(_services(), req, body.get("cursor")))


@search_api.get("/api/v1/items/<int:item_id>/similar")
def similar_items(item_id: int):  # type: ignore[no-untyped-def]
    """Items like this one (its aligned vector as the query; itself left out)."""
    body = {k: request.args.get(k) for k in ("k", "model", "modality", "min_score", "cursor")
            if request.args.get(k) not in (None, "")}
    for name in ("jobs", "labels"):
        if name in request.args:
            body[name] = ",".join(request.args.getlist(name))
    with _services().db.session() as s:
        search.item_or_404(s, item_id)
    req = search.parse(body, item=item_id)
    return jsonify(search.search(_services(), req, body.get("cursor")))


@search_api.get("/api/v1/items/<int:item_id>")
def get_item(item_id: int):  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        item, label = search.item_or_404(s, item_id)
        return jsonify(item_payload(item, label))


@search_api.get("/api/v1/items/<int:item_id>/thumbnail")
def item_thumbnail(item_id: int):  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        item, _ = search.item_or_404(s, item_id)
        entry = (item.media or {}).get("image")
    if not entry:
        raise ApiError(404, "not_found", f"item {item_id} has no image")
    return thumbnail_response(entry, item_id)
