"""The OpenAPI 3.0 document of the HTTP API, built as data and served at /api/v1/openapi.json.

The document describes what the views in ``web.api`` and ``web.models_api`` really do: every
route, parameter, request body, status code and response shape, down to ``additionalProperties``
and nullable fields, so that a response-schema conformance check (tests/test_openapi.py runs
schemathesis against a live server) catches a payload that drifts. tests/test_openapi.py also
checks that every /api rule of the Flask url_map is documented and nothing else is.

The document needs no API key: it says how to present one (the ``bearer`` security scheme).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

from mmbatch.contract import (
    ALL_KINDS,
    AUDIO_SOURCE_VIDEO,
    JOB_KINDS,
    JOB_STAGES,
    JOB_STATES,
    MODALITIES,
    MODEL_KINDS,
    PRIORITIES,
    SEARCH_MODALITIES,
    TrainOptions,
)

OPENAPI_PATH = "/api/v1/openapi.json"
VERSION = "1"

openapi = Blueprint("openapi", __name__)

Schema = dict[str, Any]

# Error codes each status can carry (web.errors renders all of them in one shape).
ERROR_CODES = {
    400: "bad input; `error.code` names the field (`invalid_<field>`, `missing_archive`, …)",
    401: "no API key, or an unknown or revoked one (`unauthorized`)",
    404: "no such resource for this tenant (`not_found`)",
    409: "the resource is not in a state that allows this (`direct_upload_unavailable`: "
         "blobs are not in S3, use tus)",
    412: "a resumable upload request without `Tus-Resumable: 1.0.0` "
         "(`unsupported_tus_version`)",
    413: "the request body exceeds MMBATCH_MAX_UPLOAD_BYTES (`request_entity_too_large`), or "
         "a resumable upload's length (`upload_too_long`)",
    415: "the upload is not a zip, tar or tar.gz archive (`invalid_archive`)",
    422: "an Idempotency-Key already used for another request (`idempotency_key_reused`), or "
         "an item's image that cannot be read (`unreadable_image`)",
    429: "more requests a minute than this key may make (`rate_limited`); see Retry-After",
    503: "the database, blob storage or the job queue is unavailable "
         "(`database_unavailable`, `storage_unavailable`, `broker_unavailable`)",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def _obj(properties: dict[str, Schema], required: list[str] | None = None,
         additional: bool | Schema = False) -> Schema:
    """An object schema; every property is required unless ``required`` says otherwise."""
    names = list(properties) if required is None else required
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": additional}
    if names:  # OpenAPI 3.0 wants a non-empty list or none
        out["required"] = names
    return out


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    out: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(status: int) -> Schema:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string"},
                                       "description": "`Bearer realm=\"mmbatch\"`"}
    if status == 412:
        headers["Tus-Version"] = {"required": True, "schema": {"type": "string"},
                                  "description": "the tus versions this server speaks"}
    if status == 429:
        headers["Retry-After"] = {"required": True,
                                  "schema": {"type": "integer", "minimum": 1},
                                  "description": "seconds until the next window"}
    return _json(_ref("Error"), ERROR_CODES[status], headers)


def _errors(*statuses: int, auth: bool = True) -> dict[str, Schema]:
    """Error responses: those named, plus 401/429 for authenticated routes and 503 always."""
    codes = set(statuses) | {503} | ({401, 429} if auth else set())
    return {str(code): {"$ref": f"#/components/responses/Error{code}"} for code in sorted(codes)}


def _schemas(settings: Any) -> dict[str, Schema]:
    date_time = {"type": "string", "format": "date-time"}
    model_ref = _obj({"id": {"type": "integer"}, "name": {"type": "string"},
                      "version": {"type": "integer", "minimum": 1}})
    links = {name: {"type": "string"} for name in ("self", "results", "errors", "report",
                                                    "cancel")}
    job = _obj({
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "kind": {"type": "string", "enum": list(ALL_KINDS)},
        "priority": {"type": "string", "enum": list(PRIORITIES)},
        "state": {"type": "string", "enum": list(JOB_STATES)},
        "stage": _nullable({"type": "string", "enum": list(JOB_STAGES)}),
        "total": {"type": "integer", "minimum": 0},
        "walking": {"type": "boolean"},
        "done": {"type": "integer", "minimum": 0},
        "failed": {"type": "integer", "minimum": 0},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "model": _nullable(model_ref),
        "throughput": _nullable({"type": "number", "minimum": 0,
                                 "description": "items per second since the job started"}),
        "eta_seconds": _nullable({"type": "number", "minimum": 0}),
        "error": _nullable({"type": "string"}),
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "what to know of a job that did not fail: labels the model "
                                    "lacks, features far from its training data"},
        "training": _nullable(_obj({
            "phase": {"type": "string", "enum": ["decoding", "training"]},
            "epoch": {"type": "integer", "minimum": 0},
            "epochs": {"type": "integer", "minimum": 1},
            "stops_by": {"type": "integer", "minimum": 0},
            "val_macro_f1": _nullable({"type": "number"}),
            "seconds_per_epoch": {"type": "number", "minimum": 0},
            "rows": {"type": "integer", "minimum": 0},
        }, required=["phase", "epoch", "epochs"])),
        "idempotency_key": _nullable({"type": "string", "maxLength": 255}),
        "callback_url": _nullable({"type": "string", "maxLength": 2048}),
        "archive": _obj({"name": {"type": "string"}, "bytes": {"type": "integer",
                                                               "minimum": 0}}),
        "skipped_files": {"type": "integer", "minimum": 0},
        "created_at": date_time,
        "started_at": _nullable(date_time),
        "finished_at": _nullable(date_time),
        "updated_at": date_time,
        "links": _obj({**links, "evaluation": {"type": "string"}}, required=list(links)),
    })
    top_k = _obj({"label": {"type": "string"},
                  "probability": {"type": "number", "minimum": 0, "maximum": 1}})
    explanation = _obj({
        "strategy": {"type": "string"},
        "weights": _nullable({"type": "object", "additionalProperties": {"type": "number"}}),
        "weights_kind": _nullable({"type": "string"}),
        "leave_one_out": {"type": "object", "additionalProperties": {"type": "number"}},
    })
    item = _obj({
        "item_id": {"type": "integer"},
        "key": {"type": "string"},
        "modalities": {"type": "array", "uniqueItems": True,
                       "items": {"type": "string", "enum": list(MODALITIES)}},
        "audio_source": _nullable({"type": "string", "enum": ["file", AUDIO_SOURCE_VIDEO],
                                   "description": "where the item's audio came from: its own "
                                                  "audio file, or its clip's sound track"}),
        "status": {"type": "string", "enum": ["pending", "ok", "failed"]},
        "label": _nullable({"type": "string"}),
        "confidence": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "array", "items": top_k}),
        "given_label": _nullable({"type": "string"}),
        "split": _nullable({"type": "string"}),
        "group": _nullable({"type": "string"}),
        "error": _nullable({"type": "string"}),
        "explanation": _nullable(explanation),
        "text_encoding": _nullable({"type": "string", "enum": ["utf-8", "utf-16", "utf-32",
                                                               "windows-1252", "latin-1"],
                                    "description": "how the caption was read"}),
        "text_truncated": _nullable({"type": "boolean", "description": "the caption was cut at "
                                                                       "MMBATCH_TEXT_MAX_CHARS"}),
        "model_version": _nullable({"type": "integer", "description": "the model version "
                                    "that gave the result (null: features only, or pending)"}),
        "embedding": _nullable({"type": "array", "items": {"type": "number"}}),
    }, required=["item_id", "key", "modalities", "status", "label", "confidence", "top_k",
                 "given_label", "split", "group", "error"])
    item["description"] = ("`explanation` appears once the item has a result; `embedding` only "
                           "with `embeddings=1`.")
    model = _obj({
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "fusion": {"type": "string"},
        "classes": {"type": "array", "items": {"type": "string"}},
        "encoders": {"type": "object"},
        "metrics": {"type": "object",
                    "description": "the list shows scalar metrics only; one model all of them"},
        "is_default": {"type": "boolean"},
        "kind": {"type": "string", "enum": list(MODEL_KINDS),
                 "description": "a fusion classifier (train jobs) or an aligner (align jobs); "
                                "defaults are per tenant and kind"},
        "job_id": _nullable({"type": "string"}),
        "created_at": date_time,
    })
    label_event = _obj({
        "id": {"type": "integer"},
        "old_label": _nullable({"type": "string"}),
        "new_label": {"type": "string"},
        "model": _nullable({"type": "integer", "description": "the model version shown"}),
        "verified": {"type": "boolean", "description": "a person looked"},
        "key_id": _nullable({"type": "integer", "description": "the API key that set it"}),
        "created_at": date_time,
    })
    per_class = _obj({"precision": {"type": "number"}, "recall": {"type": "number"},
                      "f1": {"type": "number"}, "support": {"type": "integer", "minimum": 0}})
    score = _nullable({"type": "number", "minimum": 0, "maximum": 1})
    return {
        "Error": _obj({"error": _obj({"code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                                      "message": {"type": "string"}})}),
        "Job": job,
        "JobList": _obj({"jobs": {"type": "array", "items": _ref("Job"),
                                  "maxItems": settings.max_page_size},
                         "next_cursor": _nullable({"type": "string"})}),
        "ResultItem": item,
        "ResultPage": _obj({"job": {"type": "string"},
                            "state": {"type": "string", "enum": list(JOB_STATES)},
                            "items": {"type": "array", "items": _ref("ResultItem"),
                                      "maxItems": settings.max_page_size},
                            "next_cursor": _nullable({"type": "string"})}),
        "Report": _obj({
            "id": {"type": "string"},
            "report": _obj({
                "members": {"type": "integer", "minimum": 0},
                "items": {"type": "integer", "minimum": 0},
                "labelled": {"type": "integer", "minimum": 0},
                "skipped": {"type": "array", "items": _obj({"name": {"type": "string"},
                                                            "reason": {"type": "string"}})},
                "skipped_count": {"type": "integer", "minimum": 0},
                "labels_without_item": {"type": "array", "items": {"type": "string"}},
            }, required=[], additional=True),
        }),
        "Model": model,
        "ModelList": _obj({"models": {"type": "array", "items": _ref("Model")}}),
        "Evaluation": _obj({
            "job": {"type": "string"},
            "state": {"type": "string", "enum": list(JOB_STATES)},
            "model": model_ref,
            "items": {"type": "integer", "minimum": 0},
            "classified": {"type": "integer", "minimum": 0},
            "not_classified": {"type": "integer", "minimum": 0},
            "accuracy": score,
            "macro_f1": score,
            "ece": score,
            "per_class": {"type": "object", "additionalProperties": per_class},
            "confusion": {"type": "array", "items": {"type": "array",
                                                     "items": {"type": "integer",
                                                               "minimum": 0}}},
            "unknown_labels": {"type": "array", "items": {"type": "string"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "shift": _nullable({"type": "object", "description": "how far the job's features "
                                "are from the model's training data (report.shift)"}),
        }),
        **_search_schemas(model_ref),
        "NothingToReprocess": _obj({"status": {"type": "string",
                                               "enum": ["nothing to reprocess"]},
                                    "reason": {"type": "string"}}),
        "ReviewPage": _obj({
            "items": {"type": "array", "maxItems": settings.max_page_size, "items": _obj({
                "item": {"type": "integer"}, "key": {"type": "string"},
                "job": {"type": "string"},
                "label": _nullable({"type": "string", "description": "the prediction (or, for "
                                    "label issues, the item's label now)"}),
                "confidence": _nullable({"type": "number"}),
                "top_k": _nullable({"type": "array", "items": _obj({
                    "label": {"type": "string"}, "probability": {"type": "number"}})}),
                "reason": {"type": "string"}})},
            "next_cursor": _nullable({"type": "string"})}),
        "LabelEvent": label_event,
        "LabelHistory": _obj({
            "item": {"type": "integer"}, "key": {"type": "string"}, "job": {"type": "string"},
            "given_label": _nullable({"type": "string"}),
            "label": _nullable({"type": "string",
                                "description": "the latest event's label, else the given one"}),
            "events": {"type": "array", "items": _ref("LabelEvent")},
            "links": _obj({"job": {"type": "string"}})}),
        "LabelSet": _obj({"item": {"type": "integer"}, "label": {"type": "string"},
                          "event": _ref("LabelEvent")}),
        "LabelIssues": _obj({
            "model": {"type": "integer"},
            "found": _nullable({"type": "integer", "minimum": 0}),
            "issues": {"type": "array", "maxItems": settings.max_page_size, "items": _obj({
                "item": {"type": "integer"}, "key": {"type": "string"},
                "job": {"type": "string"}, "given_label": {"type": "string"},
                "suggested_label": {"type": "string"},
                "quality": {"type": "number", "minimum": 0, "maximum": 1},
                "label": _nullable({"type": "string", "description": "the item's label now"}),
                "links": _obj({"labels": {"type": "string"}})})},
            "next_cursor": _nullable({"type": "string"})}),
        "Health": _obj({"status": {"type": "string", "enum": ["ok"]},
                        "database": {"type": "string", "enum": ["ok"]}}),
    }


def _search_schemas(model_ref: Schema) -> dict[str, Schema]:
    """Search's payloads (web.search, web.serializers.item_payload)."""
    links = _obj({"item": {"type": "string"}, "job": {"type": "string"},
                  "thumbnail": _nullable({"type": "string"}), "similar": {"type": "string"}})
    recall = _obj({"r@1": {"type": "number", "minimum": 0, "maximum": 1},
                   "r@5": {"type": "number", "minimum": 0, "maximum": 1},
                   "r@10": {"type": "number", "minimum": 0, "maximum": 1},
                   "median_rank": {"type": "number", "minimum": 1},
                   "queries": {"type": "integer", "minimum": 0}})
    return {
        "SearchResult": _obj({
            "item": {"type": "integer", "minimum": 1},
            "job": {"type": "string"},
            "key": {"type": "string"},
            "modality": {"type": "string", "enum": list(MODALITIES),
                         "description": "the item's modality that matched best"},
            "score": {"type": "number", "minimum": -1.01, "maximum": 1.01,
                      "description": "cosine similarity in the aligned space"},
            "label": _nullable({"type": "string", "description": "the item's current label: "
                                "given, else predicted"}),
            "time": {"type": "number", "minimum": 0,
                     "description": "a clip's hit (modality video): the time in seconds of "
                                    "its sampled frame that matched best; absent otherwise"},
            "links": links}, required=["item", "job", "key", "modality", "score", "label",
                                       "links"]),
        "SearchPage": _obj({
            "results": {"type": "array", "items": _ref("SearchResult"), "maxItems": 100},
            "next_cursor": _nullable({"type": "string"}),
            "model": model_ref}),
        "Item": _obj({
            "id": {"type": "integer", "minimum": 1},
            "job": {"type": "string"},
            "key": {"type": "string"},
            "modalities": {"type": "array", "uniqueItems": True,
                           "items": {"type": "string", "enum": list(MODALITIES)}},
            "label": _nullable({"type": "string"}),
            "given_label": _nullable({"type": "string"}),
            "split": _nullable({"type": "string"}),
            "group": _nullable({"type": "string"}),
            "links": _obj({"self": {"type": "string"}, "job": {"type": "string"},
                           "thumbnail": _nullable({"type": "string"}),
                           "similar": {"type": "string"}})}),
        "RetrievalEvaluation": _obj({
            "job": {"type": "string"},
            "state": {"type": "string", "enum": list(JOB_STATES)},
            "model": model_ref,
            "retrieval": _nullable({"type": "object", "additionalProperties": recall,
                                    "description": "per direction (`text->image`, …): "
                                                   "recall@1/5/10 and median rank; null "
                                                   "until the job finishes"})}),
    }


