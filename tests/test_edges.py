"""The edges a new user meets first, on the inputs side: labels.csv duplicates, Idempotency-Keys
reused for another request, failed jobs and their reports, Windows and whole-folder zips, models
applied to other classes, requests the API used to accept quietly, text as people save it, and
a reprocess a client can follow.

The app from its factory over a real SQLite database (kombu's in-memory broker, nothing consumes
it); ingest and batches as the plain functions a worker runs.
"""

from __future__ import annotations

import io
import json
import threading
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from cli import main as cli_main
from media.archive import ArchiveError, parse_labels
from store import jobs, keys
from store.registry import register_model
from tests.util import embedded_runtime, tar_bytes
from web.app import create_app
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    runtime = embedded_runtime(tmp_path)
    yield runtime
    runtime.close()


@pytest.fixture
def api(rt: Runtime) -> Any:
    app = create_app(rt.settings)
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: None  # nothing consumes it
    client = app.test_client()
    with rt.db.session() as s:
        new = keys.create_key(s, "edges")
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {new.key}"
    client.key, client.tenant = new.key, new.tenant_id  # type: ignore[attr-defined]
    return client


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _submit(api: Any, archive: bytes, kind: str = "embed", name: str = "a.tar",
            headers: dict[str, str] | None = None, **form: str) -> Any:
    return api.post("/api/v1/jobs", headers=headers or {},
                    data={"kind": kind, **form, "archive": (io.BytesIO(archive), name)})


def _run(rt: Runtime, job_id: str) -> None:
    """What the worker does with the job: ingest, then every batch."""
    for ids in ingest_job(rt, job_id):
        BatchProcessor(rt, job_id, ids).run()


def _error(r: Any) -> dict[str, Any]:
    body = r.get_json()
    assert set(body) == {"error"}, body
    return body["error"]  # type: ignore[no-any-return]


def _model(rt: Runtime, api: Any, classes: list[str]) -> int:
    with rt.db.session() as s:
        return register_model(s, name="m", fusion="concat", classes=classes,
                              encoders={"text": {"name": "x", "version": "v", "dim": 4}},
                              metrics={}, config={}, checkpoint_blob="0" * 64, job_id=None,
                              tenant_id=api.tenant).id


# --- 5. labels.csv with duplicate keys --------------------------------------------------------

def test_conflicting_duplicate_labels_fail_naming_the_lines() -> None:
    with pytest.raises(ArchiveError, match=r"labels\.csv lines 2 and 4: item a is labelled "
                                           r"both 'cat' and 'dog'"):
        parse_labels(b"key,label\na,cat\nb,dog\na,dog\n")
    rows = parse_labels(b"key,label\na,cat\nb,dog\na,cat\n")
    assert rows.duplicates == [{"key": "a", "lines": [2, 4]}]
    assert rows["a"].label == "cat"


def test_identical_duplicate_labels_are_reported_on_the_job(rt: Runtime, api: Any) -> None:
    archive = tar_bytes({"a.txt": b"x", "b.txt": b"y",
                         "labels.csv": b"key,label\na,cat\nb,dog\na,cat\n"})
    job = _submit(api, archive, "train").get_json()
    ingest_job(rt, job["id"])
    report = api.get(f"/api/v1/jobs/{job['id']}/report").get_json()["report"]
    assert report["duplicate_labels"] == [{"key": "a", "lines": [2, 4]}]


# --- 6. Idempotency-Key reused for another request -------------------------------------------

def test_an_idempotency_key_reused_for_another_request_is_422(api: Any) -> None:
    one, other = tar_bytes({"a.txt": b"one"}), tar_bytes({"a.txt": b"other"})
    key = {"Idempotency-Key": "k-1"}
    first = _submit(api, one, headers=key)
    assert first.status_code == 202
    again = _submit(api, one, headers=key)  # the same request: the same job
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    for r in (_submit(api, other, headers=key),  # another archive
              _submit(api, one, "classify", headers=key),  # another kind
              _submit(api, one, headers=key, callback_url="https://example.com/h")):
        assert r.status_code == 422, r.get_json()
        assert _error(r)["code"] == "idempotency_key_reused"


# --- 7. a failed job keeps its report; Windows paths ------------------------------------------

def test_a_failed_job_keeps_its_report_and_names_the_real_reason(rt: Runtime, api: Any) -> None:
    archive = _zip({"..\\up.jpg": b"x", "/abs.txt": b"y"})
    job = _submit(api, archive, name="bad.zip").get_json()
    ingest_job(rt, job["id"])
    polled = api.get(f"/api/v1/jobs/{job['id']}").get_json()
    assert polled["state"] == "failed"
    assert "all of its 2 files were skipped (2 unsafe path" in polled["error"], polled["error"]
    report = api.get(f"/api/v1/jobs/{job['id']}/report").get_json()["report"]
    assert report["skipped_count"] == 2
    assert {s["reason"] for s in report["skipped"]} == {"unsafe path"}


