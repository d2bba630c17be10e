"""Search end to end with real processes: the API server, a Celery worker, the search service,
the embedded broker and database (what ``mmbatch up`` runs).

An align job on a small paired archive trains an aligner and builds its index; an embed job
with the aligner appends a segment. Then: search by text, by an image file, items like one,
filters that keep few items (inside the search: k results), another tenant that sees nothing
of it, the 400s and the 409 a client meets, and search surviving a search-service restart.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from cli.client import ApiError, Client
from cli.stack import Stack
from mmbatch.settings import Settings
from samples.clips import audio_only, encode_clip
from samples.paired import write_paired
from store.db import Database
from store.registry import register_model
from store.schema import IndexSegment, Item, Job, SearchIndex
from tests.conftest import make_key
from tests.paired_features import read_archive
from tests.util import free_port, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "dashboard"
N_TRAIN = 72  # three photo rolls: a tiny archive, the training-free aligner
N_EXTRA = 24  # one roll, embedded with the aligner afterwards (an appended segment)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("search")
    # a merge after every appended segment, so that the searches below read merged bases too
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir), "MMBATCH_BATCH_SIZE": "24",
                                  "MMBATCH_SEARCH_PORT": str(free_port()),
                                  "MMBATCH_INDEX_MERGE_SEGMENTS": "1"})
    key_a = make_key(settings.db_url, "search-a", "tenant-a")
    key_b = make_key(settings.db_url, "search-b", "tenant-b")
    paired = write_paired(data_dir / "paired", n_train=N_TRAIN, n_gallery=N_EXTRA, seed=11)
    stack = Stack(settings, "127.0.0.1", free_port(), log_dir=data_dir / "logs")
    stack.start(wait=240)
    a, b = Client(stack.url, api_key=key_a), Client(stack.url, api_key=key_b)
    try:
        # before any aligner: 409
        with pytest.raises(ApiError) as none_yet:
            a.search("a red boat")
        assert (none_yet.value.status, none_yet.value.code) == (409, "no_aligner")
        job = a.wait(a.submit(paired.train, "align", name="paired")["id"], timeout=600)
        assert job["state"] == "succeeded", job
        aligner = job["model"]["id"]
        _wait_searchable(a)
        extra = a.wait(a.submit(paired.gallery, "embed", model=aligner)["id"], timeout=600)
        assert extra["state"] == "succeeded" and extra["failed"] == 0, extra
        clips = _embed_clips(a, paired, aligner, job["id"], data_dir)
        yield {"a": a, "b": b, "settings": settings, "stack": stack, "paired": paired,
               "aligner": aligner, "train_job": job["id"], "extra_job": extra["id"],
               "items": _items(settings), "keys": {"a": key_a, "b": key_b}, "clips": clips}
    finally:
        stack.stop()


def _wait_searchable(client: Client, wait: float = 120) -> None:
    """Until the new aligner's index answers (409 index_not_ready while it is built)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            client.search("a boat", k=1)
            return
        except ApiError as exc:
            if exc.code not in ("index_not_ready", "search_unavailable") \
                    or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _embed_clips(a: Client, paired: Any, aligner: int, train_job: str, out: Path
                 ) -> dict[str, Any]:
    """Two 4-second clips of two training pictures, A then B (``clip_ab``) and B then A
    (``clip_ba``), embedded with the aligner; B is a picture its caption finds first among the
    pictures, A the one that caption finds last. Waits until their frames are searchable."""
    archive, _ = read_archive(paired.train)
    captions = _captions(paired.captions)
    bright = [k for k in sorted(archive)  # a dark picture would be skipped as a black frame
              if np.asarray(Image.open(io.BytesIO(archive[k]["image"])).convert("L")).mean() > 60]
    for b_key in bright:
        ranked = [r for r in a.search(captions[b_key], k=100, modality="image")["results"]
                  if r["job"] == train_job]
        if ranked[0]["key"] == b_key:
            break
    a_key = next(r["key"] for r in reversed(ranked) if r["key"] in bright)

    def still(key: str) -> list[np.ndarray]:
        picture = np.asarray(Image.open(io.BytesIO(archive[key]["image"])).convert("RGB")
                             .resize((192, 192)))
        return [picture] * 16  # 2 s at 8 fps

    ab = encode_clip(still(a_key) + still(b_key), fps=8)
    ba = encode_clip(still(b_key) + still(a_key), fps=8)
    path = write_tar(out / "clips.tar", {"clip_ab.mp4": ab, "clip_ba.mp4": ba})
    job = a.wait(a.submit(path, "embed", model=aligner)["id"], timeout=300)
    assert job["state"] == "succeeded" and job["failed"] == 0, job
    deadline = time.monotonic() + 60
    while len(a.search(captions[b_key], k=5, modality="video")["results"]) < 2:
        assert time.monotonic() < deadline, "the clips' frames never became searchable"
        time.sleep(0.5)
    return {"job": job["id"], "ab": ab, "caption": captions[b_key], "a": a_key, "b": b_key,
            "picture_b": archive[b_key]["image"]}


