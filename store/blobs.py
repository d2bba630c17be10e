"""Content-addressed blob storage on local disk.

A blob is named by the SHA-256 of its bytes and stored once (``ab/cd/abcd…``). Writers stream into
a temporary file in the store's own directory while hashing, then rename into place, so a blob is
either whole or absent and an interrupted write leaves nothing behind but a temp file that
``discard()`` removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

CHUNK = 1 << 20


def sniff_archive(head: bytes) -> str | None:
    """The archive format from a file's first bytes (at least 262 of them), or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


class BlobNotFound(KeyError):
    pass


class BlobWriter:
    """A write-only file that hashes what passes through it; ``commit()`` names the blob."""

    def __init__(self, store: "BlobStore") -> None:
        self._store = store
        fd, name = tempfile.mkstemp(prefix=".incoming-", dir=store.root)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed: str | None = None

    # The file protocol werkzeug's multipart parser needs.
    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def seek(self, *args: int) -> int:
        return self._file.tell()

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def commit(self) -> str:
        """Move the bytes into place under their hash; returns the hash."""
        if self.committed is not None:
            return self.committed
        self.close()
        digest = self._hash.hexdigest()
        target = self._store.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self.path.unlink(missing_ok=True)
        else:
            os.replace(self.path, target)
        self.committed = digest
        return digest

    def discard(self) -> None:
        self.close()
        if self.committed is None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BlobNotFound(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
        return w.committed  # type: ignore[return-value]

    def put_stream(self, src: BinaryIO) -> str:
        with self.writer() as w:
            shutil.copyfileobj(src, w, CHUNK)  # type: ignore[misc]
        return w.committed  # type: ignore[return-value]

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        for p in self.root.glob("??/??/*"):
            yield p.name
