"""Corrections, label issues and the review queue: a train job ranks its own planted label flips,
a person corrects an item's label through the API (append-only events, the later one wins) and
reviews the least sure predictions first; tenants stay apart.

In-process: the app from its factory over a real SQLite database and the worker's own functions
(ingest, batches with the real encoders, training), as tests/test_architecture.py runs them.
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from samples.noise import flip_labels
from store import keys
from tests.util import embedded_runtime, run_in_process
from web.app import create_app
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.training import train_job

FLIPS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_dir: Any) -> Any:
    """A train job on the sample with FLIPS labels flipped, run to its model."""
    tmp = tmp_path_factory.mktemp("labels")
    archive = tmp / "flipped.tar.gz"
    flipped = flip_labels(sample_dir.train, archive, FLIPS / 76, seed=3)  # 76 in the train split
    rt = embedded_runtime(tmp / "data")
    with rt.db.session() as s:
        mine, other = keys.create_key(s, "mine"), keys.create_key(s, "other", "elsewhere")
    app = create_app(rt.settings)
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: None  # the worker is here
    client = app.test_client()

    def run(path: Path, kind: str, key: str, **form: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"}
        job_id = run_in_process(rt, client, path, kind, headers, **form)
        return client.get(f"/api/v1/jobs/{job_id}",  # type: ignore[no-any-return]
                          headers=headers).get_json()

    job = run(archive, "train", mine.key, epochs="8")
    assert job["state"] == "succeeded", job
    other_job = run(sample_dir.unlabelled, "embed", other.key)
    classified = run(sample_dir.unlabelled, "classify", mine.key)
    yield {"client": client, "job": job, "model": job["model"]["id"], "flipped": flipped,
           "classified": classified, "rt": rt,
           "mine": {"Authorization": f"Bearer {mine.key}"},
           "other": {"Authorization": f"Bearer {other.key}"}, "other_job": other_job}
    rt.close()


def _items(env: Any, job_id: str, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    page = env["client"].get(f"/api/v1/jobs/{job_id}/results?limit=1000", headers=headers)
    return {i["key"]: i for i in page.get_json()["items"]}


def test_a_train_job_ranks_its_planted_flips_first(trained: Any) -> None:
    client, model = trained["client"], trained["model"]
    found = client.get(f"/api/v1/models/{model}/label-issues?limit=1000",
                       headers=trained["mine"]).get_json()
    keys_found = [i["key"] for i in found["issues"]]
    assert found["found"] == len(found["issues"]) > 0
    # 96 items, 6 flipped: a list in random order holds 0.75 of them in its first 12. On the
    # sample's features, across seeds, the first 12 hold 4 to 6 (tests/test_label_issues.py
    # checks the method on clearer clusters).
    caught = set(keys_found[:2 * FLIPS]) & set(trained["flipped"])
    assert len(caught) >= 4, (keys_found[:2 * FLIPS], trained["flipped"])
    for issue in found["issues"]:
        if issue["key"] in trained["flipped"]:
            true, given = trained["flipped"][issue["key"]]
            assert issue["given_label"] == given
    qualities = [i["quality"] for i in found["issues"]]
    assert qualities == sorted(qualities)  # worst first
    model_page = client.get(f"/api/v1/models/{model}", headers=trained["mine"]).get_json()
    assert model_page["metrics"]["label_issues"]["found"] == found["found"]


def test_label_issues_page_with_a_cursor_and_stay_in_their_tenant(trained: Any) -> None:
    client, model = trained["client"], trained["model"]
    whole = client.get(f"/api/v1/models/{model}/label-issues?limit=1000",
                       headers=trained["mine"]).get_json()["issues"]
    paged, cursor = [], ""
    while True:
        page = client.get(f"/api/v1/models/{model}/label-issues?limit=2&cursor={cursor}",
                          headers=trained["mine"]).get_json()
        paged += page["issues"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i["item"] for i in paged] == [i["item"] for i in whole]
    assert client.get(f"/api/v1/models/{model}/label-issues",
                      headers=trained["other"]).status_code == 404
    bad = client.get(f"/api/v1/models/{model}/label-issues?cursor=nonsense",
                     headers=trained["mine"])
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_cursor"


def test_corrections_are_appended_and_the_later_one_wins(trained: Any) -> None:
    client, headers = trained["client"], trained["mine"]
    key, (true, given) = next(iter(trained["flipped"].items()))
    item = _items(trained, trained["job"]["id"], headers)[key]["item_id"]
    first = client.post(f"/api/v1/items/{item}/label", json={"label": true}, headers=headers)
    assert first.status_code == 201, first.get_json()
    assert first.get_json()["event"]["old_label"] == given
    assert first.get_json()["event"]["model"] == trained["model"]
    second = client.post(f"/api/v1/items/{item}/label", json={"label": given}, headers=headers)
    assert second.status_code == 201
    history = client.get(f"/api/v1/items/{item}/labels", headers=headers).get_json()
    assert [(e["old_label"], e["new_label"]) for e in history["events"]] == \
        [(given, true), (true, given)]
    assert history["given_label"] == given and history["label"] == given
    assert all(e["verified"] for e in history["events"])
    client.post(f"/api/v1/items/{item}/label", json={"label": true}, headers=headers)
    issues = client.get(f"/api/v1/models/{trained['model']}/label-issues?limit=1000",
                        headers=headers).get_json()["issues"]
    shown = [i for i in issues if i["item"] == item]
    assert not shown or shown[0]["label"] == true  # the issue shows the label as it is now


@pytest.mark.parametrize("body, status, code", [
    ({"label": "unicorn"}, 400, "unknown_label"),
    ({"label": ""}, 400, "invalid_label"),
    ({"label": "a\x00b"}, 400, "invalid_label"),
    ({"label": 3}, 400, "invalid_label"),
    (["day_bird"], 400, "invalid_body"),
    ({"label": "day_bird", "model": 999999}, 400, "unknown_model"),
])
def test_bad_corrections_are_400(trained: Any, body: Any, status: int, code: str) -> None:
    headers = trained["mine"]
    item = next(iter(_items(trained, trained["job"]["id"], headers).values()))["item_id"]
    r = trained["client"].post(f"/api/v1/items/{item}/label", json=body, headers=headers)
    assert r.status_code == status and r.get_json()["error"]["code"] == code, r.get_json()
    if code == "unknown_label":  # names the classes it may be
        assert "day_bird" in r.get_json()["error"]["message"]


def test_items_of_another_tenant_and_unknown_items_are_404(trained: Any) -> None:
    client = trained["client"]
    theirs = next(iter(_items(trained, trained["other_job"]["id"],
                              trained["other"]).values()))["item_id"]
    for item in (theirs, 2**31, 0):
        for r in (client.post(f"/api/v1/items/{item}/label", json={"label": "day_bird"},
                              headers=trained["mine"]),
                  client.get(f"/api/v1/items/{item}/labels", headers=trained["mine"])):
            assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    # the other tenant has no model: any label is taken for its own item
    r = client.post(f"/api/v1/items/{theirs}/label", json={"label": "anything"},
                    headers=trained["other"])
    assert r.status_code == 201 and r.get_json()["event"]["model"] is None


def _margin(item: dict[str, Any]) -> float:
    probs = sorted((t["probability"] for t in item["top_k"]), reverse=True) + [0.0]
    return float(probs[0] - probs[1])


def test_the_review_queue_pages_the_least_sure_first_and_a_labelled_item_leaves_it(
        trained: Any) -> None:
    client, headers, job = trained["client"], trained["mine"], trained["classified"]["id"]
    seen: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = client.get(f"/api/v1/review?job={job}&limit=5&cursor={cursor}",
                          headers=headers).get_json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    results = _items(trained, job, headers).values()
    assert {r["model_version"] for r in results} == {trained["model"]}  # which model said so
    margins = [_margin(i) for i in seen]
    assert margins == sorted(margins) and len(seen) == len({i["item"] for i in seen}) == 32
    assert all(i["reason"].startswith("least sure: margin") for i in seen)
    first = seen[0]
    r = client.post(f"/api/v1/items/{first['item']}/label", json={"label": first["label"]},
                    headers=headers)  # accepting the prediction is a label event too
    assert r.status_code == 201 and r.get_json()["event"]["old_label"] is None
    after = client.get(f"/api/v1/review?job={job}&limit=100", headers=headers).get_json()
    assert first["item"] not in {i["item"] for i in after["items"]}
    assert len(after["items"]) == 31


def test_a_diverse_page_comes_from_the_least_sure_and_spreads_out(trained: Any) -> None:
    client, headers, job = trained["client"], trained["mine"], trained["classified"]["id"]
    diverse = client.get(f"/api/v1/review?job={job}&strategy=diverse&limit=3",
                         headers=headers).get_json()
    uncertain = client.get(f"/api/v1/review?job={job}&limit=30", headers=headers).get_json()
    pool = [i["item"] for i in uncertain["items"]]
    picked = [i["item"] for i in diverse["items"]]
    assert len(picked) == len(set(picked)) == 3 and set(picked) <= set(pool)
    assert picked[0] == pool[0]  # k-centre starts from the least sure
    assert picked != pool[:3]  # and then goes elsewhere than the next least sure
    assert diverse["next_cursor"] is None


def test_the_review_queue_of_label_issues_follows_the_issue_list(trained: Any) -> None:
    client, headers, model = trained["client"], trained["mine"], trained["model"]
    issues = client.get(f"/api/v1/models/{model}/label-issues?limit=4",
                        headers=headers).get_json()["issues"]
    review = client.get(f"/api/v1/review?model={model}&strategy=label-issues&limit=4",
                        headers=headers).get_json()
    assert [i["item"] for i in review["items"]] == [i["item"] for i in issues]
    assert "looks wrong" in review["items"][0]["reason"]


@pytest.mark.parametrize("query, who, status, code", [
    ("strategy=loudest&job={classified}", "mine", 400, "invalid_strategy"),
    ("strategy=uncertain", "mine", 400, "invalid_job"),
    ("strategy=label-issues", "mine", 400, "invalid_model"),
    ("job={train}", "mine", 409, "not_a_classify_job"),
    ("job={classified}", "other", 404, "not_found"),
    ("job={classified}&cursor=bm9wZQ", "mine", 400, "invalid_cursor"),
    ("job={classified}&limit=0", "mine", 400, "invalid_limit"),
])
def test_bad_review_requests_are_4xx(trained: Any, query: str, who: str, status: int,
                                     code: str) -> None:
    url = "/api/v1/review?" + query.format(classified=trained["classified"]["id"],
                                          train=trained["job"]["id"])
    r = trained["client"].get(url, headers=trained[who])
    assert r.status_code == status and r.get_json()["error"]["code"] == code, r.get_json()


def test_retraining_from_jobs_uses_corrections_and_holds_out_what_people_verified(
        trained: Any) -> None:
    client, headers = trained["client"], trained["mine"]
    train_id, classify_id = trained["job"]["id"], trained["classified"]["id"]
    # a person labels three of the classify job's items (one of them twice: the later counts)
    picked = list(_items(trained, classify_id, headers).values())[-3:]
    for item in picked:
        r = client.post(f"/api/v1/items/{item['item_id']}/label",
                        json={"label": item["label"]}, headers=headers)
        assert r.status_code == 201
    r = client.post(f"/api/v1/items/{picked[0]['item_id']}/label", json={"label": "day_frog"},
                    headers=headers)
    assert r.status_code == 201
    body = {"kind": "train", "from_jobs": [train_id, classify_id], "holdout": "verified",
            "epochs": 4, "name": "retrained"}
    r = client.post("/api/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "re-1"})
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    again = client.post("/api/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "re-1"})
    assert again.status_code == 200 and again.get_json()["id"] == job_id
    other = client.post("/api/v1/jobs", json={**body, "epochs": 5},
                        headers={**headers, "Idempotency-Key": "re-1"})
    assert other.status_code == 422
    for ids in ingest_job(trained["rt"], job_id):
        if BatchProcessor(trained["rt"], job_id, ids).run().next_step == "train":
            train_job(trained["rt"], job_id)
    job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
    assert job["state"] == "succeeded", job
    report = client.get(f"/api/v1/jobs/{job_id}/report", headers=headers).get_json()["report"]
    verified = report["verified"]
    assert verified >= 3  # the three above, and any the other tests labelled
    results = _items(trained, job_id, headers)
    copied = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(classify_id)}
    assert len(copied) >= 3  # the classify items people labelled; the others have no label
    assert len(results) == 96 + len(copied)  # and every train item
    assert copied[picked[0]["key"]]["given_label"] == "day_frog"  # the latest event
    assert all(v["split"] == "val" for v in copied.values())
    assert sum(v["split"] == "val" for v in results.values()) == verified
    model = client.get(f"/api/v1/models/{job['model']['id']}", headers=headers).get_json()
    confusion = model["metrics"]["validation"]["confusion"]
    assert sum(map(sum, confusion)) == verified  # validated on what people verified
    gate = model["metrics"]["promotion"]  # against the first model, on the same holdout
    assert gate["against"] == trained["model"] and gate["holdout_items"] == verified
    assert gate["gate"] in ("passed", "failed")
    assert (gate["gate"] == "passed") == (gate["macro_f1"] >= gate["default_macro_f1"])
    assert model["is_default"] == (gate["gate"] == "passed")
    if gate["gate"] == "failed":  # promoting it anyway says so
        r = client.post(f"/api/v1/models/{model['id']}/promote", headers=headers).get_json()
        assert r["is_default"] and r["metrics"]["promotion"]["promoted_by_hand"] is True
    client.post(f"/api/v1/models/{trained['model']}/promote", headers=headers)  # as it was


def _retrain(trained: Any, from_jobs: list[str], name: str) -> dict[str, Any]:
    """A train job from ``from_jobs`` with the verified holdout, run to its model."""
    client, headers, rt = trained["client"], trained["mine"], trained["rt"]
    r = client.post("/api/v1/jobs", json={"kind": "train", "from_jobs": from_jobs,
                                          "holdout": "verified", "epochs": 8, "name": name},
                    headers=headers)
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    for ids in ingest_job(rt, job_id):
        if BatchProcessor(rt, job_id, ids).run().next_step == "train":
            train_job(rt, job_id)
    job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
    assert job["state"] == "succeeded", job
    return client.get(f"/api/v1/models/{job['model']['id']}",  # type: ignore[no-any-return]
                      headers=headers).get_json()


def test_the_promotion_gate_keeps_a_worse_version_a_candidate_and_promotes_a_better_one(
        trained: Any, sample_dir: Any, tmp_path: Path) -> None:
    client, headers = trained["client"], trained["mine"]
    classify_id = trained["classified"]["id"]
    truth = dict(csv.reader(io.StringIO(sample_dir.truth.read_text())))
    for item in list(_items(trained, classify_id, headers).values())[:16]:  # the holdout
        r = client.post(f"/api/v1/items/{item['item_id']}/label",
                        json={"label": truth[item["key"]]}, headers=headers)
        assert r.status_code == 201, r.get_json()
    # every label of the train archive moved to the next class: a version trained on it is
    # consistently wrong, far worse on the holdout than the default
    with tarfile.open(sample_dir.train) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("labels.csv"))
        given = {r["key"]: r["label"] for r in csv.DictReader(
            io.StringIO(tf.extractfile(member).read().decode()))}  # type: ignore[union-attr]
    classes = sorted(set(given.values()))
    shifted = tmp_path / "shifted.tar.gz"
    flip_labels(sample_dir.train, shifted, 0.0,
                fix={k: classes[(classes.index(v) + 1) % len(classes)] for k, v in given.items()})
    source = run_in_process(trained["rt"], client, shifted, "train", headers, epochs="4")
    worse = _retrain(trained, [source, classify_id], "gate-worse")
    gate = worse["metrics"]["promotion"]
    assert gate["gate"] == "failed" and gate["against"] == trained["model"], gate
    assert gate["macro_f1"] < gate["default_macro_f1"]
    assert not worse["is_default"] and "candidate" in gate["why"]
    default = client.get("/api/v1/models", headers=headers).get_json()
    assert [m["id"] for m in default["models"] if m["is_default"]] == [trained["model"]]
    # promoted by hand anyway: it says so; then a version trained on the right labels beats it
    # on the same holdout and becomes the default by itself
    r = client.post(f"/api/v1/models/{worse['id']}/promote", headers=headers).get_json()
    assert r["is_default"] and r["metrics"]["promotion"]["promoted_by_hand"] is True
    better = _retrain(trained, [trained["job"]["id"], classify_id], "gate-better")
    gate = better["metrics"]["promotion"]
    assert gate["gate"] == "passed" and gate["against"] == worse["id"], gate
    assert gate["macro_f1"] > gate["default_macro_f1"] and better["is_default"]
    client.post(f"/api/v1/models/{trained['model']}/promote", headers=headers)  # as it was


@pytest.mark.parametrize("body, status, code", [
    ({"kind": "train", "from_jobs": []}, 400, "invalid_from_jobs"),
    ({"kind": "train", "from_jobs": "abc"}, 400, "invalid_from_jobs"),
    ({"kind": "classify", "from_jobs": ["{train}"]}, 400, "invalid_kind"),
    ({"kind": "train", "from_jobs": ["{train}"], "holdout": "all"}, 400, "invalid_holdout"),
    ({"kind": "train", "from_jobs": ["{train}"], "epochz": 3}, 400, "unknown_field"),
    ({"kind": "train", "from_jobs": ["{train}"], "epochs": "many"}, 400, "invalid_epochs"),
    ({"kind": "train", "from_jobs": ["{other}"]}, 400, "unknown_job"),
    (["train"], 400, "send_multipart"),
    ({"kind": "train", "epochs": 3}, 400, "send_multipart"),
])
def test_bad_retrain_requests_are_4xx(trained: Any, body: Any, status: int, code: str) -> None:
    ids = {"train": trained["job"]["id"], "other": trained["other_job"]["id"]}
    if isinstance(body, dict):
        body = {k: [j.format(**ids) for j in v] if isinstance(v, list) else v
                for k, v in body.items()}
    r = trained["client"].post("/api/v1/jobs", json=body, headers=trained["mine"])
    assert r.status_code == status and r.get_json()["error"]["code"] == code, r.get_json()