def _items(settings: Settings) -> dict[str, dict[str, Any]]:
    """key -> {"id", "job", "label"} of every item."""
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return {key: {"id": i, "job": j, "label": label} for i, key, j, label in
                    s.execute(select(Item.id, Item.key, Item.job_id, Item.label))}
    finally:
        db.dispose()


def _captions(path: Path) -> dict[str, str]:
    return {r["key"]: r["caption"] for r in csv.DictReader(io.StringIO(path.read_text()))}


def test_the_aligner_says_which_method_it_used(world: dict[str, Any]) -> None:
    model = world["a"].model(world["aligner"])
    assert model["kind"] == "aligner" and model["is_default"]
    metrics = model["metrics"]
    assert metrics["method"] == "anchors"  # under 200 training pairs
    assert metrics["groups"]["shared"] == 0
    assert {"text->image", "image->text"} <= set(metrics["validation"])


def test_search_by_text(world: dict[str, Any]) -> None:
    a, items = world["a"], world["items"]
    captions = _captions(world["paired"].captions)
    train_keys = [k for k in sorted(captions) if items[k]["job"] == world["train_job"]]
    found = 0
    for key in train_keys[:12]:
        page = a.search(captions[key], k=10, modality="image")
        results = page["results"]
        assert len(results) == 10 and len({r["item"] for r in results}) == 10
        assert all(r["modality"] == "image" for r in results)
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
        assert page["model"]["id"] == world["aligner"]
        first = results[0]
        assert set(first) == {"item", "job", "key", "modality", "score", "label", "links"}
        assert first["links"]["thumbnail"].endswith(f"/items/{first['item']}/thumbnail")
        found += items[key]["id"] in {r["item"] for r in results}
    # chance: 10 of 96 items in the top 10, about 1 of these 12 queries
    assert found >= 6, found
    # where the time went, by stage
    timed = a.http.post(a.base + "/api/v1/search", json={"text": "a red boat", "k": 3})
    stages = dict(part.strip().split(";dur=") for part in timed.headers["Server-Timing"].split(","))
    assert set(stages) == {"resolve", "service", "encode", "index", "rows"}, stages
    assert float(stages["encode"]) + float(stages["index"]) <= float(stages["service"]) + 0.2
    # the next page continues after the first, without repeats
    page = a.search(captions[train_keys[0]], k=5)
    more = a.search(captions[train_keys[0]], k=5, cursor=page["next_cursor"])
    assert not {r["item"] for r in page["results"]} & {r["item"] for r in more["results"]}
    assert more["results"][0]["score"] <= page["results"][-1]["score"] + 1e-6


