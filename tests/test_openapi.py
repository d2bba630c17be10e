"""The OpenAPI document: valid, in step with the Flask url_map, and true of a live server.

schemathesis generates requests from the document (valid ones and deliberately invalid ones) and
sends them to a real server in a thread (werkzeug), over a real PostgreSQL database with a real API
key and a Redis broker (db 11, a prefix of its own); nothing consumes the queue, which job creation
only needs to publish to. Every response must be no 5xx and match the document: status code,
content type, required headers and the JSON schema of its body. Path parameters are drawn from
random values and from ids that exist (a running classify job with results, a finished train job,
a model version with a confusion matrix), and uploads are sometimes a real tar archive, so the
success paths are checked as well as the 404s and 415s.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import json
import os
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from mmbatch.contract import TrainOptions
from mmbatch.settings import Settings
from tests.conftest import make_key
from tests.util import tar_bytes
from web.app import create_app
from web.openapi import OPENAPI_PATH, document

CHECKS = [schemathesis.checks.not_a_server_error,
          schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance,
          schemathesis.checks.response_headers_conformance,
          schemathesis.checks.response_schema_conformance]
# Examples per operation and generation phase (about 15 s for the whole API on two cores);
# MMBATCH_OPENAPI_EXAMPLES=500 explores further. Derandomized: every run sends the same requests.
EXAMPLES = int(os.environ.get("MMBATCH_OPENAPI_EXAMPLES", "30"))


def _png() -> bytes:
    """A 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


TAR = tar_bytes({"a/x.txt": b"hello", "labels.csv": b"a/x,cat\n"})


@dataclass
class Seeded:
    classify_job: str
    train_job: str
    model: int


@dataclass
class Live:
    url: str
    key: str
    seeded: Seeded
    settings: Settings
    app: Any

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def seed(app: Any, key: str) -> Seeded:
    """A model version with a confusion matrix, a running classify job with an ok, a failed and
    a pending item, and a finished train job, all of the key's tenant."""
    from store import jobs, keys, registry
    from store.schema import Result

    svc = app.extensions["mmbatch"]
    now = dt.datetime.now(dt.UTC)
    with svc.db.session() as s:
        row = keys.authenticate(s, key)
        assert row is not None
        tenant = row.tenant_id
        model = registry.register_model(
            s, name="fixture", fusion="weighted", classes=["cat", "dog"],
            encoders={"text": {"name": "minilm", "version": "1", "dim": 4}},
            metrics={"val_accuracy": 0.5, "confusion": [[1, 0], [1, 0]],
                     "confusion_png": svc.blobs.put_bytes(_png())},
            config={}, checkpoint_blob="0" * 64, job_id=None, tenant_id=tenant)
        job = jobs.create_job(s, kind="classify", archive_blob="0" * 64,
                              archive_name="fixture.tar", archive_bytes=len(TAR),
                              model_version_id=model.id, tenant_id=tenant, state="running")
        job.total, job.done, job.failed, job.started_at = 3, 1, 1, now - dt.timedelta(seconds=5)
        text = {"text": {"blob": "1" * 64, "name": "x.txt"}}
        jobs.add_items(s, job.id, [
            {"key": "a/1", "media": text, "label": "cat", "split": None},
            {"key": "a/2", "media": text, "label": "dog", "split": "val"},
            {"key": "a/3", "media": text, "label": None, "split": None}])
        first, second, _ = jobs.item_ids(s, job.id)
        s.add(Result(item_id=first, job_id=job.id, model_version_id=model.id, status="ok",
                     label="cat", confidence=0.75,
                     top_k=[{"label": "cat", "probability": 0.75},
                            {"label": "dog", "probability": 0.25}],
                     embedding=np.arange(4, dtype="<f4").tobytes(),
                     explanation={"strategy": "weighted", "weights": {"text": 1.0},
                                  "weights_kind": "learned", "leave_one_out": {"text": 0.25}}))
        s.add(Result(item_id=second, job_id=job.id, model_version_id=model.id,
                     status="failed", error="x.txt: not UTF-8"))
        train = jobs.create_job(s, kind="train", archive_blob="0" * 64, archive_name="t.tar",
                                archive_bytes=1, model_version_id=model.id, tenant_id=tenant,
                                state="succeeded")
        train.started_at, train.finished_at = now - dt.timedelta(seconds=9), now
        train.report = {"members": 2, "items": 1, "labelled": 1, "skipped_count": 1,
                        "skipped": [{"name": ".DS_Store", "reason": "hidden file"}],
                        "labels_without_item": []}
        return Seeded(job.id, train.id, model.id)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, pg_url_module: str, redis_url: str,
         broker_prefix: str) -> Iterator[Live]:
    settings = Settings.from_env(
        {"MMBATCH_DATA_DIR": str(tmp_path_factory.mktemp("openapi"))},
        database_url=pg_url_module, broker_url=redis_url, broker_prefix=broker_prefix,
        # thousands of requests a minute from one key; the limit's 429 is tested on its own
        rate_limit_per_minute=0, max_upload_bytes=1024**2)
    key = make_key(settings.db_url)
    app = create_app(settings)
    seeded = seed(app, key)
    SEEDED.update(vars(seeded))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Live(f"http://127.0.0.1:{server.server_port}", key, seeded, settings, app)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        SEEDED.clear()
        app.extensions["mmbatch"].db.dispose()


