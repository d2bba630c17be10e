"""Archive walking: formats, WebDataset grouping, labels.csv, skipped members."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from media.archive import ArchiveError, parse_labels, safe_name, sniff_archive, walk
from store.blobs import Blobs, BlobStore
from store.blobstore import open_blob_store

FILES = {
    "animals/cat_001.jpg": b"jpeg-bytes-1",
    "animals/cat_001.txt": b"a cat",
    "animals/cat_001.wav": b"wav-bytes",
    "animals/dog_002.png": b"png-bytes",
    "notes/readme.md": b"# not media",
    "labels.csv": b"key,label,split\nanimals/cat_001,cat,train\nanimals/dog_002,dog,val\n",
}


def _write(path: Path, fmt: str, files: dict[str, bytes]) -> Path:
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    mode = "w:gz" if fmt == "tar.gz" else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("backend", ["fs", "s3"])
@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_groups_files_into_items_by_key(tmp_path: Path, fmt: str, backend: str,
                                        request: pytest.FixtureRequest) -> None:
    # As ingest does: the archive is a blob, walked from a local file, its members stored.
    blobs: Blobs = (BlobStore(tmp_path / "blobs") if backend == "fs"
                    else open_blob_store(request.getfixturevalue("s3_settings")))
    archive_blob = blobs.put_bytes(_write(tmp_path / f"a.{fmt}", fmt, FILES).read_bytes())
    with blobs.open(archive_blob) as f:
        assert sniff_archive(f.read(512)) == fmt
    with blobs.local_path(archive_blob) as archive:
        found = walk(archive, blobs.put_stream)
    assert set(found.items) == {"animals/cat_001", "animals/dog_002"}
    assert set(found.items["animals/cat_001"]) == {"image", "text", "audio"}
    assert set(found.items["animals/dog_002"]) == {"image"}
    ref = found.items["animals/cat_001"]["text"]
    assert ref["name"] == "animals/cat_001.txt"
    assert blobs.read(ref["blob"]) == b"a cat"  # stored once, content-addressed
    assert found.labels == {"animals/cat_001": ("cat", "train", None),
                            "animals/dog_002": ("dog", "val", None)}
    report = found.report()
    assert report["skipped"] == [{"name": "notes/readme.md", "reason": "unsupported file type"}]
    assert report["labelled"] == 2


def test_unsafe_and_duplicate_members_are_skipped_with_reasons(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in {"../evil.txt": b"x", "/abs.txt": b"y", "a/b.jpg": b"1",
                           "a/b.png": b"2", ".hidden.txt": b"z"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    found = walk(archive, blobs.put_stream)
    assert set(found.items) == {"a/b"}
    reasons = {s["name"]: s["reason"] for s in found.skipped}
    assert reasons["../evil.txt"] == "unsafe path"
    assert reasons["/abs.txt"] == "unsafe path"
    assert reasons[".hidden.txt"] == "hidden file"
    assert "already has an image file" in reasons["a/b.png"]
    assert reasons["a/link.txt"] == "symbolic link"
    assert not (tmp_path / "evil.txt").exists()


def test_not_an_archive_and_truncated_archive(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not an archive" * 40)
    with pytest.raises(ArchiveError, match="not a zip, tar or tar.gz"):
        walk(junk, blobs.put_stream)
    good = _write(tmp_path / "a.tar.gz", "tar.gz", {f"k{i}.txt": b"x" * 5000 for i in range(50)})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="truncated"):
        walk(cut, blobs.put_stream)


def test_labels_csv_parsing() -> None:
    assert parse_labels(b"\xef\xbb\xbfkey,label\na/b.jpg,cat\nc,dog\n\n") == {
        "a/b": ("cat", None, None), "c": ("dog", None, None)}
    assert parse_labels(b"a,x,validation\nb,y,TRAIN\n") == {"a": ("x", "val", None),
                                                           "b": ("y", "train", None)}
    with pytest.raises(ArchiveError, match="line 2"):
        parse_labels(b"key,label\nonly-a-key\n")
    with pytest.raises(ArchiveError, match="unknown split"):
        parse_labels(b"a,x,holdout\n")


def test_labels_csv_group_column() -> None:
    # Positional: key,label,split,group; an empty split leaves the split to the trainer.
    assert parse_labels("a,x,,ქართული\nb,y,val,spk-2\nc,y\n".encode()) == {
        "a": ("x", None, "ქართული"), "b": ("y", "val", "spk-2"), "c": ("y", None, None)}
    # A header names the columns, in any order.
    rows = parse_labels(b"key,group,label\na.jpg,s1,cat\nb,,dog\n")
    assert rows == {"a": ("cat", None, "s1"), "b": ("dog", None, None)}
    assert rows["a"].group == "s1" and rows["a"].label == "cat"
    with pytest.raises(ArchiveError, match="group is at most 255"):
        parse_labels(b"a,x,train," + b"g" * 256 + b"\n")
    with pytest.raises(ArchiveError, match="line 2"):
        parse_labels(b"key,group,label\na,s1,\n")


@pytest.mark.parametrize("name,expected", [
    ("a/b.jpg", "a/b.jpg"), ("./a/b.jpg", "a/b.jpg"), ("a/../b.jpg", "b.jpg"),
    ("../b.jpg", None), ("/etc/passwd", None), ("C:/x.jpg", None), ("a\\b.jpg", "a/b.jpg"),
    ("", None),
])
def test_safe_name(name: str, expected: str | None) -> None:
    assert safe_name(name) == expected


@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.97])
def test_truncated_tar_is_an_error_not_fewer_items(tmp_path: Path, fmt: str,
                                                   fraction: float) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    good = _write(tmp_path / f"a.{fmt}", fmt,
                  {f"k{i:02d}.txt": (b"caption %d " % i) * 400 for i in range(50)})
    assert len(walk(good, blobs.put_stream).items) == 50
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * fraction)])
    with pytest.raises(ArchiveError):
        walk(cut, blobs.put_stream)