def _search_query(settings: Any) -> dict[str, Schema]:
    """The fields of a search, as JSON properties (a multipart form takes the same)."""
    return {
        "text": {"type": "string", "maxLength": 2000, "description": "what to look for"},
        "k": {"type": "integer", "minimum": 1, "maximum": 100,
              "description": "items per page (default 10)"},
        "model": {"type": "integer", "minimum": 1,
                  "description": "an aligner's id (default: the one serving the tenant)"},
        "modality": {"type": "string", "enum": list(SEARCH_MODALITIES),
                     "description": "match only this modality of the items (default any)"},
        "jobs": {"type": "array", "maxItems": 1000,
                 "items": {"type": "string", "maxLength": 32},
                 "description": "only items of these jobs"},
        "labels": {"type": "array", "maxItems": 1000,
                   "items": {"type": "string", "maxLength": 255},
                   "description": "only items whose current label is one of these"},
        "min_score": {"type": "number", "minimum": -1, "maximum": 1},
        "cursor": {"type": "string", "description": "the previous page's `next_cursor`"},
    }


def _search_paths(settings: Any) -> dict[str, Any]:
    page = _json(_ref("SearchPage"), "the best items first, one hit per item")
    query = _search_query(settings)
    form = {**{k: v for k, v in query.items() if k not in ("jobs", "labels")},
            "jobs": {"type": "string", "description": "job ids, comma-separated"},
            "labels": {"type": "string", "description": "labels, comma-separated"},
            "file": {"type": "string", "format": "binary",
                     "description": "an image, audio, video or text file to search by (its "
                                    "kind by its name's extension; a clip searches by the "
                                    "mean of its sampled frames)"}}
    item = [_p("ItemId")]
    similar_params = item + [
        {"name": k, "in": "query", "required": False, "schema": v}
        for k, v in query.items() if k not in ("text", "jobs", "labels")] + [
        {"name": k, "in": "query", "required": False, "schema": {"type": "string"},
         "description": f"{k}, comma-separated"} for k in ("jobs", "labels")]
    return {
        "/api/v1/search": {"post": {
            "operationId": "search", "tags": ["search"],
            "summary": "Search this tenant's items by text (JSON) or by example (multipart "
                       "`file`)",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "properties": query}},
                "multipart/form-data": {"schema": {"type": "object", "properties": form},
                                        "encoding": {"file": {
                                            "contentType": "application/octet-stream"}}}}},
            "responses": {"200": page, **_errors(400, 404, 409, 413)}}},
        "/api/v1/items/{item_id}": {"get": {
            "operationId": "getItem", "tags": ["search"], "parameters": item,
            "responses": {"200": _json(_ref("Item"), "the item"), **_errors(404)}}},
        "/api/v1/items/{item_id}/thumbnail": {"get": {
            "operationId": "getItemThumbnail", "tags": ["search"], "parameters": item,
            "responses": {"200": {"description": "the item's image, at most 160 pixels a side",
                                  "content": {"image/jpeg": {"schema": {
                                      "type": "string", "format": "binary"}}}},
                          **_errors(404, 422)}}},
        "/api/v1/items/{item_id}/similar": {"get": {
            "operationId": "similarItems", "tags": ["search"], "parameters": similar_params,
            "summary": "Items like this one",
            "responses": {"200": page, **_errors(400, 404, 409)}}},
    }