def test_search_by_image_file_finds_that_picture(world: dict[str, Any], tmp_path: Path) -> None:
    a, items = world["a"], world["items"]
    archive, _ = read_archive(world["paired"].gallery)  # an appended segment's item
    key = sorted(archive)[3]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(archive[key]["image"])
    results = a.search(file=photo, k=5)["results"]
    assert results[0]["item"] == items[key]["id"] and results[0]["modality"] == "image"
    assert results[0]["score"] > 0.99
    assert results[0]["job"] == world["extra_job"]
    # the thumbnail link works
    thumb = a.http.get(a.base + results[0]["links"]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"


def test_similar_items(world: dict[str, Any]) -> None:
    a, items = world["a"], world["items"]
    some = sorted(items.values(), key=lambda r: r["id"])[5]
    results = world["a"].similar(some["id"], k=7)["results"]
    assert len(results) == 7 and some["id"] not in {r["item"] for r in results}
    with pytest.raises(ApiError) as missing:
        a.similar(10**9)
    assert missing.value.status == 404


def test_the_dashboard_searches_by_text_by_example_and_for_items_like_one(
        world: dict[str, Any], browser_context: Any, tmp_path: Path) -> None:
    """The search page in Chromium shows what the API finds, in its order: by text from the box
    on every page, the next page, items like a hit, by an uploaded picture; a missing item is
    said on the page. The models page shows the aligner's recall."""
    a, items, url = world["a"], world["items"], world["stack"].url
    by_id = {v["id"]: k for k, v in items.items()}
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/ui/login")
    page.fill("#api-key", world["keys"]["a"])
    page.click("#sign-in")
    # the aligner's validation recall on the models page
    page.click("header nav >> text=Models")
    recall = page.inner_text(f'article.model[data-model-id="{world["aligner"]}"] table.recall')
    assert "text->image" in recall and "image->text" in recall, recall

    def shown() -> list[str]:
        page.wait_for_selector("#hits")
        return page.locator("#hits article.hit").evaluate_all(
            "els => els.map(e => e.dataset.key)")

    captions = _captions(world["paired"].captions)
    caption = captions[sorted(captions)[0]]
    page.fill("#nav-search", caption)  # the box on every page
    page.press("#nav-search", "Enter")
    first = shown()
    assert page.input_value("#search-q") == caption.strip()
    assert first == [r["key"] for r in a.search(caption, k=24)["results"]]
    page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every("
                           "i => i.complete && i.naturalWidth > 0)")
    # every paired item has a picture; a clip (the fixture's) has its player, from its second
    assert page.locator("#hits img").count() + page.locator("#hits video").count() == len(first)
    for clip in page.locator("#hits article.hit:has(video)").all():
        assert "#t=" in (clip.locator("video").get_attribute("src") or "")
        assert clip.locator(".hit-time").inner_text().endswith(" s")
    page.click("#search-more")
    second = shown()
    assert len(second) == 24 and not set(first) & set(second)

    page.locator("#hits article.hit a.similar").first.click()
    like = shown()
    origin = int(page.url.split("item=")[1].split("&")[0])
    assert by_id[origin] not in like
    assert like == [r["key"] for r in a.similar(origin, k=24)["results"]]

    archive, _ = read_archive(world["paired"].gallery)
    key = sorted(archive)[3]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(archive[key]["image"])
    page.set_input_files("#search-file", str(photo))
    page.click("#search-file-go")
    assert shown()[0] == key
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

    missing = page.goto(url + "/ui/search?item=999999999")
    assert missing is not None and missing.status == 404
    assert "no item 999999999" in page.inner_text("#search-error")
    assert not errors, errors


def test_filters_apply_inside_the_search(world: dict[str, Any]) -> None:
    a, items = world["a"], world["items"]
    label = "kite"
    kites = {r["id"] for r in items.values() if r["label"] == label}
    assert 2 <= len(kites) <= 20  # a filter that keeps few of the 96 items
    results = a.search("a red boat on the sea", k=len(kites) + 5, labels=[label])["results"]
    assert {r["item"] for r in results} == kites  # all of them, and only them
    assert all(r["label"] == label for r in results)
    extra = {r["id"] for r in items.values() if r["job"] == world["extra_job"]}
    results = a.search("a house in the snow", k=10, jobs=[world["extra_job"]])["results"]
    assert len(results) == 10 and {r["item"] for r in results} <= extra
    assert a.search("a house", k=5, min_score=0.999)["results"] == []


def test_a_corrected_label_is_the_one_search_shows_and_filters_by(
        world: dict[str, Any]) -> None:
    a, items = world["a"], world["items"]
    some = sorted(items.values(), key=lambda r: r["id"])[10]
    new = "lighthouse"  # no item had this label
    r = a.http.post(f"{a.base}/api/v1/items/{some['id']}/label", json={"label": new})
    assert r.status_code == 201, r.text
    results = a.search("a boat", k=5, labels=[new])["results"]
    assert [(x["item"], x["label"]) for x in results] == [(some["id"], new)]
    assert some["id"] not in {x["item"] for x in
                              a.search("a boat", k=100, labels=[some["label"]])["results"]}


def test_another_tenant_sees_nothing(world: dict[str, Any]) -> None:
    b, items = world["b"], world["items"]
    item = next(iter(items.values()))["id"]
    for call, status, code in (
            (lambda: b.search("a red boat"), 409, "no_aligner"),
            (lambda: b.search("a red boat", model=world["aligner"]), 400, "unknown_model"),
            (lambda: b.similar(item), 404, "not_found"),
            (lambda: b.search("a boat", jobs=[world["train_job"]]), 409, "no_aligner")):
        with pytest.raises(ApiError) as err:
            call()
        assert (err.value.status, err.value.code) == (status, code)
    assert b.http.get(f"{b.base}/api/v1/items/{item}").status_code == 404


def test_bad_queries_are_400s(world: dict[str, Any], tmp_path: Path) -> None:
    a, settings = world["a"], world["settings"]
    db = Database(settings.db_url)
    try:
        with db.session() as s:  # a classifier of the same tenant (its weights are not read)
            tenant = s.scalar(select(Job.tenant_id).where(Job.id == world["train_job"]))
            row = register_model(s, name="clf", fusion="concat", classes=["a", "b"],
                                 encoders={}, metrics={}, config={}, checkpoint_blob="0" * 64,
                                 job_id=None, tenant_id=tenant)
            row.is_default = False  # it has no weights: no job may pick it up
            classifier = row.id
    finally:
        db.dispose()
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"not a picture at all" * 10)
    cases = [(lambda: a.search("   "), "empty_query"),
             (lambda: a.search("a boat", model=classifier), "not_an_aligner"),
             (lambda: a.search("a boat", k=0), "invalid_k"),
             (lambda: a.search("a boat", k="\u00b2"), "invalid_k"),  # a digit int() refuses
             (lambda: a.search("a boat", modality="smell"), "invalid_modality"),
             (lambda: a.search("a boat", cursor="nonsense"), "invalid_cursor"),
             (lambda: a.search("a boat", jobs=["no-such-job"]), "unknown_job"),
             (lambda: a.search(file=garbage), "undecodable_file")]
    for call, code in cases:
        with pytest.raises(ApiError) as err:
            call()
        assert (err.value.status, err.value.code) == (400, code)


