"""A headless Chromium for the dashboard's browser tests: Debian's ``chromium``, driven by
Playwright (``browser_context``, a module-scoped fixture that conftest.py offers every test).

Chromium comes from ``scripts/test-deps.sh`` and Playwright from the ``test`` extra; Playwright's
own browser download is never used. Without them a test skips, except under ``CI=true``, where
that is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.util import IN_CI

CHROMIUM = os.environ.get("MMBATCH_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need(condition: bool, message: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(message + " (CI=true: run scripts/test-deps.sh and install the test extra)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    need(Path(CHROMIUM).exists(), f"Chromium is not installed at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "the playwright package is not installed")
        raise
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1360, "height": 860})
            context.set_default_timeout(30_000)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
