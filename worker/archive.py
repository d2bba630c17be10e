"""Walk an uploaded archive as a stream and group its files into items, WebDataset style.

``animals/cat_001.jpg``, ``animals/cat_001.txt`` and ``animals/cat_001.wav`` are the item
``animals/cat_001``: the key is the member's path without its last extension, and the extension
names the modality. An optional ``labels.csv`` at the root (``key,label[,split]``) labels items.
Members that are not media (other extensions, directories, links, hidden files) are skipped and
listed with the reason in the job's report; none of them stops the walk.
"""

from __future__ import annotations

import csv
import gzip
import io
import posixpath
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from store.blobs import sniff_archive as sniff
from worker.media import modality_of

LABELS_FILE = "labels.csv"
MAX_REPORTED = 1000
MAX_LABELS_BYTES = 64 * 1024 * 1024
VAL_SPLITS = {"val", "valid", "validation", "dev", "test"}
TRAIN_SPLITS = {"train", "training"}


class ArchiveError(Exception):
    """The archive as a whole cannot be read; the job fails with this message."""


@dataclass
class Walk:
    """What an archive holds, grouped: item key → {modality: member name}."""

    items: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    labels: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0
    members: int = 0

    def skip(self, name: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append({"name": name, "reason": reason})

    def report(self) -> dict[str, Any]:
        unknown = sorted(set(self.labels) - set(self.items))
        return {
            "members": self.members,
            "items": len(self.items),
            "labelled": sum(1 for k in self.items if k in self.labels),
            "skipped": self.skipped,
            "skipped_count": self.skipped_count,
            "labels_without_item": unknown[:MAX_REPORTED],
        }


def safe_name(name: str) -> str | None:
    """The member's normalised relative path, or None if it could escape or is not a path."""
    if not name or "\x00" in name or "\\" in name:
        return None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm in (".", "") or norm.startswith("../") or norm == ".." or "/../" in norm:
        return None
    return norm.removeprefix("./")


def walk(path: Path, store: Callable[[IO[bytes]], str]) -> Walk:
    """Read every member once, in archive order; ``store`` keeps a media file, returning its hash."""
    result = Walk()
    with open(path, "rb") as f:
        kind = sniff(f.read(512))
    if kind is None:
        raise ArchiveError("not a zip, tar or tar.gz archive")
    try:
        for name, opener in _members(path, kind, result):
            _take(result, name, opener, store)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"cannot read the {kind} archive: {exc}") from exc
    return result


def _members(path: Path, kind: str, result: Walk
             ) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                result.members += 1
                if info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    result.skip(info.filename, "encrypted")
                    continue
                yield info.filename, (lambda info=info: zf.open(info))
        return
    with open(path, "rb") as raw:
        source: IO[bytes] = gzip.GzipFile(fileobj=raw) if kind == "tar.gz" else raw
        tail = _TailTracker(source)
        with tarfile.open(fileobj=tail, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:
                result.members += 1
                if member.isdir():
                    continue
                if not member.isfile():
                    result.skip(member.name, "not a regular file (link or device)")
                    continue
                yield member.name, (lambda member=member: tf.extractfile(member))  # type: ignore
        tail.drain()  # a truncated gzip stream raises EOFError here
        if not tail.ends_with_zero_blocks():
            raise ArchiveError(f"the {kind} archive is truncated: it ends without the "
                               "end-of-archive marker")


class _TailTracker:
    """Reads through a stream, remembering its last 1,024 bytes (a tar ends with zero blocks)."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._tail = (self._tail + data)[-1024:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def ends_with_zero_blocks(self) -> bool:
        return len(self._tail) == 1024 and not self._tail.strip(b"\0")


def _take(result: Walk, raw_name: str, opener: Callable[[], IO[bytes]],
          store: Callable[[IO[bytes]], str]) -> None:
    name = safe_name(raw_name)
    if name is None:
        result.skip(raw_name, "unsafe path")
        return
    base = posixpath.basename(name)
    if base.startswith(".") or name.startswith("__MACOSX/"):
        result.skip(name, "hidden file")
        return
    if name == LABELS_FILE:
        with opener() as f:
            data = f.read(MAX_LABELS_BYTES + 1)
        if len(data) > MAX_LABELS_BYTES:
            raise ArchiveError(f"{LABELS_FILE} is larger than {MAX_LABELS_BYTES} bytes")
        result.labels = parse_labels(data)
        return
    modality = modality_of(name)
    if modality is None:
        result.skip(name, "unsupported file type")
        return
    key = posixpath.splitext(name)[0]
    media = result.items.setdefault(key, {})
    if modality in media:
        result.skip(name, f"item {key} already has an {modality} file "
                          f"({media[modality]['name']})")
        return
    with opener() as f:
        digest = store(f)
    media[modality] = {"blob": digest, "name": name}


def parse_labels(data: bytes) -> dict[str, tuple[str, str | None]]:
    """``key,label[,split]`` rows; a header row naming ``key`` is skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{LABELS_FILE} is not valid UTF-8: {exc}") from exc
    labels: dict[str, tuple[str, str | None]] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if lineno == 1 and row[0].strip().lower() == "key":
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: expected key,label[,split]")
        split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else None
        if split is not None and split not in VAL_SPLITS | TRAIN_SPLITS:
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: unknown split {row[2]!r} "
                               "(use train or val)")
        key = posixpath.splitext(row[0].strip())[0] if modality_of(row[0].strip()) else row[0].strip()
        labels[key.removeprefix("./")] = (row[1].strip(), _canonical_split(split))
    return labels


def _canonical_split(split: str | None) -> str | None:
    if split is None:
        return None
    return "val" if split in VAL_SPLITS else "train"
