"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

A live stack (gunicorn and a real Celery worker, the embedded default) serves the pages. The test
signs in with an API key, uploads the sample's labelled archive as a train job and its unlabelled
archive as a classify job through the upload form, watches each job's progress bar reach 100 %,
opens the classify job and checks that the results table shows decoded thumbnails, labels,
confidences and contribution bars, then opens the models page. Screenshots go to
``tests/artifacts/dashboard/`` (``docs/img/`` holds two of them for the README).

Chromium and Playwright: ``tests/browser.py`` (the ``browser_context`` fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from cli.stack import Stack
from mmbatch.settings import Settings
from tests.conftest import make_key
from tests.util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "dashboard"
JOB_WAIT_MS = 600_000


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data_dir = tmp_path_factory.mktemp("dashboard")
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                  "MMBATCH_TRAIN_EPOCHS": "80",
                                  # small batches: the bar moves in more, visible steps
                                  "MMBATCH_BATCH_SIZE": "8"})
    key = make_key(settings.db_url, "dashboard")
    stack = Stack(settings, "127.0.0.1", free_port(), log_dir=data_dir / "logs")
    stack.start(wait=180)
    try:
        yield stack.url, key
    finally:
        stack.stop()
        if (data_dir / "logs").exists():
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for log in (data_dir / "logs").glob("*.log"):
                shutil.copy(log, ARTIFACTS / log.name)


def _upload(page: Any, archive: Path, kind: str) -> str:
    """Upload through the form; returns the new job's id once its bar reads 100 %."""
    page.set_input_files("#archive", str(archive))
    page.select_option("#kind", kind)
    with page.expect_response(lambda r: r.url.endswith("/ui/jobs")
                              and r.request.method == "POST") as answer:
        page.click("#upload")
    assert answer.value.status == 202, answer.value.text()
    job_id = answer.value.json()["id"]
    # the upload's own bar is full once the request body is sent
    page.wait_for_selector('#upload-bar[aria-valuenow="100"]')
    assert "uploaded: job" in page.inner_text("#upload-text")
    # the job's bar, refreshed by polling, climbs to 100 %; record every value it shows
    row = f'tr[data-job-id="{job_id}"]'
    page.wait_for_selector(row)
    page.evaluate("""(jobId) => {
        window.seen = window.seen || {};
        window.seen[jobId] = [];
        const record = () => {
            const bar = document.querySelector(`tr[data-job-id="${jobId}"] .bar`);
            if (bar) window.seen[jobId].push(Number(bar.getAttribute('aria-valuenow')));
        };
        record();
        new MutationObserver(record).observe(document.querySelector('#jobs tbody'),
            {childList: true, subtree: true, attributes: true});
    }""", job_id)
    page.wait_for_selector(f'{row} .bar[aria-valuenow="100"]', timeout=JOB_WAIT_MS)
    page.wait_for_selector(f'{row}[data-state="succeeded"]', timeout=JOB_WAIT_MS)
    seen = page.evaluate("(jobId) => window.seen[jobId]", job_id)
    assert seen and seen[-1] == 100 and seen == sorted(seen), seen
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"progress-{kind}.json").write_text(json.dumps(sorted(set(seen))) + "\n")
    return str(job_id)


def _screenshot(page: Any, name: str, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000
    return path


def test_upload_watch_progress_and_see_results(browser_context: Any, live: tuple[str, str],
                                               sample_dir: Any) -> None:
    url, key = live
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # signing in is required, and takes the key once
    page.goto(url + "/ui/")
    assert "/ui/login" in page.url
    page.fill("#api-key", "mmb_not-a-key")
    page.click("#sign-in")
    assert "unknown or revoked" in page.inner_text("main")
    page.fill("#api-key", key)
    page.click("#sign-in")
    page.wait_for_selector("#upload-form")
    assert page.url.rstrip("/").endswith("/ui")

    train_id = _upload(page, sample_dir.train, "train")
    page.reload()  # the form now offers classify with the new default model
    page.wait_for_selector("#upload-form")
    classify_id = _upload(page, sample_dir.unlabelled, "classify")
    for job_id in (train_id, classify_id):
        row = page.locator(f'tr[data-job-id="{job_id}"]')
        assert row.locator(".state").inner_text().startswith("succeeded")
        assert "items/s" in row.locator(".rate").inner_text()
    _screenshot(page, "jobs.png")

    # the classify job's page: thumbnails, captions, audio, labels, confidences, contributions
    page.click(f'tr[data-job-id="{classify_id}"] a')
    page.wait_for_selector("#results tbody tr[data-item-id]")
    rows = page.locator("#results tbody tr[data-item-id]")
    assert rows.count() == 32
    images = page.locator("#results td.thumb img")
    assert images.count() >= 24  # about one item in ten has no image
    for i in range(images.count()):  # as a person scrolls: each lazy image comes into view
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('#results td.thumb img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    widths = page.evaluate("() => [...document.querySelectorAll('#results td.thumb img')]"
                           ".map(img => img.naturalWidth)")
    assert all(0 < w <= 160 for w in widths), widths
    labels = [t.strip() for t in page.locator("#results td.label").all_inner_texts()]
    assert all(t in {"day_bird", "day_frog", "night_bird", "night_frog"} for t in labels), labels
    assert page.locator("#results td.contrib .cbar").count() >= 2 * 32
    assert page.locator("#results audio").count() >= 24
    audio_status = page.evaluate("() => fetch(document.querySelector('#results audio').src)"
                                 ".then(r => r.status)")
    assert audio_status == 200
    assert page.locator("a.export").count() == 3
    page.evaluate("() => window.scrollTo(0, 0)")
    _screenshot(page, "job.png")
    _screenshot(page, "job-full.png", full_page=True)

    # the review page: least sure first; a accepts, a digit picks a class, j/k move
    page.click("#review-link")
    page.wait_for_selector("#review-items tr.review-row")
    reviewing = page.locator("#review-items tr.review-row")
    assert reviewing.count() == 12
    first_id = reviewing.nth(0).get_attribute("data-item-id")
    predicted = reviewing.nth(0).get_attribute("data-label")
    with page.expect_navigation():
        page.keyboard.press("a")
    page.wait_for_selector("#review-items tr.review-row")
    ids = page.locator("#review-items tr.review-row").evaluate_all(
        "rows => rows.map(r => r.dataset.itemId)")
    assert first_id not in ids  # accepted: it left the queue
    second_id = ids[1]
    page.keyboard.press("j")
    assert page.locator("#review-items tr.current").get_attribute("data-item-id") == second_id
    with page.expect_navigation():
        page.keyboard.press("2")  # the second class, in the model's order
    _screenshot(page, "review.png")
    for item_id, label in ((first_id, predicted), (second_id, "day_frog")):
        got = page.evaluate("([url, key]) => fetch(url, {headers: {Authorization: 'Bearer ' + key}})"
                            ".then(r => r.json())",
                            [f"{url}/api/v1/items/{item_id}/labels", key])
        assert got["label"] == label and got["events"][-1]["verified"] is True, got

    # the models page: the trained version, its metrics and confusion matrix
    page.click("header nav >> text=Models")
    page.wait_for_selector("article.model")
    page.wait_for_function("() => { const i = document.querySelector('img.confusion');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert "val_accuracy" in page.inner_text("article.model")
    _screenshot(page, "models.png")

    page.click("#sign-out")
    page.wait_for_selector("#api-key")
    assert not errors, errors