def test_backslash_paths_of_windows_zips_are_folders(rt: Runtime, api: Any) -> None:
    archive = _zip({"g\\000.txt": b"zero", "g\\001.txt": b"one", "g\\..\\..\\x.txt": b"no"})
    job = _submit(api, archive, name="win.zip").get_json()
    _run(rt, job["id"])
    results = api.get(f"/api/v1/jobs/{job['id']}/results").get_json()["items"]
    assert sorted(r["key"] for r in results) == ["g/000", "g/001"]
    report = api.get(f"/api/v1/jobs/{job['id']}/report").get_json()["report"]
    assert report["skipped"] == [{"name": "g/../../x.txt", "reason": "unsafe path"}]


# --- 8. a zip of a whole folder -------------------------------------------------------------

def test_labels_in_the_one_top_level_folder_count(rt: Runtime, api: Any) -> None:
    files = {"mydata/labels.csv": b"key,label\na/001,cat\nb/002,dog\n",
             "mydata/a/001.txt": b"a cat", "mydata/b/002.txt": b"a dog"}
    train = _submit(api, _zip(files), "train", name="mydata.zip")
    assert train.status_code == 202
    ingest_job(rt, train.get_json()["id"])
    job = api.get(f"/api/v1/jobs/{train.get_json()['id']}").get_json()
    assert job["state"] == "running", job["error"]
    results = api.get(f"/api/v1/jobs/{job['id']}/results").get_json()["items"]
    assert {r["key"]: r["given_label"] for r in results} == {"mydata/a/001": "cat",
                                                            "mydata/b/002": "dog"}


# --- 9. a model applied to other classes ------------------------------------------------------

def test_evaluating_on_classes_the_model_lacks_says_so(rt: Runtime, api: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model_id = _model(rt, api, ["cat", "dog"])
    archive = _write(rt, "eval.tar", tar_bytes({
        "x1.txt": b"a", "x2.txt": b"b", "labels.csv": b"key,label\nx1,zebra\nx2,lion\n"}))
    server = make_server("127.0.0.1", 0, api.application, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    done = threading.Event()

    def worker() -> None:  # what the worker writes: every item classified as "cat"
        while not done.is_set():
            with rt.db.session() as s:
                queued = [j.id for j in jobs.list_jobs(s, api.tenant, before=None, limit=5)
                          if j.state == "queued"]
            for job_id in queued:
                ingest_job(rt, job_id)
                with rt.db.session() as s:
                    ids = jobs.item_ids(s, job_id)
                    jobs.record_outcomes(s, job_id, model_id, [
                        jobs.ItemOutcome(i, label="cat", confidence=0.9) for i in ids])
                    jobs.finish_job(s, job_id)
            done.wait(0.1)

    threading.Thread(target=worker, daemon=True).start()
    monkeypatch.setenv("MMBATCH_API_KEY", api.key)
    try:
        out = CliRunner().invoke(cli_main.main, [
            "evaluate", str(model_id), str(archive), "--url",
            f"http://127.0.0.1:{server.server_port}"])
    finally:
        done.set()
        server.shutdown()
    assert out.exception is None or isinstance(out.exception, SystemExit), out.output
    assert "lion, zebra" in out.output
    [job] = api.get("/api/v1/jobs").get_json()["jobs"]
    [warning] = job["warnings"]
    assert "lion, zebra" in warning and "cat, dog" in warning
    scores = api.get(f"/api/v1/jobs/{job['id']}/evaluation").get_json()
    assert scores["warnings"] == [warning] and scores["macro_f1"] is None


def _write(rt: Runtime, name: str, data: bytes) -> Path:
    path = rt.settings.data_dir / name
    path.write_bytes(data)
    return path


# --- 10. requests accepted quietly ----------------------------------------------------------

def test_what_the_api_used_to_accept_quietly_is_400(api: Any) -> None:
    one = tar_bytes({"a.txt": b"x"})
    cases = [
        ({"kind": "embed", "archive": [(io.BytesIO(one), "a.tar"), (io.BytesIO(one), "b.tar")]},
         "one_archive"),
        ({"kind": ["embed", "train"], "archive": (io.BytesIO(one), "a.tar")}, "one_kind"),
        ({"kind": "train", "archive": (io.BytesIO(one), "a.tar"), "epoch": "5"},
         "unknown_field"),
        ({"kind": "classify", "archive": (io.BytesIO(one), "a.tar"), "strategy": "late"},
         "train_only_option"),
    ]
    for data, code in cases:
        r = api.post("/api/v1/jobs", data=data)
        assert r.status_code == 400 and _error(r)["code"] == code, (code, r.get_json())
    r = api.post("/api/v1/jobs", data=one, content_type="application/zip")
    assert r.status_code == 400 and _error(r)["code"] == "send_multipart"
    r = api.post("/api/v1/jobs", json={"kind": "embed"})
    assert r.status_code == 400 and _error(r)["code"] == "send_multipart"


def test_the_command_line_refuses_an_unknown_option(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"a.txt": b"x"}))
    out = CliRunner().invoke(cli_main.main, ["submit", str(archive), "--kind", "train",
                                             "--set", "epoch=5", "--url", "http://127.0.0.1:9"])
    assert out.exit_code == 2 and "unknown option 'epoch'" in out.output
    assert "epochs" in out.output  # says what it might have meant


