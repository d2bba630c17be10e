"""Hostile archives end to end through ingest_job and BatchProcessor (no Celery), on SQLite.

One archive mixes good items with every kind of bad file: the bad ones end as exact skip reasons
or item errors, the good ones succeed, the job finishes, and nothing lands outside the blob store.
Archives that are hostile as a whole fail their job with the reason and leave no partial blob.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmbatch.settings import Settings
from store import jobs
from store.migrate import upgrade
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime


def _png(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int] = (200, 150)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buf, "TIFF")
    return buf.getvalue()


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate,
                    format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    data = tmp_path_factory.mktemp("hostile")
    settings = Settings.from_env({
        "MMBATCH_DATA_DIR": str(data), "MMBATCH_BROKER_URL": "memory://",
        "MMBATCH_BATCH_SIZE": "4", "MMBATCH_MAX_IMAGE_PIXELS": "1000000",
        "MMBATCH_AUDIO_MAX_SECONDS": "2", "MMBATCH_AUDIO_TOO_LONG": "fail",
        "MMBATCH_MAX_MEMBER_BYTES": str(4 * 1024 * 1024),
        "MMBATCH_MAX_ARCHIVE_MEMBERS": "200"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def _archive(rt: Runtime, members: list[tarfile.TarInfo | tuple[str, bytes]], *,
             kind: str = "embed", mode: str = "w") -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    digest = rt.blobs.put_bytes(buf.getvalue())
    with rt.db.session() as s:
        return jobs.create_job(s, kind=kind, archive_blob=digest, archive_name="h.tar",
                               archive_bytes=len(buf.getvalue()), model_version_id=None).id


def _link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _files_outside_blobs(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "blobs" not in p.relative_to(root).parts
            and not p.name.startswith(("mmbatch.db", "broker.db"))}


def test_mixed_hostile_archive_fails_only_the_bad_items(rt: Runtime) -> None:
    good_jpeg = _jpeg()
    members: list[tarfile.TarInfo | tuple[str, bytes]] = [
        ("good/a.png", _png()), ("good/a.txt", "ein grüner Frosch".encode()),
        ("good/a.wav", _wav(1.0)),
        ("good/b.jpg", good_jpeg),
        # UTF-16 without its byte order mark (Latin-1 reads, as Windows-1252: test_edges.py)
        ("bad/nobom16.txt", "caf\xe9 au lait".encode("utf-16-le")),
        ("bad/truncated.jpg", good_jpeg[: len(good_jpeg) // 2]),
        ("bad/bomb.png", _png((2000, 1000))),  # 2 Mpx against a 1 Mpx limit
        ("bad/not_really.png", _tiff()),  # a TIFF by any other name
        ("bad/cut.wav", _wav(1.0)[:30]),
        ("bad/long.wav", _wav(5.0)),  # over 2 s, and AUDIO_TOO_LONG=fail
        ("bad/noise.mp3", np.random.default_rng(0).bytes(3000)),
        ("mixed/c.txt", b"a fine caption"), ("mixed/c.png", b"\x89PNG\r\n\x1a\n" + bytes(40)),
        # skipped at ingest, each with its reason
        ("../escape.txt", b"x"), ("/abs/olute.txt", b"x"), ("C:/drive.txt", b"x"),
        _link("links/sym.txt", tarfile.SYMTYPE, "/etc/passwd"),
        _link("links/hard.txt", tarfile.LNKTYPE, "good/a.txt"),
        _link("links/dev.wav", tarfile.CHRTYPE),
        ("nested/inner.zip", b"PK\x05\x06" + bytes(18)),
        ("empty/e.txt", b""), ("other/readme.md", b"# hi"),
        ("good/a.jpg", good_jpeg),  # a second image for good/a
        ("huge/h.wav", bytes(5 * 1024 * 1024)),  # over MAX_MEMBER_BYTES
    ]
    before = _files_outside_blobs(rt.settings.data_dir)
    job_id = _archive(rt, members)
    batches = ingest_job(rt, job_id)
    for batch in batches:
        BatchProcessor(rt, job_id, batch).run()

    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.total, job.done, job.failed) == ("succeeded", 10, 2, 8)
        skipped = {x["name"]: x["reason"] for x in job.report["skipped"]}
        results = {item.key: (result.status, result.error)
                   for item, result in jobs.results_page(s, job, after=0, limit=100)}
    assert skipped == {
        "../escape.txt": "unsafe path", "/abs/olute.txt": "unsafe path",
        "C:/drive.txt": "unsafe path",
        "links/sym.txt": "symbolic link", "links/hard.txt": "hard link",
        "links/dev.wav": "device file",
        "nested/inner.zip": "nested archive (archives inside archives are not unpacked)",
        "empty/e.txt": "empty file (0 bytes)", "other/readme.md": "unsupported file type",
        "good/a.jpg": "item good/a already has an image file (good/a.png)",
        "huge/h.wav": f"larger than {4 * 1024 * 1024} bytes (limit MMBATCH_MAX_MEMBER_BYTES)",
    }
    errors = {key: err for key, (status, err) in results.items() if status == "failed"}
    assert {key for key, (status, _) in results.items() if status == "ok"} == {"good/a", "good/b"}
    assert errors["bad/nobom16"] == ("text bad/nobom16.txt: binary data, not text (a NUL byte "
                                     "at offset 1; UTF-16 text needs a byte order mark)")
    assert errors["bad/truncated"].startswith(
        "image bad/truncated.jpg: truncated or corrupt image data (")
    assert errors["bad/bomb"] == ("image bad/bomb.png: 2000x1000 is 2000000 pixels, "
                                  "over the limit of 1000000")
    assert errors["bad/not_really"] == (
        "image bad/not_really.png: cannot identify image file "
        "(truncated, or not a JPEG, PNG, WebP, BMP or GIF image)")
    assert errors["bad/cut"].startswith("audio bad/cut.wav: cannot decode (")
    assert errors["bad/long"] == ("audio bad/long.wav: longer than 2 s "
                                  "(the limit MMBATCH_AUDIO_MAX_SECONDS)")
    assert errors["bad/noise"] == ("audio bad/noise.mp3: cannot decode "
                                   "(not a WAV, FLAC, Ogg or MP3 file)")
    assert errors["mixed/c"].startswith("image mixed/c.png: ")
    assert _files_outside_blobs(rt.settings.data_dir) == before
    assert list(rt.blobs.root.glob(".incoming-*")) == []


@pytest.mark.parametrize("case,expected", [
    ("members", "the archive has more than 200 entries (limit MMBATCH_MAX_ARCHIVE_MEMBERS)"),
    ("ratio", "the archive unpacks to more than 100 times its compressed size"),
    ("truncated", "the tar.gz archive is truncated"),
    ("labels", "labels.csv is not valid CSV: it contains a NUL byte"),
])
def test_archives_hostile_as_a_whole_fail_the_job_with_the_reason(rt: Runtime, case: str,
                                                                   expected: str) -> None:
    members: list[tarfile.TarInfo | tuple[str, bytes]]
    mode = "w:gz"
    if case == "members":
        members = [(f"m/{i}.txt", b"x") for i in range(201)]
    elif case == "ratio":
        members = [("zeros.txt", bytes(3 * 1024 * 1024))] * 4  # 12 MiB of zeros, over 8 MiB
    elif case == "labels":
        members = [("a.txt", b"x"), ("labels.csv", b"a,\x00cat\n")]
    else:
        members = [(f"t/{i}.txt", np.random.default_rng(i).bytes(3000)) for i in range(20)]
    job_id = _archive(rt, members, mode=mode)
    if case == "truncated":
        with rt.db.session() as s:
            blob = jobs.get_job(s, job_id).archive_blob
        path = rt.blobs.path(blob)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    assert ingest_job(rt, job_id) == []
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "failed"
        assert job.error.startswith(expected), job.error
        assert jobs.item_ids(s, job_id) == []
    assert list(rt.blobs.root.glob(".incoming-*")) == []
