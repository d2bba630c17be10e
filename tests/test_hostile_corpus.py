"""Real malformed media made by others (tests/corpus.py) through the decoders and the archive walk.

Every file, whatever its format, goes through decode_image and decode_audio in a DecodeSandbox
with a per-file time limit: each must end decoded or as a MediaError, never a timeout, a crash or
anything else. Without network the corpus is skipped, except under CI=true, where that fails.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from media.archive import walk
from mmbatch.contract import AUDIO_SOURCE_VIDEO
from store.blobs import BlobStore
from tests.corpus import CorpusFile, CorpusUnavailable, classify, fetch, run_all, summary

IN_CI = os.environ.get("CI", "").lower() == "true"
PER_FILE_SECONDS = 20.0


@pytest.fixture(scope="module")
def corpus() -> list[CorpusFile]:
    try:
        return fetch()
    except CorpusUnavailable as exc:
        if IN_CI:
            pytest.fail(f"the malformed-media corpus could not be fetched (CI=true): {exc}")
        pytest.skip(f"the malformed-media corpus could not be fetched: {exc}")


@pytest.fixture(scope="module")
def outcomes(corpus: list[CorpusFile]) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    return run_all(corpus, timeout=PER_FILE_SECONDS)


def test_the_corpus_is_what_the_report_describes(corpus: list[CorpusFile]) -> None:
    sources = Counter(f.source for f in corpus)
    assert sources["pillow-13.0.0"] >= 1000 and sources["mutagen-1.48.1"] >= 90
    assert sum(f.malformed for f in corpus) >= 150


@pytest.mark.timeout(900)
def test_every_corpus_file_ends_decoded_or_as_a_media_error(
        corpus: list[CorpusFile],
        outcomes: dict[tuple[str, str], tuple[str | None, str | None]]) -> None:
    assert len(outcomes) == 2 * len(corpus)
    bad = {key: (message, kind) for key, (message, kind) in outcomes.items()
           if kind in ("timeout", "crash")}
    assert bad == {}
    for (key, modality), (message, _) in outcomes.items():
        name = key.split("/", 1)[1]
        assert message is None or message.startswith(f"{modality} {name}: "), message
    print("\n" + summary(corpus, outcomes))


@pytest.mark.parametrize("name,expected", [
    ("decompression_bomb.gif", "refused: over the pixel limit"),
    ("bmp/b/badwidth.bmp", "refused: over the pixel limit"),
    ("broken_data_stream.png", "truncated or corrupt image"),
    ("truncated_image.png", "truncated or corrupt image"),
    ("truncated_jpeg.jpg", "truncated or corrupt image"),
    ("crash-465703f71a0f0094873a3e0e82c9f798161171b8.sgi", "refused: not an allowed image format"),
    ("psd-oob-write-overflow.psd", "refused: not an allowed image format"),
    ("eps/timeout-d675703545fee17acab56e5fec644c19979175de.eps",
     "refused: not an allowed image format"),
    ("hopper_rle8_row_overflow.bmp", "decoded"),
    ("png_decompression_dos.png", "other MediaError (unexpected library exception)"),
])
def test_named_pillow_files_end_as_expected(
        outcomes: dict[tuple[str, str], tuple[str | None, str | None]], name: str,
        expected: str) -> None:
    assert classify(*outcomes[(f"pillow-13.0.0/{name}", "image")]) == expected


@pytest.mark.parametrize("name,expected", [
    ("too-short.mp3", "corrupt audio"),
    ("emptyfile.mp3", "empty file"),
    ("106-invalid-streaminfo.flac", "corrupt audio"),
    ("silence-44-s.flac", "decoded"),
    ("empty.ogg", "decoded"),
    ("truncated-64bit.mp4", "refused: not an allowed audio container"),
])
def test_named_mutagen_files_end_as_expected(
        outcomes: dict[tuple[str, str], tuple[str | None, str | None]], name: str,
        expected: str) -> None:
    assert classify(*outcomes[(f"mutagen-1.48.1/{name}", "audio")]) == expected


def test_the_corpus_packed_in_one_archive_walks_with_every_file_accounted_for(
        corpus: list[CorpusFile], tmp_path: Path) -> None:
    archive = tmp_path / "corpus.tar"
    with tarfile.open(archive, "w") as tf:
        for f in corpus:
            tf.add(f.path, arcname=f"{f.source}/{f.name}")
        tf.addfile(tarfile.TarInfo("end.txt"), io.BytesIO(b""))
    found = walk(archive, BlobStore(tmp_path / "blobs").put_stream)
    # one per file: a clip's sound track is a second entry of the same file, not another file
    stored = sum(1 for media in found.items.values() for entry in media.values()
                 if entry.get("source") != AUDIO_SOURCE_VIDEO)
    assert stored + found.skipped_count == len(corpus) + 1
    reasons = Counter("duplicate" if s["reason"].startswith("item ") else s["reason"]
                      for s in found.skipped)
    assert set(reasons) <= {"unsupported file type", "empty file (0 bytes)", "duplicate",
                            "hidden file", "nested archive (archives inside archives are not "
                            "unpacked)"}, reasons