def _params(settings: Any) -> dict[str, Schema]:
    return {
        "JobId": {"name": "job_id", "in": "path", "required": True,
                  "description": "a job id (32 hex digits); another tenant's answers 404",
                  "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}},
        "ModelId": {"name": "model_id", "in": "path", "required": True,
                    "schema": {"type": "integer", "minimum": 0}},
        "ItemId": {"name": "item_id", "in": "path", "required": True,
                   "description": "an item id (`item_id` in results); another tenant's "
                                  "answers 404",
                   "schema": {"type": "integer", "minimum": 0}},
        "Limit": {"name": "limit", "in": "query", "required": False,
                  "description": f"page size (default {settings.default_page_size})",
                  "schema": {"type": "integer", "minimum": 1,
                             "maximum": settings.max_page_size}},
        "Cursor": {"name": "cursor", "in": "query", "required": False,
                   "description": "the previous page's `next_cursor`",
                   "schema": {"type": "string"}},
        "Embeddings": {"name": "embeddings", "in": "query", "required": False,
                       "description": "`1`, `true`, `yes` or `on` to include each item's "
                                      "fused embedding",
                       "schema": {"type": "string"}},
    }


def _responses() -> dict[str, Schema]:
    return {f"Error{code}": _error(code) for code in ERROR_CODES}


def _p(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _multipart(schema: Schema) -> Schema:
    return {"required": True, "content": {"multipart/form-data": {
        "schema": schema, "encoding": {"archive": {"contentType": "application/octet-stream"}}}}}


def _upload_paths(settings: Any) -> dict[str, Any]:
    """The resumable uploads (tus 1.0.0: core, creation, termination, expiration)."""
    tus = {"name": "Tus-Resumable", "in": "header", "required": True,
           "schema": {"type": "string", "enum": ["1.0.0"]},
           "description": "the tus protocol version"}
    upload_id = {"name": "upload_id", "in": "path", "required": True,
                 "schema": {"type": "string", "maxLength": 64}}

    def header(description: str, schema: Schema | None = None) -> Schema:
        return {"required": True, "description": description,
                "schema": schema or {"type": "string"}}

    offset = {"Upload-Offset": header("bytes arrived so far",
                                      {"type": "integer", "minimum": 0}),
              "Upload-Expires": header("when an unfinished upload is removed (HTTP date)"),
              "Tus-Resumable": header("1.0.0")}
    return {
        "/api/v1/uploads": {"post": {
            "operationId": "createUpload", "tags": ["jobs"],
            "summary": "Start a resumable upload of an archive (tus creation)",
            "parameters": [tus,
                           {"name": "Upload-Length", "in": "header", "required": True,
                            "schema": {"type": "integer", "minimum": 1},
                            "description": "the archive's size in bytes (at most "
                                           "MMBATCH_MAX_UPLOAD_BYTES: 413 otherwise)"},
                           {"name": "Upload-Metadata", "in": "header", "required": False,
                            "schema": {"type": "string"},
                            "description": "`filename <base64 of the name>`"}],
            "responses": {"201": {"description": "made; PATCH its Location",
                                  "headers": {"Location": header("the upload's URL"),
                                              "Upload-Expires": offset["Upload-Expires"],
                                              "Tus-Resumable": offset["Tus-Resumable"]}},
                          **_errors(400, 412, 413)}}},
        "/api/v1/uploads/{upload_id}": {
            "head": {
                "operationId": "getUploadOffset", "tags": ["jobs"],
                "summary": "How much of the upload has arrived",
                "parameters": [upload_id, tus],
                "responses": {"200": {"description": "the offset to go on from",
                                      "headers": {**offset, "Upload-Length": header(
                                          "the archive's size", {"type": "integer"})}},
                              **_errors(404, 412)}},
            "patch": {
                "operationId": "appendUpload", "tags": ["jobs"],
                "summary": "Append bytes at Upload-Offset (kept even when the connection "
                           "breaks)",
                "parameters": [upload_id, tus,
                               {"name": "Upload-Offset", "in": "header", "required": True,
                                "schema": {"type": "integer", "minimum": 0}}],
                "requestBody": {"required": True, "content": {
                    "application/offset+octet-stream": {"schema": {
                        "type": "string", "format": "binary"}}}},
                "responses": {"204": {"description": "appended", "headers": offset},
                              **_errors(400, 404, 409, 412, 413, 415)}},
            "delete": {
                "operationId": "deleteUpload", "tags": ["jobs"],
                "summary": "Abandon the upload (tus termination)",
                "parameters": [upload_id, tus],
                "responses": {"204": {"description": "gone"}, **_errors(404, 412)}}},
    }


def _direct_schemas() -> dict[str, Schema]:
    part = {"type": "integer", "minimum": 1, "maximum": 10_000}
    return {
        "DirectUpload": _obj({
            "id": {"type": "string"}, "name": {"type": "string"},
            "length": {"type": "integer", "minimum": 1},
            "part_size": {"type": "integer", "minimum": 1,
                          "description": "every part but the last is this long"},
            "part_count": part,
            "state": {"type": "string", "enum": ["uploading", "complete", "used"]},
            "expires_at": {"type": "string", "format": "date-time"},
            "job": _nullable({"type": "string", "description": "the job made from it"}),
            "parts": {"type": "array", "description": "the parts S3 has (while uploading)",
                      "items": _obj({"part": part, "etag": {"type": "string"},
                                     "size": {"type": "integer", "minimum": 0}})}}),
        "PartUrls": _obj({
            "urls": {"type": "array", "items": _obj({"part": part,
                                                     "url": {"type": "string"}})},
            "expires_in": {"type": "integer", "minimum": 1,
                           "description": "seconds each URL works"}}),
    }


def _direct_paths() -> dict[str, Any]:
    """Direct uploads to S3 in presigned parts (``web.direct_uploads``)."""
    upload_id = {"name": "upload_id", "in": "path", "required": True,
                 "schema": {"type": "string", "maxLength": 64}}
    upload = _json(_ref("DirectUpload"), "the direct upload")

    def body(schema: Schema) -> Schema:
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    part = {"type": "integer", "minimum": 1, "maximum": 10_000}
    return {
        "/api/v1/direct-uploads": {"post": {
            "operationId": "createDirectUpload", "tags": ["jobs"],
            "summary": "Start a direct upload to S3 in presigned parts (S3 blob storage only: "
                       "409 `direct_upload_unavailable` otherwise)",
            "requestBody": body(_obj({"length": {"type": "integer", "minimum": 1},
                                      "filename": {"type": "string"}}, required=["length"])),
            "responses": {"201": {**upload, "headers": {"Location": {
                "required": True, "schema": {"type": "string"},
                "description": "the upload's URL"}}},
                **_errors(400, 409, 413)}}},
        "/api/v1/direct-uploads/{upload_id}": {
            "get": {
                "operationId": "getDirectUpload", "tags": ["jobs"],
                "summary": "The upload and the parts S3 has of it (to resume)",
                "parameters": [upload_id],
                "responses": {"200": upload, **_errors(404, 409)}},
            "delete": {
                "operationId": "deleteDirectUpload", "tags": ["jobs"],
                "summary": "Abandon the upload: its parts in S3 are aborted",
                "parameters": [upload_id],
                "responses": {"204": {"description": "gone"}, **_errors(404, 409)}}},
        "/api/v1/direct-uploads/{upload_id}/urls": {"post": {
            "operationId": "directUploadPartUrls", "tags": ["jobs"],
            "summary": "Presigned URLs that take the given parts by HTTP PUT",
            "parameters": [upload_id],
            "requestBody": body(_obj({"parts": {"type": "array", "minItems": 1,
                                                "maxItems": 100, "items": part}})),
            "responses": {"200": _json(_ref("PartUrls"), "a URL per part"),
                          **_errors(400, 404, 409)}}},
        "/api/v1/direct-uploads/{upload_id}/complete": {"post": {
            "operationId": "completeDirectUpload", "tags": ["jobs"],
            "summary": "Join the parts (numbers and the ETags S3 answered) into the archive",
            "parameters": [upload_id],
            "requestBody": body(_obj({"parts": {"type": "array", "minItems": 1, "items": _obj(
                {"part": part, "etag": {"type": "string"}})}})),
            "responses": {"200": upload, **_errors(400, 404, 409)}}},
    }


def _paths(settings: Any) -> dict[str, Any]:
    location = {"Location": {"required": True, "schema": {"type": "string"},
                             "description": "the job's URL"}}
    job_ok = _json(_ref("Job"), "the job")
    archive = {"type": "string", "format": "binary",
               "description": "a .zip, .tar or .tar.gz archive (recognised by its bytes)"}
    new_job = {
        "type": "object",
        "required": ["kind"],
        "description": "the archive as the file `archive`, or a finished resumable upload "
                       "named by `upload`",
        "properties": {
            "kind": {"type": "string", "enum": list(JOB_KINDS)},
            "archive": archive,
            "upload": {"type": "string", "maxLength": 64,
                       "description": "the id of a whole resumable upload "
                                      "(`POST /api/v1/uploads`) or a completed direct one "
                                      "(`POST /api/v1/direct-uploads`), instead of "
                                      "`archive`"},
            "model": {"type": "integer", "minimum": 1,
                      "description": "embed/classify: a model version id (default: the "
                                     "default model); train: not allowed"},
            "callback_url": {"type": "string", "maxLength": 2048,
                             "description": "webhook called when the job finishes"},
            "priority": {"type": "string", "enum": list(PRIORITIES),
                         "description": "who goes first when workers are shared (default "
                                        "normal; at most the key's max priority)"},
            "adapt": {"type": "boolean",
                      "description": "classify with a stacked model only: adapt the model to "
                                     "this archive's own items first (a derived model "
                                     "version, never the default by itself), and take the "
                                     "results from it"},
            # a train job's options (mmbatch.contract.TrainOptions), train only
            **TrainOptions.schema(),
        },
    }
    retrain = {
        "type": "object",
        "required": ["kind", "from_jobs"],
        "additionalProperties": False,
        "description": "a train job on earlier jobs' items, with their current labels "
                       "(corrections included) and cached features",
        "properties": {
            "kind": {"type": "string", "enum": ["train"]},
            "from_jobs": {"type": "array", "minItems": 1, "maxItems": 100,
                          "items": {"type": "string"},
                          "description": "jobs that succeeded; their labelled items train"},
            "holdout": {"type": "string", "enum": ["verified"],
                        "description": "the items a person labelled validate; the rest train"},
            "callback_url": {"type": "string", "maxLength": 2048},
            "priority": {"type": "string", "enum": list(PRIORITIES),
                         "description": "who goes first when workers are shared (default "
                                        "normal; at most the key's max priority)"},
            **TrainOptions.schema(),
        },
    }
    jobs_list_params = [
        _p("Limit"), _p("Cursor"),
        {"name": "state", "in": "query", "required": False,
         "schema": {"type": "string", "enum": list(JOB_STATES)}},
        {"name": "kind", "in": "query", "required": False,
         "schema": {"type": "string", "enum": list(ALL_KINDS)}},
        {"name": "created_after", "in": "query", "required": False,
         "schema": {"type": "string", "format": "date-time"}},
        {"name": "created_before", "in": "query", "required": False,
         "schema": {"type": "string", "format": "date-time"}},
    ]
    exports = {"application/x-ndjson": {"schema": {"type": "string"}},
               "text/csv": {"schema": {"type": "string"}},
               "application/vnd.apache.parquet": {"schema": {"type": "string",
                                                             "format": "binary"}}}
    results = _json(_ref("ResultPage"), "a page of item results (format=json), or the whole "
                                        "export as a download (jsonl, csv, parquet)")
    results["content"].update(exports)
    return {
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["health"], "security": [],
            "summary": "Liveness with a database round trip",
            "responses": {"200": _json(_ref("Health"), "the web process and its database "
                                                       "answer"), **_errors(auth=False)}}},
        OPENAPI_PATH: {"get": {
            "operationId": "openapi", "tags": ["meta"], "security": [],
            "summary": "This document",
            "responses": {"200": _json({"type": "object", "required": ["openapi", "paths"]},
                                       "the OpenAPI document")}}},
        "/api/v1/jobs": {
            "post": {
                "operationId": "createJob", "tags": ["jobs"],
                "summary": "Upload an archive and start a job (or, as JSON, train on earlier "
                           "jobs' items)",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "description": "a retry with the same key answers the job "
                                               "the first request made (200)",
                                "schema": {"type": "string", "maxLength": 255}}],
                "requestBody": {"required": True, "content": {
                    **_multipart(new_job)["content"],
                    "application/json": {"schema": retrain}}},
                "responses": {
                    "200": _json(_ref("Job"), "the job an earlier request with this "
                                              "Idempotency-Key made", location),
                    "202": _json(_ref("Job"), "the job, queued", location),
                    **_errors(400, 409, 413, 415, 422)}},
            "get": {
                "operationId": "listJobs", "tags": ["jobs"],
                "summary": "This tenant's jobs, newest first",
                "parameters": jobs_list_params,
                "responses": {"200": _json(_ref("JobList"), "a page of jobs"),
                              **_errors(400)}}},
        "/api/v1/jobs/{job_id}": {"get": {
            "operationId": "getJob", "tags": ["jobs"], "parameters": [_p("JobId")],
            "responses": {"200": job_ok, **_errors(404)}}},
        "/api/v1/jobs/{job_id}/cancel": {"post": {
            "operationId": "cancelJob", "tags": ["jobs"], "parameters": [_p("JobId")],
            "summary": "Stop a job; results already written stay",
            "responses": {"200": _json(_ref("Job"), "the cancelled job"),
                          **_errors(404, 409)}}},
        "/api/v1/jobs/{job_id}/report": {"get": {
            "operationId": "getReport", "tags": ["jobs"], "parameters": [_p("JobId")],
            "summary": "What ingest found: members, items, skipped files and why",
            "responses": {"200": _json(_ref("Report"), "the ingest report ({} before "
                                                       "ingest)"), **_errors(404)}}},
        "/api/v1/jobs/{job_id}/errors": {"get": {
            "operationId": "getErrors", "tags": ["jobs"],
            "summary": "The job's failed items",
            "parameters": [_p("JobId"), _p("Limit"), _p("Cursor"), _p("Embeddings")],
            "responses": {"200": _json(_ref("ResultPage"), "a page of failed items"),
                          **_errors(400, 404)}}},
        "/api/v1/jobs/{job_id}/results": {"get": {
            "operationId": "getResults", "tags": ["jobs"],
            "summary": "The job's item results, in archive order",
            "parameters": [_p("JobId"), _p("Limit"), _p("Cursor"), _p("Embeddings"),
                           {"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string",
                                       "enum": ["json", "jsonl", "csv", "parquet"]}}],
            "responses": {"200": results, **_errors(400, 404)}}},
        "/api/v1/jobs/{job_id}/evaluation": {"get": {
            "operationId": "getEvaluation", "tags": ["models"], "parameters": [_p("JobId")],
            "summary": "Scores of a classify job against its archive's labels",
            "responses": {"200": _json({"oneOf": [_ref("Evaluation"),
                                                   _ref("RetrievalEvaluation")]},
                                       "the scores (a classifier's, or an aligner's recall)"),
                          **_errors(404, 409)}}},
        "/api/v1/reprocess": {"post": {
            "operationId": "reprocess", "tags": ["jobs"],
            "summary": "Reprocess this tenant's stale or failed items now",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"model": {"type": "integer", "minimum": 1},
                               "limit": {"type": "integer", "minimum": 1,
                                         "maximum": 10_000_000}}}}}},
            "responses": {"200": _json(_ref("NothingToReprocess"), "nothing is due, and why"),
                          "202": _json(_ref("Job"), "the reprocess job, whose members a worker "
                                                    "plans", location),
                          **_errors(400, 409, 413)}}},
        "/api/v1/models": {"get": {
            "operationId": "listModels", "tags": ["models"],
            "responses": {"200": _json(_ref("ModelList"), "this tenant's model versions"),
                          **_errors()}}},
        "/api/v1/models/{model_id}": {"get": {
            "operationId": "getModel", "tags": ["models"], "parameters": [_p("ModelId")],
            "responses": {"200": _json(_ref("Model"), "the model version with all its "
                                                      "metrics"), **_errors(404)}}},
        "/api/v1/models/{model_id}/promote": {"post": {
            "operationId": "promoteModel", "tags": ["models"], "parameters": [_p("ModelId")],
            "summary": "Make this version the tenant's default model",
            "responses": {"200": _json(_ref("Model"), "the promoted model"),
                          **_errors(404)}}},
        "/api/v1/models/{model_id}/confusion.png": {"get": {
            "operationId": "getConfusionMatrix", "tags": ["models"],
            "parameters": [_p("ModelId")],
            "responses": {"200": {"description": "the validation confusion matrix",
                                  "content": {"image/png": {"schema": {
                                      "type": "string", "format": "binary"}}}},
                          **_errors(404)}}},
        "/api/v1/models/{model_id}/label-issues": {"get": {
            "operationId": "getLabelIssues", "tags": ["labels"],
            "parameters": [_p("ModelId"), _p("Limit"), _p("Cursor")],
            "summary": "Items of the model's training archive whose given label looks wrong, "
                       "worst first",
            "responses": {"200": _json(_ref("LabelIssues"), "a page of label issues"),
                          **_errors(400, 404)}}},
        "/api/v1/review": {"get": {
            "operationId": "review", "tags": ["labels"],
            "summary": "What a person should look at next: a classify job's least sure "
                       "predictions, a page spread over them, or a model's label issues",
            "parameters": [
                {"name": "job", "in": "query", "required": False,
                 "description": "a classify job (strategies uncertain and diverse)",
                 "schema": {"type": "string"}},
                {"name": "model", "in": "query", "required": False,
                 "description": "a model version (strategy label-issues)",
                 "schema": {"type": "integer", "minimum": 1}},
                {"name": "strategy", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": ["uncertain", "diverse",
                                                       "label-issues"]}},
                _p("Limit"), _p("Cursor")],
            "responses": {"200": _json(_ref("ReviewPage"), "a page; labelled items leave the "
                                                           "queue"),
                          **_errors(400, 404, 409)}}},
        "/api/v1/items/{item_id}/label": {"post": {
            "operationId": "setLabel", "tags": ["labels"], "parameters": [_p("ItemId")],
            "summary": "Set an item's label (an appended event; nothing is overwritten)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["label"],
                "properties": {"label": {"type": "string", "minLength": 1, "maxLength": 255,
                                         "description": "one of the model's classes"},
                               "model": {"type": "integer", "minimum": 1,
                                         "description": "the model version shown (default: "
                                                        "the item's job's, else the default)"}
                               }}}}},
            "responses": {"201": _json(_ref("LabelSet"), "the event recorded"),
                          **_errors(400, 404, 413)}}},
        "/api/v1/items/{item_id}/labels": {"get": {
            "operationId": "getLabels", "tags": ["labels"], "parameters": [_p("ItemId")],
            "summary": "An item's label history, oldest first, and its label now",
            "responses": {"200": _json(_ref("LabelHistory"), "the history"),
                          **_errors(404)}}},
        "/api/v1/models/{model_id}/evaluate": {"post": {
            "operationId": "evaluateModel", "tags": ["models"], "parameters": [_p("ModelId")],
            "summary": "Evaluate this model on a labelled archive (a classify job), or an "
                       "aligner on a paired archive (an align job)",
            "requestBody": _multipart({"type": "object", "required": ["archive"],
                                       "properties": {"archive": archive}}),
            "responses": {"202": _json(_ref("Job"), "the classify job; `links.evaluation` "
                                                    "scores it", location),
                          **_errors(400, 404, 413, 415)}}},
        **_search_paths(settings),
        **_upload_paths(settings),
        **_direct_paths(),
    }


def document(settings: Any) -> dict[str, Any]:
    """The OpenAPI document for an app built with ``settings`` (page sizes come from them)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "mmbatch", "version": VERSION,
                 "description": "Batch processing for multimodal machine learning: upload "
                                "media archives, get per-item features, fused embeddings and "
                                "labels. Every error is `{\"error\": {\"code\", \"message\"}}`"
                                " with a 4xx status (503 while a dependency is down)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": "jobs"}, {"name": "models"}, {"name": "labels"}, {"name": "search"},
                 {"name": "health"},
                 {"name": "meta"}],
        "paths": _paths(settings),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "an API key: `mmbatch keys create --name NAME`"}},
            "schemas": {**_schemas(settings), **_direct_schemas()},
            "parameters": _params(settings),
            "responses": _responses(),
        },
    }


@openapi.get(OPENAPI_PATH)
def openapi_json():  # type: ignore[no-untyped-def]
    return jsonify(document(current_app.extensions["mmbatch"].settings))
