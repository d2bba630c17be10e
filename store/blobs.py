"""Content-addressed blob storage: on local disk (the default) or in an S3-compatible bucket.

A blob is named by the SHA-256 of its bytes and stored once (``ab/cd/abcd…``). Writers stream into
a temporary file while hashing (in the store's own directory on disk, so that committing is a
rename; in a local spool directory for S3, whence committing uploads it), so a blob is either
whole or absent and an interrupted write leaves nothing behind but a temp file that
``discard()`` removes.

Every caller goes through :class:`Blobs`: ``writer``/``put_bytes``/``put_stream``, ``open``,
``read``, ``exists``, ``delete``, iteration, and ``local_path`` for the readers that need a
file on this machine's disk (the archive walker seeks in zip files).
:func:`store.blobstore.open_blob_store` picks the backend from the settings
(``MMBATCH_BLOB_URL``).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

CHUNK = 1 << 20
HEX = frozenset("0123456789abcdef")


class BlobNotFound(KeyError):
    pass


class BlobStoreUnavailable(ConnectionError):
    """The storage service could not be reached or answered with a server error (transient)."""


def check_digest(digest: str) -> str:
    """``digest`` if it can name a blob (64 lowercase hex characters); BlobNotFound otherwise."""
    if len(digest) != 64 or not HEX.issuperset(digest):
        raise BlobNotFound(digest)
    return digest


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read once in chunks: the name it has as a blob."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def blob_key(digest: str) -> str:
    """Where a blob lives below the store's root: ``ab/cd/abcd…``."""
    check_digest(digest)
    return f"{digest[:2]}/{digest[2:4]}/{digest}"


class BlobWriter:
    """A write-only file that hashes what passes through it; ``commit()`` names the blob."""

    def __init__(self, store: Blobs) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(prefix=".incoming-", dir=store.spool_dir)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed: str | None = None

    @property
    def digest(self) -> str:
        """The SHA-256 of what was written so far (the blob's name once committed)."""
        return self._hash.hexdigest()

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
        try:
            self._store._install(self.path, digest)
        finally:
            self.path.unlink(missing_ok=True)
        self.committed = digest
        return digest

    def discard(self) -> None:
        self.close()
        if self.committed is None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class Blobs(abc.ABC):
    """The interface every caller uses, whatever keeps the bytes."""

    spool_dir: Path  # where writers keep their temporary file

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
        return w.committed  # type: ignore[return-value]

    def put_stream(self, src: IO[bytes]) -> str:
        with self.writer() as w:
            shutil.copyfileobj(src, w, CHUNK)  # type: ignore[misc]
        return w.committed  # type: ignore[return-value]

    def adopt(self, path: Path, digest: str | None = None) -> str:
        """Make the finished file ``path`` (in ``spool_dir``, or on its file system) a blob:
        hashed unless its ``digest`` is known, moved into place (or removed, when the blob is
        there already). When storage fails, the file stays where it was. The blob's name."""
        digest = digest or file_digest(path)
        self._install(path, digest)
        path.unlink(missing_ok=True)
        return digest

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    @abc.abstractmethod
    def _install(self, tmp: Path, digest: str) -> None:
        """Store the finished temp file ``tmp`` as blob ``digest`` (keep an existing copy)."""

    @abc.abstractmethod
    def open(self, digest: str) -> BinaryIO:
        """A readable stream of the blob; BlobNotFound if it is not stored."""

    @abc.abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, digest: str) -> None: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    @abc.abstractmethod
    def local_file(self, digest: str) -> Path | None:
        """The blob's own file on this machine, if the store keeps one (BlobNotFound if the
        blob is not stored); None for a remote store."""

    @contextlib.contextmanager
    def local_path(self, digest: str) -> Iterator[Path]:
        """A file on this machine's disk holding the blob, for as long as the block runs:
        the blob itself on disk, a downloaded temporary copy (removed after) otherwise."""
        local = self.local_file(digest)
        if local is not None:
            yield local
            return
        fd, name = tempfile.mkstemp(prefix=".download-", dir=self.spool_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, self.open(digest) as src:
                shutil.copyfileobj(src, out, CHUNK)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)


class BlobStore(Blobs):
    """Blobs as files under ``root`` (a local disk, or a shared file system)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool_dir = self.root  # same file system: committing is a rename

    def path(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def _install(self, tmp: Path, digest: str) -> None:
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.replace(tmp, target)

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def local_file(self, digest: str) -> Path | None:
        path = self.path(digest)
        if not path.is_file():
            raise BlobNotFound(digest)
        return path

    def __iter__(self) -> Iterator[str]:
        for p in self.root.glob("??/??/*"):
            yield p.name