def test_appended_segments_are_merged_into_the_base(world: dict[str, Any]) -> None:
    db = Database(world["settings"].db_url)
    deadline = time.monotonic() + 60
    try:
        while True:
            with db.session() as s:
                merged = list(s.execute(select(IndexSegment.merged, IndexSegment.rows)))
                base_rows = s.scalar(select(SearchIndex.base_rows).where(
                    SearchIndex.model_version_id == world["aligner"]))
            if merged and all(m for m, _ in merged):
                break
            assert time.monotonic() < deadline, merged
            time.sleep(0.5)
    finally:
        db.dispose()
    # the base holds the align job's items and the appended ones, each with 2 or 3 modalities
    assert base_rows >= 2 * (N_TRAIN + N_EXTRA)


def test_evaluate_an_aligner_on_a_paired_archive(world: dict[str, Any]) -> None:
    a = world["a"]
    job = a.wait(a.evaluate(world["aligner"], world["paired"].gallery)["id"], timeout=300)
    assert job["state"] == "succeeded", job
    scores = a.evaluation(job["id"])
    retrieval = scores["retrieval"]
    assert retrieval["text->image"]["queries"] == N_EXTRA
    assert 0 <= retrieval["text->image"]["r@1"] <= retrieval["text->image"]["r@10"] <= 1
    evaluations = a.model(world["aligner"])["metrics"]["evaluations"]
    assert evaluations[-1]["job"] == job["id"]