# --- 11. text as people save it ---------------------------------------------------------------

def test_captions_in_other_encodings_are_read_and_say_so(rt: Runtime, api: Any) -> None:
    long = ("word " * 30_000).encode()
    files = {"u16.txt": b"\xff\xfe" + "café au lait".encode("utf-16-le"),
             "latin.txt": "crème brûlée".encode("latin-1"),
             "utf8.txt": "plain".encode(),
             "long.txt": long,
             "blank.txt": b"  \n\t ", "blank.png": _png()}
    job = _submit(api, tar_bytes(files)).get_json()
    _run(rt, job["id"])
    rows = {r["key"]: r for r in
            api.get(f"/api/v1/jobs/{job['id']}/results").get_json()["items"]}
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(
        ["u16", "latin", "utf8", "long", "blank"], "ok")
    assert rows["u16"]["text_encoding"] == "utf-16"
    assert rows["latin"]["text_encoding"] == "windows-1252"
    assert rows["utf8"]["text_encoding"] == "utf-8"
    assert rows["long"]["text_truncated"] is True and rows["utf8"]["text_truncated"] is False
    assert rows["blank"]["modalities"] == ["image"]  # whitespace only: no text modality


def test_a_name_in_nfc_and_nfd_is_one_key(rt: Runtime, api: Any) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    job = _submit(api, tar_bytes({f"{nfc}.txt": b"text", f"{nfd}.png": _png()})).get_json()
    ingest_job(rt, job["id"])
    results = api.get(f"/api/v1/jobs/{job['id']}/results").get_json()["items"]
    assert [(r["key"], r["modalities"]) for r in results] == [(nfc, ["image", "text"])]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- 14. a reprocess a client can follow ------------------------------------------------------

def test_reprocess_answers_with_its_job_or_why_there_is_none(rt: Runtime, api: Any) -> None:
    r = api.post("/api/v1/reprocess")
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {"status": "nothing to reprocess", "reason": "no default model"}
    model_id = _model(rt, api, ["a", "b"])
    r = api.post("/api/v1/reprocess")
    assert r.status_code == 200 and r.get_json()["reason"] == "nothing to reprocess"
    job = _submit(api, tar_bytes({"a.txt": b"x"}), "classify", model=str(model_id)).get_json()
    _run(rt, job["id"])  # its text encoder version is not the worker's: the item fails
    r = api.post("/api/v1/reprocess")
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["kind"] == "reprocess" and r.headers["Location"] == body["links"]["self"]
    assert api.get(r.headers["Location"]).get_json()["id"] == body["id"]
    assert json.loads(json.dumps(body))["model"]["id"] == model_id


# --- 13. the command line's summaries ---------------------------------------------------------

@pytest.fixture
def served(api: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app over real HTTP (for the command line), the API key in the environment."""
    server = make_server("127.0.0.1", 0, api.application, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MMBATCH_API_KEY", api.key)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_command_line_says_how_many_more_and_when_nothing_is_due(
        rt: Runtime, api: Any, served: str) -> None:
    job = _submit(api, tar_bytes({f"t{i:02d}.txt": b"x" for i in range(14)})).get_json()
    ingest_job(rt, job["id"])
    out = CliRunner().invoke(cli_main.main, ["status", job["id"], "--url", served])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli_main.main, ["results", job["id"], "--format", "table",
                                             "--url", served])
    assert out.exit_code == 0, out.output
    assert "t00" in out.output and "t13" in out.output  # the table holds every row
    summary = CliRunner().invoke(cli_main.main, ["results", job["id"], "--format", "table",
                                                 "--limit", "10", "--url", served])
    assert "… 4 more" in summary.output, summary.output
    out = CliRunner().invoke(cli_main.main, ["reprocess", "--url", served])
    assert out.exit_code == 0 and "nothing to reprocess" in out.output, out.output
