"""The blob store's interface, run against both backends: files on disk and an S3 bucket served
by moto's server mode (a real S3 protocol server in a subprocess)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from mmbatch.settings import Settings, SettingsError
from store.blobs import BlobNotFound, Blobs, BlobStore, BlobStoreUnavailable
from store.blobstore import open_blob_store
from store.s3blobs import S3BlobStore
from tests.s3 import make_bucket, s3_env

MB = 1 << 20


@pytest.fixture(params=["fs", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    if request.param == "fs":
        return open_blob_store(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)}))
    return open_blob_store(request.getfixturevalue("s3_settings"))


def _leftovers(blobs: Blobs) -> list[str]:
    return [p.name for p in blobs.spool_dir.glob(".*")]


def test_the_settings_choose_the_backend(tmp_path: Path, s3_settings: Settings) -> None:
    assert type(open_blob_store(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)}))) \
        is BlobStore
    store = open_blob_store(s3_settings)
    assert isinstance(store, S3BlobStore) and store.prefix == "blobs"
    with pytest.raises(SettingsError, match="BLOB_URL"):
        Settings.from_env({"MMBATCH_BLOB_URL": "/srv/blobs"})
    with pytest.raises(SettingsError, match="BLOB_URL"):
        Settings.from_env({"MMBATCH_BLOB_URL": "s3://"})


def test_put_read_open_exists_iterate_delete(blobs: Blobs) -> None:
    digest = blobs.put_bytes(b"a cat on a mat")
    assert digest == hashlib.sha256(b"a cat on a mat").hexdigest()
    assert blobs.exists(digest)
    assert blobs.read(digest) == b"a cat on a mat"
    with blobs.open(digest) as f:
        assert f.read(5) == b"a cat"
        assert f.read() == b" on a mat"
    other = blobs.put_bytes(b"a dog")
    assert sorted(blobs) == sorted([digest, other])
    blobs.delete(digest)
    assert not blobs.exists(digest)
    assert list(blobs) == [other]
    with pytest.raises(BlobNotFound):
        blobs.read(digest)
    with pytest.raises(BlobNotFound):
        blobs.open(digest)
    blobs.delete(digest)  # deleting what is gone is fine


def test_the_same_bytes_are_stored_once(blobs: Blobs) -> None:
    first = blobs.put_bytes(b"same")
    second = blobs.put_stream(io.BytesIO(b"same"))
    assert first == second
    assert list(blobs) == [first]
    assert _leftovers(blobs) == []


def test_a_streaming_write_is_named_by_its_hash_when_committed(blobs: Blobs) -> None:
    # 9 MiB in 1 MiB writes: past boto3's 8 MiB threshold, so S3 takes it as a multipart upload.
    chunks = [bytes([i]) * MB for i in range(9)]
    writer = blobs.writer()
    for chunk in chunks:
        writer.write(chunk)
    assert list(blobs) == []  # nothing is visible before commit
    digest = writer.commit()
    assert digest == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert writer.size == 9 * MB
    assert blobs.read(digest) == b"".join(chunks)
    assert writer.commit() == digest  # committing again changes nothing
    assert _leftovers(blobs) == []


def test_a_discarded_or_failed_write_leaves_nothing(blobs: Blobs) -> None:
    writer = blobs.writer()
    writer.write(b"half an upload")
    writer.discard()

    class Broken(io.RawIOBase):
        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            raise OSError("connection reset")

    with pytest.raises(OSError, match="reset"):
        blobs.put_stream(Broken())  # type: ignore[arg-type]
    assert list(blobs) == []
    assert _leftovers(blobs) == []


def test_local_path_gives_the_bytes_as_a_file(blobs: Blobs) -> None:
    digest = blobs.put_bytes(b"PK\x03\x04 not really a zip")
    with blobs.local_path(digest) as path:
        assert path.read_bytes() == b"PK\x03\x04 not really a zip"
    if isinstance(blobs, S3BlobStore):
        assert not path.exists()  # the downloaded copy is gone after the block
        assert _leftovers(blobs) == []
    else:
        assert path == blobs.local_file(digest)
    with pytest.raises(BlobNotFound), blobs.local_path("0" * 64):
        pass


@pytest.mark.parametrize("digest", ["", "../../etc/passwd", "A" * 64, "0" * 63])
def test_names_that_are_not_hashes_are_not_found(blobs: Blobs, digest: str) -> None:
    with pytest.raises(BlobNotFound):
        blobs.read(digest)


def test_prefixes_keep_stores_in_one_bucket_apart(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    a = open_blob_store(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                           **s3_env(s3_endpoint, bucket, "a")}))
    b = open_blob_store(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                           **s3_env(s3_endpoint, bucket, "b/c")}))
    digest = a.put_bytes(b"only in a")
    assert list(a) == [digest] and list(b) == []
    assert not b.exists(digest)
    keys = [o["Key"] for o in a.client.list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    assert keys == [f"a/{digest[:2]}/{digest[2:4]}/{digest}"]


def test_an_unreachable_endpoint_is_a_transient_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  **s3_env(f"http://127.0.0.1:{port}", "nowhere")})
    store = open_blob_store(settings)
    with pytest.raises(BlobStoreUnavailable) as err:
        store.put_bytes(b"lost")
    assert isinstance(err.value, ConnectionError)  # what the worker's tasks retry
    assert _leftovers(store) == []