# The document as the server builds it for default settings, loaded at collection so that
# pytest gets one test per operation; the live server is checked to serve this very document.
DOCUMENT = document(Settings())
schema = schemathesis.openapi.from_dict(DOCUMENT)
# a resumable upload's PATCH body: raw bytes
schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(max_size=4096))
SEEDED: dict[str, Any] = {}  # ids the live fixture made, read when examples are drawn


@schema.hook
def flatmap_path_parameters(ctx: Any, params: Any) -> Any:
    if not isinstance(params, dict) or not SEEDED:
        return st.just(params)
    choices = [params]
    if "job_id" in params:
        choices += [{**params, "job_id": SEEDED["classify_job"]},
                    {**params, "job_id": SEEDED["train_job"]}]
    if "model_id" in params:
        choices.append({**params, "model_id": SEEDED["model"]})
    return st.sampled_from(choices)


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if isinstance(body, dict) and "archive" in body:
        return st.sampled_from([body, {**body, "archive": TAR}])
    return st.just(body)


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
def test_live_server_conforms_to_the_document(case: Any, live: Live) -> None:
    case.call_and_validate(base_url=live.url, headers=live.headers, checks=CHECKS, timeout=60)


def test_live_server_serves_the_document_under_test(live: Live) -> None:
    import requests

    r = requests.get(live.url + OPENAPI_PATH, timeout=10)  # no API key
    assert r.status_code == 200 and r.json() == DOCUMENT