def test_the_search_command_prints_a_table(world: dict[str, Any], tmp_path: Path) -> None:
    a, items = world["a"], world["items"]
    archive, _ = read_archive(world["paired"].gallery)
    key = sorted(archive)[7]
    photo = tmp_path / "query.jpg"
    photo.write_bytes(archive[key]["image"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMBATCH_")}
    env.update(MMBATCH_API_KEY=world["keys"]["a"], MMBATCH_URL=a.base)
    run = subprocess.run([sys.executable, "-m", "cli.main", "search", "--file", str(photo),
                          "--k", "3"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if key in line]
    assert len(lines) == 1 and str(items[key]["id"]) in lines[0]
    run = subprocess.run([sys.executable, "-m", "cli.main", "search", "a boat", "--k", "2",
                          "--json", "--label", "kite"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert [r["label"] for r in json.loads(run.stdout)["results"]] == ["kite", "kite"]
    run = subprocess.run([sys.executable, "-m", "cli.main", "search", "a boat"],
                         env={**env, "MMBATCH_API_KEY": world["keys"]["b"]},
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0 and "no_aligner" in run.stderr


def test_search_survives_a_search_service_restart(world: dict[str, Any]) -> None:
    a, stack = world["a"], world["stack"]
    before = a.search("a yellow kite in the desert", k=5)["results"]
    proc = stack.procs["search"]
    proc.terminate()
    proc.wait(30)
    with pytest.raises(ApiError) as down:
        a.search("a yellow kite in the desert", k=5)
    assert (down.value.status, down.value.code) == (503, "search_unavailable")
    stack.spawn("search")
    deadline = time.monotonic() + 120
    while True:
        try:
            after = a.search("a yellow kite in the desert", k=5)["results"]
            break
        except ApiError as exc:
            if exc.code != "search_unavailable" or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert [r["item"] for r in after] == [r["item"] for r in before]
    # the Celery worker is not on the query path: search answers while it is down
    worker = stack.procs["worker"]
    worker.terminate()
    worker.wait(60)
    assert [r["item"] for r in a.search("a yellow kite in the desert", k=5)["results"]] == \
        [r["item"] for r in before]
    stack.spawn("worker")


def test_reprocess_indexes_items_not_yet_embedded_with_the_aligner(
        world: dict[str, Any], tmp_path: Path) -> None:
    """Items embedded without the aligner (a plain embed job) become searchable once a
    reprocess with the aligner (what the nightly run does for the default) has embedded them."""
    a = world["a"]
    more = write_paired(tmp_path / "more", n_train=8, n_gallery=1, seed=23)
    plain = a.wait(a.submit(more.train, "embed")["id"], timeout=300)
    assert plain["state"] == "succeeded" and plain["model"] is None, plain
    archive, _ = read_archive(more.train)
    key = sorted(archive)[2]
    photo = tmp_path / "unindexed.jpg"
    photo.write_bytes(archive[key]["image"])
    db = Database(world["settings"].db_url)
    try:
        with db.session() as s:
            plain_items = set(s.scalars(select(Item.id).where(Item.job_id == plain["id"])))
    finally:
        db.dispose()
    assert len(plain_items) == 8
    assert not {r["item"] for r in a.search(file=photo, k=5)["results"]} & plain_items
    a.reprocess(model=world["aligner"])
    deadline = time.monotonic() + 180
    while True:
        found = [r for r in a.search(file=photo, k=1)["results"] if r["item"] in plain_items]
        if found:
            break
        assert time.monotonic() < deadline, a.jobs(kind="reprocess")
        time.sleep(1)
    assert found[0]["job"] == plain["id"] and found[0]["score"] > 0.99
    assert len(a.search("a boat", k=20, jobs=[plain["id"]])["results"]) == 8


def test_a_clip_is_found_at_the_second_its_picture_shows(world: dict[str, Any],
                                                          tmp_path: Path) -> None:
    a, clips = world["a"], world["clips"]
    ids = {k: world["items"][k]["id"] for k in ("clip_ab", "clip_ba")}
    # by text: each clip once (its best frame), at the second B shows: late in A-then-B
    results = a.search(clips["caption"], k=10, modality="video")["results"]
    assert sorted(r["item"] for r in results) == sorted(ids.values())
    assert all(r["modality"] == "video" and r["links"]["thumbnail"] is None for r in results)
    at = {r["key"]: r["time"] for r in results}
    assert at["clip_ab"] >= 2.0 and at["clip_ba"] < 2.0, at
    # pictures only: no clip; and a picture's hit has no time
    pictures = a.search(clips["caption"], k=100, modality="image")["results"]
    assert not set(ids.values()) & {r["item"] for r in pictures}
    assert all("time" not in r for r in pictures)
    # by B's picture, among every modality: B's item first, each clip once with B's second
    photo = tmp_path / "b.jpg"
    photo.write_bytes(clips["picture_b"])
    everything = a.search(file=photo, k=100)["results"]
    assert everything[0]["key"] == clips["b"] and everything[0]["modality"] == "image"
    hits = [r for r in everything if r["item"] in ids.values()]
    assert len(hits) == 2 and all(r["modality"] == "video" and r["score"] > 0.9 for r in hits)
    at = {r["key"]: r["time"] for r in hits}
    assert at["clip_ab"] >= 2.0 and at["clip_ba"] < 2.0, at
    # by an uploaded clip: its frames' mean finds the clips of the same two pictures first
    query = tmp_path / "query.mp4"
    query.write_bytes(clips["ab"])
    page = a.search(file=query, k=2, modality="video")["results"]
    assert sorted(r["item"] for r in page) == sorted(ids.values())
    assert abs(page[0]["score"] - page[1]["score"]) < 0.02  # the same two pictures
    # a clip alone has an item vector (its frames' mean): items like it, the other clip first
    like = a.similar(ids["clip_ab"], k=3, modality="video")["results"]
    assert [r["key"] for r in like] == ["clip_ba"]
    # the CLI says the second that matched
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMBATCH_")}
    env.update(MMBATCH_API_KEY=world["keys"]["a"], MMBATCH_URL=a.base)
    run = subprocess.run([sys.executable, "-m", "cli.main", "search", clips["caption"],
                          "--modality", "video", "--k", "2"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if "clip_ab" in line)
    assert f"video at {at['clip_ab']:.2f} s" in line


def test_bad_clips_to_search_by_are_400s(world: dict[str, Any], tmp_path: Path) -> None:
    a = world["a"]
    cases = {"garbage.mp4": (b"not a clip at all" * 20, "undecodable_file"),
             "truncated.mp4": (world["clips"]["ab"][:len(world["clips"]["ab"]) // 3],
                               "undecodable_file"),
             "sound.mp4": (audio_only(np.zeros(16000, np.float32)), "undecodable_file"),
             "clip.xyz": (b"whatever", "unsupported_file")}
    for name, (data, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ApiError) as err:
            a.search(file=path, k=3)
        assert (err.value.status, err.value.code) == (400, code), name
        assert name in err.value.message or code == "unsupported_file"


def test_a_model_change_switches_the_index_with_no_gap(world: dict[str, Any]) -> None:
    """A second aligner, promoted: searches that name no model answer from the old index until
    the switch and from the new one after it, never from none (no 409, always k results)."""
    a, first = world["a"], world["aligner"]
    answers: list[tuple[int, int]] = []  # (aligner, results) of every search meanwhile
    errors: list[str] = []
    stop = threading.Event()

    def keep_searching() -> None:
        while not stop.is_set():
            try:
                page = a.search("an orange balloon over the snow", k=10)
                answers.append((page["model"]["id"], len(page["results"])))
            except ApiError as exc:
                errors.append(str(exc))

    searcher = threading.Thread(target=keep_searching, daemon=True)
    searcher.start()
    try:
        job = a.wait(a.submit(world["paired"].train, "align", name="paired-two", seed=5)["id"],
                     timeout=600)
        assert job["state"] == "succeeded", job
        second = job["model"]["id"]
        assert not a.model(second)["is_default"]  # the tenant had a default aligner
        assert a.promote(second)["is_default"]
        deadline = time.monotonic() + 120
        while not answers or answers[-1][0] != second:
            assert time.monotonic() < deadline, answers[-5:]
            time.sleep(0.2)
    finally:
        stop.set()
        searcher.join(30)
    assert errors == []
    assert all(n == 10 for _, n in answers)
    models = [m for m, _ in answers]
    switched = models.index(second)
    assert set(models[:switched]) == {first} and set(models[switched:]) == {second}
    # the old aligner's index still answers when named
    assert a.search("a boat", k=3, model=first)["model"]["id"] == first
    # the new index, built from the feature cache, holds the clips' frames with their times
    clips = a.search(world["clips"]["caption"], k=10, modality="video")["results"]
    assert {r["key"] for r in clips} == {"clip_ab", "clip_ba"}
    assert all(0 <= r["time"] <= 4.0 for r in clips)