def _b64(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


# Inputs that once answered 500 on PostgreSQL: ids and cursors no row can match (past an INTEGER
# column's range, longer than a job id, with a NUL), infinite JSON numbers, and text with NUL.
HOSTILE = [
    ("GET", "/api/v1/jobs/{job_id}", "/api/v1/jobs/%00", {}, 404, "not_found"),
    ("GET", "/api/v1/jobs/{job_id}", "/api/v1/jobs/" + "0" * 33, {}, 404, "not_found"),
    ("GET", "/api/v1/jobs/{job_id}/evaluation", "/api/v1/jobs/a%00/evaluation", {}, 404,
     "not_found"),
    ("POST", "/api/v1/jobs/{job_id}/cancel", "/api/v1/jobs/%00/cancel", {}, 404, "not_found"),
    ("GET", "/api/v1/jobs", "/api/v1/jobs?cursor=" + _b64("j:2020-01-01T00:00:00|\x00"), {},
     400, "invalid_cursor"),
    ("GET", "/api/v1/jobs/{job_id}/results", "/api/v1/jobs/{classify}/results?cursor="
     + _b64("i:99999999999"), {}, 400, "invalid_cursor"),
    ("GET", "/api/v1/jobs/{job_id}/errors", "/api/v1/jobs/{classify}/errors?cursor="
     + _b64("i:-1"), {}, 400, "invalid_cursor"),
    ("GET", "/api/v1/models/{model_id}", "/api/v1/models/2147483648", {}, 404, "not_found"),
    ("POST", "/api/v1/models/{model_id}/promote", "/api/v1/models/99999999999999/promote", {},
     404, "not_found"),
    ("POST", "/api/v1/models/{model_id}/evaluate", "/api/v1/models/99999999999999/evaluate", {},
     404, "not_found"),
    ("POST", "/api/v1/reprocess", "/api/v1/reprocess",
     {"data": '{"model": 1e400}', "content_type": "application/json"}, 400, "unknown_model"),
    ("POST", "/api/v1/reprocess", "/api/v1/reprocess",
     {"json": {"model": 2**31}}, 400, "unknown_model"),
    ("POST", "/api/v1/jobs", "/api/v1/jobs",
     {"data": {"kind": "embed", "model": "99999999999"}}, 400, "unknown_model"),
    ("POST", "/api/v1/jobs", "/api/v1/jobs",
     {"data": {"kind": "train", "name": "a\x00b"}}, 400, "invalid_name"),
    ("POST", "/api/v1/jobs", "/api/v1/jobs",
     {"data": {"kind": "embed"}, "headers": {"Idempotency-Key": "a\x00b"}}, 400,
     "invalid_idempotency_key"),
]


@pytest.mark.parametrize("method,operation,url,kwargs,status,code", HOSTILE,
                         ids=[f"{h[0]} {h[2][:60]}" for h in HOSTILE])
def test_hostile_input_is_a_documented_4xx(live: Live, method: str, operation: str, url: str,
                                           kwargs: dict[str, Any], status: int,
                                           code: str) -> None:
    client = live.app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {live.key}"
    if isinstance(kwargs.get("data"), dict):
        kwargs = {**kwargs, "data": {**kwargs["data"], "archive": (io.BytesIO(TAR), "x.tar")}}
    r = client.open(url.format(classify=live.seeded.classify_job), method=method, **kwargs)
    assert (r.status_code, r.get_json()["error"]["code"]) == (status, code), r.get_json()
    schema[operation][method].validate_response(r)


@pytest.mark.parametrize("url", ["/api/v1/jobs", "/api/v1/models/{model}/evaluate"])
def test_control_characters_leave_the_archive_name(live: Live, url: str) -> None:
    client = live.app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {live.key}"
    r = client.post(url.format(model=live.seeded.model),
                    data={"kind": "classify", "archive": (io.BytesIO(TAR), "a\x00b\x07.tar")})
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["archive"]["name"] == "ab.tar"
    path = url.replace("{model}", "{model_id}")
    schema[path]["POST"].validate_response(r)


def test_too_large_an_upload_is_a_documented_413(live: Live) -> None:
    client = live.app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {live.key}"
    big = TAR + b"\0" * live.settings.max_upload_bytes
    r = client.post("/api/v1/jobs", data={"kind": "embed", "archive": (io.BytesIO(big), "x.tar")})
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "request_entity_too_large"
    schema["/api/v1/jobs"]["POST"].validate_response(r)


def test_database_down_is_a_documented_503(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"},
                                 database_url="postgresql+psycopg://postgres@127.0.0.1:9/none")
    app = create_app(settings)
    client = app.test_client()
    from store.keys import KEY_PREFIX

    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {KEY_PREFIX}{'0' * 32}"  # looked up
    for path in ("/healthz", "/api/v1/models"):
        r = client.get(path)
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "database_unavailable"
        schema[path]["GET"].validate_response(r)


# -- the document itself --------------------------------------------------------------------

@pytest.fixture
def app(tmp_path: Path) -> Any:
    from store.migrate import upgrade

    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    return create_app(settings)


def _document(app: Any) -> dict[str, Any]:
    r = app.test_client().get(OPENAPI_PATH)  # no API key
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.get_json()  # type: ignore[no-any-return]


def test_document_is_valid_openapi(app: Any) -> None:
    doc = _document(app)
    assert doc["openapi"].startswith("3.")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI meta-schema
    broken = {**doc, "paths": {"/x": {"get": {"responses": {"200": {"content": 1}}}}}}
    with pytest.raises(ValueError):  # jsonschema_rs.ValidationError
        schemathesis.openapi.from_dict(broken).validate()


def _routes(app: Any) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every /api rule and /healthz."""
    out = set()
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/") or rule.rule == "/healthz"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        out |= {(m.lower(), path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_every_api_route_is_documented_and_nothing_else(app: Any) -> None:
    doc = _document(app)
    documented = {(method, path) for path, item in doc["paths"].items() for method in item
                  if method in ("get", "put", "post", "delete", "patch")}
    routes = _routes(app)
    assert routes - documented == set(), "routes the document does not describe"
    assert documented - routes == set(), "documented operations no route serves"
    assert len(routes) >= 15
    assert not any(path.startswith(("/ui", "/metrics")) for _, path in documented)


def test_route_and_document_differences_are_noticed(app: Any) -> None:
    """The comparison above is not vacuous: a route added without documentation shows up."""
    app.add_url_rule("/api/v1/undocumented/<int:n>", "undocumented", lambda n: "", methods=["PUT"])
    documented = {(m, p) for p, item in _document(app)["paths"].items() for m in item}
    assert ("put", "/api/v1/undocumented/{n}") in _routes(app) - documented


def test_every_form_field_the_code_reads_is_documented(app: Any) -> None:
    form = _document(app)["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    options = {f.name for f in dataclasses.fields(TrainOptions)}
    assert set(form) == {"archive", "upload", "kind", "model", "callback_url", "priority",
                         "adapt", *options}
    assert {"name", "epochs", "seed", "strategy", "mode", "budget"} <= options
    balanced = {k: v for k, v in form["balanced"].items() if k != "description"}
    assert balanced == {"type": "boolean"} and form["strategy"]["enum"][0] == "concat"
    # every option has a precise schema: a type and its choices or its range
    for name in options:
        schema = form[name]
        assert "enum" in schema or "maxLength" in schema or schema["type"] == "boolean" or (
            "minimum" in schema and "maximum" in schema), name


def test_every_authenticated_operation_needs_the_bearer_key(app: Any) -> None:
    doc = _document(app)
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert doc["security"] == [{"bearer": []}]
    client = app.test_client()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            public = op.get("security") == []
            assert public == (path in (OPENAPI_PATH, "/healthz")), (method, path)
            if public:
                continue
            url = (path.replace("{job_id}", "0" * 32).replace("{model_id}", "1")
                       .replace("{item_id}", "1"))
            r = client.open(url, method=method.upper())
            assert r.status_code == 401, (method, path)
            assert "401" in op["responses"] and "429" in op["responses"]
            _operation(app, path, method).validate_response(r)


def _operation(app: Any, path: str, method: str) -> Any:
    return schemathesis.openapi.from_dict(_document(app))[path][method.upper()]


def test_rate_limited_answer_matches_the_document(tmp_path: Path) -> None:
    from store.migrate import upgrade

    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_RATE_LIMIT_PER_MINUTE": "1"})
    upgrade(settings.db_url)
    app = create_app(settings)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.db_url)}"
    assert client.get("/api/v1/models").status_code == 200
    r = client.get("/api/v1/models")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    _operation(app, "/api/v1/models", "get").validate_response(r)


def test_a_payload_that_drifts_from_the_document_fails_validation(app: Any) -> None:
    """The response schemas are strict enough to catch an extra or a missing field."""
    client = app.test_client()
    key = make_key(app.extensions["mmbatch"].settings.db_url)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    r = client.post("/api/v1/jobs", data={"kind": "embed", "archive": (io.BytesIO(TAR), "x.tar")})
    assert r.status_code == 202
    op = _operation(app, "/api/v1/jobs", "post")
    op.validate_response(r)
    job = r.get_json()
    for drifted in ({**job, "surprise": 1}, {k: v for k, v in job.items() if k != "state"},
                    {**job, "state": "paused"}, {**job, "progress": None}):
        r.set_data(json.dumps(drifted))
        with pytest.raises((AssertionError, BaseExceptionGroup)):  # Failure(s)
            op.validate_response(r)
