"""Walk an uploaded archive as a stream and group its files into items, WebDataset style.

``animals/cat_001.jpg``, ``animals/cat_001.txt`` and ``animals/cat_001.wav`` are the item
``animals/cat_001``: the key is the member's path without its last extension, and the extension
names the modality. An optional ``labels.csv`` (``key,label[,split[,group]]``, or any order under a
header row that names the columns) labels items: at the root, or in the one top-level folder that
holds everything (a zip of a whole folder, as "Compress folder" makes), its keys relative to that
folder. Paths are Unicode-normalised (NFC: the same name typed on macOS and elsewhere is one key),
and backslashes are folder separators (Windows zip tools write them).
Members that are not media (other extensions, directories, links, devices, hidden files, nested
archives, empty files, members over a limit) are skipped and listed with the reason in the job's
report; none of them stops the walk.

Archives come from anyone, so the walk is bounded whatever the input: nothing is ever extracted to
a path (members only go to ``store``, content-addressed), and :class:`Limits` caps the number of
entries, each member's size, the total unpacked size and the compression ratio. The caps are
enforced on the bytes as they stream, not on what headers declare: a member that grows past its
limit is cut off mid-stream and its half-written blob discarded. Whole-archive problems (not an
archive, truncated, corrupt, a bomb) raise :class:`ArchiveError`, which fails the job.
"""

from __future__ import annotations

import csv
import gzip
import io
import posixpath
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from media.decode import MediaError, modality_of, read_text
from mmbatch.contract import AUDIO_SOURCE_VIDEO

if TYPE_CHECKING:
    from mmbatch.settings import Settings

LABELS_FILE = "labels.csv"
MAX_REPORTED = 1000
MAX_LABELS_BYTES = 64 * 1024 * 1024
VAL_SPLITS = {"val", "valid", "validation", "dev", "test"}
TRAIN_SPLITS = {"train", "training"}

# Compression ratios are judged only past this much output: small files compress well legitimately.
RATIO_GRACE_BYTES = 8 * 1024 * 1024
# tarfile reads a long-name or pax header whole into memory; real ones are a few hundred bytes.
MAX_TAR_HEADER_BYTES = 1024 * 1024
MAX_TAR_HEADERS_TOTAL = 64 * 1024 * 1024
# zipfile reads the whole central directory into memory before anything else.
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024 * 1024
MAX_NAME_CHARS = 1024  # an item key is at most this long (store.schema.Item.key)
# Captions this small are read while walking: one of whitespace only is no text at all.
TEXT_PEEK_BYTES = 64 * 1024
NESTED_ARCHIVE_EXTS = frozenset({
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst", ".lz4",
    ".lzma", ".7z", ".rar", ".cpio", ".iso", ".jar", ".war", ".whl", ".apk", ".cab", ".arj",
})
_READ_CHUNK = 1 << 20


class LabelRow(NamedTuple):
    """One item's row of ``labels.csv``."""

    label: str
    split: str | None  # "train", "val" or None (the trainer splits)
    group: str | None = None  # speaker, source, language...: a split keeps groups apart


class ArchiveError(Exception):
    """The archive as a whole cannot be read; the job fails with this message."""


class Labels(dict[str, LabelRow]):
    """``labels.csv``'s rows by item key, and the keys it gave more than once with the same
    label (a key given two different labels is an ArchiveError)."""

    def __init__(self) -> None:
        super().__init__()
        self.duplicates: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Limits:
    """How much one archive may unpack to. Defaults match :class:`mmbatch.settings.Settings`."""

    max_members: int = 100_000
    max_member_bytes: int = 256 * 1024**2
    max_unpacked_bytes: int = 16 * 1024**3
    max_ratio: float = 100.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Limits":
        return cls(max_members=settings.max_archive_members,
                   max_member_bytes=settings.max_member_bytes,
                   max_unpacked_bytes=settings.max_unpacked_bytes,
                   max_ratio=settings.max_compression_ratio)


@dataclass
class Walk:
    """What an archive holds, grouped: item key → {modality: member name}.

    A streamed walk (``walk(..., ready=...)``) holds in ``items`` only what it has not handed
    over yet, so that its memory does not grow with the archive: what it handed over is the
    caller's, and so are the counts its report gives (:meth:`report`'s ``held``).
    """

    items: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    labels: Labels = field(default_factory=Labels)
    labels_folder: str | None = None  # where labels.csv was, when not at the root
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0
    members: int = 0
    unpacked_bytes: int = 0
    has_labels: bool = False
    labels_revoked: bool = False  # labels.csv in a folder that does not hold every item
    # The top-level folder of the first item, and whether every item so far is below it: where
    # labels.csv may sit (place_labels), known without keeping every key.
    top: str | None = None
    one_top: bool = True
    handed: int = 0  # streaming: items handed over (a key that came back, again)

    def skip(self, name: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append({"name": name, "reason": reason})

    def report(self, held: dict[str, Any] | None = None) -> dict[str, Any]:
        """The job's report; ``held``: the ``items``, ``labelled`` and ``labels_without_item``
        of a streamed walk, which the caller counts (the items left the walk as they went)."""
        if held is None:
            held = {"items": len(self.items),
                    "labelled": sum(1 for k in self.items if k in self.labels),
                    "labels_without_item": sorted(set(self.labels) - set(self.items))}
        return {
            "members": self.members,
            "items": held["items"],
            "labelled": held["labelled"],
            "skipped": self.skipped,
            "skipped_count": self.skipped_count,
            "labels_without_item": held["labels_without_item"][:MAX_REPORTED],
            "duplicate_labels": self.labels.duplicates[:MAX_REPORTED],
        }

    def why_empty(self) -> str:
        """Why the walk found no item: the reasons its files were skipped, counted."""
        if not self.skipped_count:
            return ("the archive holds no image, text, audio or video files (images: jpg png "
                    "webp bmp gif; text: txt; audio: wav flac ogg mp3; video: mp4 m4v mov webm "
                    "mkv avi)")
        reasons: dict[str, int] = {}
        for skipped in self.skipped:
            reasons[skipped["reason"]] = reasons.get(skipped["reason"], 0) + 1
        counted = ", ".join(f"{n} {reason}" for reason, n in
                            sorted(reasons.items(), key=lambda r: -r[1]))
        return (f"the archive holds no usable image, text, audio or video file: all of its "
                f"{self.skipped_count} files were skipped ({counted}; the job's report lists "
                "them)")

    def label_of(self, key: str) -> LabelRow | None:
        """The row of ``labels.csv`` (read so far) that labels ``key``, if any."""
        folder = self.labels_folder
        if folder is not None:
            return self.labels.get(key[len(folder) + 1:]) if key.startswith(folder + "/") \
                else None
        return self.labels.get(key)

    def media_of(self, key: str) -> dict[str, dict[str, str]]:
        """An item's files by modality, with the sound track of a clip as its audio when it has
        no audio file of its own."""
        return with_track(self.items[key])

    def note_item(self, key: str) -> None:
        """A new item: is it below the same top-level folder as every item before it?"""
        folder, slash, _ = key.partition("/")
        top = folder if slash else ""
        if self.top is None:
            self.top = top
        elif top != self.top:
            self.one_top = False

    def place_labels(self) -> None:
        """labels.csv from a folder labels the items below it, when that one folder holds every
        item (the keys in it are relative to it); otherwise it labels nothing, and says so."""
        folder = self.labels_folder
        if folder is None:
            return
        if self.top is None or (self.one_top and self.top == folder):
            placed = Labels()
            placed.update({f"{folder}/{key}": row for key, row in self.labels.items()})
            placed.duplicates = self.labels.duplicates
            self.labels = placed
        else:
            self.labels = Labels()
            self.labels_revoked = True
            self.skip(f"{folder}/{LABELS_FILE}", f"{LABELS_FILE} in folder {folder}/, but not "
                                                 "every file of the archive is in that folder")


def sniff_archive(head: bytes) -> str | None:
    """The archive format from a file's first bytes (at least 262 of them), or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def safe_name(name: str) -> str | None:
    """The member's normalised relative path (backslashes as separators, Unicode NFC), or None
    if it could escape (absolute, a drive, ``..`` past the top) or is not a path."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm in (".", "") or norm.startswith("../") or norm == ".." or "/../" in norm:
        return None
    return norm.removeprefix("./")


@dataclass
class _Entry:
    """A member that may hold data: its raw name, the size it declares, how to open it."""

    name: str
    size: int
    opener: Callable[[], IO[bytes]]
    # The most bytes it may yield, and the reason given when it yields more (zip: ratio-based).
    limit: int
    over_limit: str
    corrupt_is_fatal: bool  # a tar stream cannot go on past a bad member; a zip can


class _TooLarge(Exception):
    """A member yielded more bytes than its limit (the reason is the message)."""


class _Corrupt(Exception):
    """The archive library failed while reading a member's data."""


class _Budget:
    """Unpacked bytes over the whole archive."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.limits.max_unpacked_bytes:
            raise ArchiveError(
                f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes "
                "(limit MMBATCH_MAX_UNPACKED_BYTES)")


class _MemberReader:
    """A member's bytes, cut off at its limit; library failures become :class:`_Corrupt`."""

    def __init__(self, f: IO[bytes], entry: _Entry, budget: _Budget) -> None:
        self._f = f
        self._entry = entry
        self._budget = budget
        self.count = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # never one unbounded read: a bomb would land in memory
            parts = []
            while chunk := self.read(_READ_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        try:
            data = self._f.read(min(size, _READ_CHUNK))
        except ArchiveError:
            raise
        except Exception as exc:  # zlib.error, BadZipFile (CRC), tarfile.ReadError, lzma, …
            raise _Corrupt(f"{type(exc).__name__}: {exc}") from exc
        self.count += len(data)
        if self.count > self._entry.limit:
            raise _TooLarge(self._entry.over_limit)
        self._budget.add(len(data))
        return data

    def readable(self) -> bool:
        return True


def with_track(media: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``media`` with a clip's sound track as the item's audio where it has no audio file."""
    if "video" in media and "audio" not in media:
        return {**media, "audio": {**media["video"], "source": AUDIO_SOURCE_VIDEO}}
    return media


def join_media(key: str, had: dict[str, dict[str, str]], new: dict[str, dict[str, str]],
               again: bool) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """An item handed over again (a tar's late member): its files now, from those it ``had``
    and the ``new`` ones, and the new files skipped, with the reason (it has that modality
    already, as when the two were adjacent). ``again``: the walk is a redelivered one, and a
    file exactly as it ``had`` it is the one the first walk stored, not a second one."""
    files = {m: ref for m, ref in had.items() if ref.get("source") != AUDIO_SOURCE_VIDEO}
    skipped = []
    for modality, ref in new.items():
        if ref.get("source") == AUDIO_SOURCE_VIDEO:
            continue
        if modality not in files:
            files[modality] = ref
        elif not (again and files[modality] == ref):
            reason = f"item {key} already has an {modality} file ({files[modality]['name']})"
            skipped.append((ref["name"], reason))
    return with_track(files), skipped


Ready = Callable[[Walk, list[str]], None]


def walk(path: Path, store: Callable[[IO[bytes]], str], limits: Limits | None = None,
         ready: Ready | None = None, chunk: int = 32) -> Walk:
    """Read every member once; ``store`` keeps a media file, returning its hash.

    ``store`` must not keep a partial blob when reading the stream it is given raises
    (``BlobStore.put_stream`` discards it).

    Streaming: ``ready(walk, keys)`` is handed items as soon as they are complete, ``chunk``
    at a time (the rest at the end), so that work on them starts while the walk goes on. A tar
    is read in its own order, and an item is complete when the next key begins (WebDataset's
    rule); a zip lists its members up front, so its members are read grouped by key (and
    ``labels.csv`` first). A handed-over item leaves ``walk.items`` once ``ready`` returns, so
    the walk's memory stays flat however many members the archive has. A key that shows up
    again after it was handed over (a tar whose members are not adjacent) is handed over again
    with its new files only: the walk keeps no record of what it handed over, and the caller,
    which has it, joins the two. ``labels.csv`` may come at any point: ``walk.label_of`` says
    what it gives an item at the time it is handed over.
    """
    limits = limits or Limits()
    result = Walk()
    with open(path, "rb") as f:
        kind = sniff_archive(f.read(512))
    if kind is None:
        raise ArchiveError("not a zip, tar or tar.gz archive")
    budget = _Budget(limits)
    pending: dict[str, None] = {}  # complete keys not yet handed over, in order
    current: str | None = None
    try:
        for entry in _members(path, kind, result, limits, budget):
            key = _take(result, entry, store, budget)
            if key is None or ready is None:
                continue
            if key != current:
                if current is not None:
                    pending[current] = None
                current = key
                pending.pop(key, None)  # it was complete, and is not: still one item
                if len(pending) >= chunk:
                    _hand_over(result, pending, ready)
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, _Corrupt) as exc:
        if isinstance(exc, EOFError) or isinstance(exc.__cause__, EOFError):
            raise ArchiveError(f"the {kind} archive is truncated: {exc.__cause__ or exc}"
                               ) from exc
        raise ArchiveError(f"cannot read the {kind} archive: {exc}") from exc
    finally:
        result.unpacked_bytes = budget.used
    if ready is not None:
        if current is not None:
            pending[current] = None
        _hand_over(result, pending, ready)
    result.place_labels()
    for key, media in result.items.items():
        # an item with a clip and no audio file takes its audio from the clip's sound track
        result.items[key] = with_track(media)
    return result


def _hand_over(result: Walk, pending: dict[str, None], ready: Ready) -> None:
    keys = list(pending)
    pending.clear()
    if keys:
        ready(result, keys)
        result.handed += len(keys)
        for key in keys:  # the caller has them now
            del result.items[key]


def _members(path: Path, kind: str, result: Walk, limits: Limits, budget: _Budget
             ) -> Iterator[_Entry]:
    if kind == "zip":
        yield from _zip_members(path, result, limits)
    else:
        yield from _tar_members(path, kind, result, limits, budget)


def _count(result: Walk, limits: Limits) -> None:
    result.members += 1
    if result.members > limits.max_members:
        raise ArchiveError(f"the archive has more than {limits.max_members} entries "
                           "(limit MMBATCH_MAX_ARCHIVE_MEMBERS)")


# --- zip ---------------------------------------------------------------------------------------


def _zip_members(path: Path, result: Walk, limits: Limits) -> Iterator[_Entry]:
    with open(path, "rb") as f:
        entries, directory_bytes = _zip_directory_size(f)
    if entries > limits.max_members:
        raise ArchiveError(f"the archive has {entries} entries, more than "
                           f"{limits.max_members} (limit MMBATCH_MAX_ARCHIVE_MEMBERS)")
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise ArchiveError(f"the zip's central directory is {directory_bytes} bytes, more than "
                           f"{MAX_ZIP_DIRECTORY_BYTES}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise
    except Exception as exc:  # NotImplementedError, UnicodeDecodeError, struct.error, …
        raise ArchiveError(f"cannot read the zip archive: {type(exc).__name__}: {exc}") from exc
    with zf:
        for info in sorted(zf.infolist(), key=_zip_order):
            _count(result, limits)
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                result.skip(info.filename, "encrypted")
                continue
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                result.skip(info.filename, _file_type_reason(mode))
                continue
            ratio_limit = max(RATIO_GRACE_BYTES, int(info.compress_size * limits.max_ratio))
            if ratio_limit < limits.max_member_bytes:
                limit, over = ratio_limit, (
                    f"unpacks to more than {limits.max_ratio:g} times its compressed size "
                    f"({info.compress_size} bytes; limit MMBATCH_MAX_COMPRESSION_RATIO)")
            else:
                limit, over = limits.max_member_bytes, _too_large(limits)
            yield _Entry(info.filename, info.file_size, lambda info=info: zf.open(info),
                         limit, over, corrupt_is_fatal=False)


def _zip_order(info: zipfile.ZipInfo) -> tuple[int, str]:
    """labels.csv files first (in the archive's order: the sort is stable), then the members
    grouped by item key, so that each item is complete when the next begins."""
    name = safe_name(info.filename) or info.filename
    if posixpath.basename(name) == LABELS_FILE:
        return (0, "")
    return (1, posixpath.splitext(name)[0])


def _zip_directory_size(f: IO[bytes]) -> tuple[int, int]:
    """(entries, central directory bytes) from the end records, before zipfile reads them all.

    (0, 0) when there is no end record: zipfile then says what is wrong.
    """
    f.seek(0, io.SEEK_END)
    size = f.tell()
    tail_len = min(size, 65_535 + 22)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        return 0, 0
    entries, directory = struct.unpack("<HI", tail[pos + 10:pos + 16])
    if pos >= 20 and tail[pos - 20:pos - 16] == b"PK\x06\x07":  # a Zip64 end record locator
        (offset,) = struct.unpack("<Q", tail[pos - 12:pos - 4])
        if offset < size:
            f.seek(offset)
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                entries, directory = struct.unpack("<QQ", record[32:48])
    return entries, directory


# --- tar ---------------------------------------------------------------------------------------


class _TarInfo(tarfile.TarInfo):
    """Refuses long-name and pax headers that tarfile would read whole into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:  # the documented extension hook
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            if self.size > MAX_TAR_HEADER_BYTES:
                raise ArchiveError(f"the tar archive has an extended header of {self.size} "
                                   f"bytes (more than {MAX_TAR_HEADER_BYTES})")
            seen = getattr(tarfile_, "_mmbatch_header_bytes", 0) + self.size
            if seen > MAX_TAR_HEADERS_TOTAL:
                raise ArchiveError(f"the tar archive's extended headers add up to more than "
                                   f"{MAX_TAR_HEADERS_TOTAL} bytes")
            tarfile_._mmbatch_header_bytes = seen  # type: ignore[attr-defined]
        return super()._proc_member(tarfile_)


class _Counted:
    """Counts the compressed bytes read from the upload (for the compression ratio)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True


class _TarStream:
    """The uncompressed tar stream: enforces the unpacked-size and ratio limits as it flows, and
    remembers where the last non-zero byte was (a tar must end in zero blocks and nothing else).
    """

    def __init__(self, source: IO[bytes], compressed: _Counted | None, limits: Limits) -> None:
        self._source = source
        self._compressed = compressed
        self._limits = limits
        self.pos = 0
        self.last_nonzero_end = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        stripped = len(data.rstrip(b"\0"))
        if stripped:
            self.last_nonzero_end = self.pos + stripped
        self.pos += len(data)
        limits = self._limits
        if self.pos > limits.max_unpacked_bytes:
            raise ArchiveError(f"the archive unpacks to more than {limits.max_unpacked_bytes} "
                               "bytes (limit MMBATCH_MAX_UNPACKED_BYTES)")
        if self._compressed is not None and self.pos > RATIO_GRACE_BYTES \
                and self.pos > limits.max_ratio * max(self._compressed.count, 1):
            raise ArchiveError(
                f"the archive unpacks to more than {limits.max_ratio:g} times its compressed "
                f"size ({self.pos} bytes from {self._compressed.count}; limit "
                "MMBATCH_MAX_COMPRESSION_RATIO)")
        return data

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


def _tar_members(path: Path, kind: str, result: Walk, limits: Limits, budget: _Budget
                 ) -> Iterator[_Entry]:
    with open(path, "rb") as raw:
        compressed = _Counted(raw) if kind == "tar.gz" else None
        source: IO[bytes] = (gzip.GzipFile(fileobj=compressed)  # type: ignore[arg-type]
                             if compressed else raw)
        stream = _TarStream(source, compressed, limits)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]
                              tarinfo=_TarInfo)
        except (ArchiveError, tarfile.TarError, EOFError, OSError):
            raise
        except Exception as exc:
            raise ArchiveError(f"cannot read the {kind} archive: {type(exc).__name__}: {exc}"
                               ) from exc
        with tf:
            while True:
                try:
                    member = tf.next()
                except (ArchiveError, tarfile.TarError, EOFError, OSError):
                    raise
                except Exception as exc:  # RecursionError, zlib.error, ValueError, …
                    raise ArchiveError(f"cannot read the {kind} archive: "
                                       f"{type(exc).__name__}: {exc}") from exc
                if member is None:
                    break
                tf.members.clear()  # stream mode keeps every header otherwise
                _count(result, limits)
                if member.isdir():
                    continue
                if not member.isfile():
                    result.skip(member.name, _tar_type_reason(member))
                    continue
                if member.issparse():
                    result.skip(member.name, "sparse file (not supported)")
                    continue
                yield _Entry(member.name, member.size,
                             lambda member=member: tf.extractfile(member),  # type: ignore
                             limits.max_member_bytes, _too_large(limits), corrupt_is_fatal=True)
            end = tf.offset
        stream.drain()  # a truncated gzip stream raises EOFError here
        if stream.last_nonzero_end > end:
            raise ArchiveError(f"the {kind} archive is corrupt: a bad header at byte {end} "
                               "ends it early")
        if stream.pos - end < 1024:
            raise ArchiveError(f"the {kind} archive is truncated: it ends without the "
                               "end-of-archive marker")


def _tar_type_reason(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return "not a regular file"


def _file_type_reason(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "not a regular file"


def _too_large(limits: Limits) -> str:
    return f"larger than {limits.max_member_bytes} bytes (limit MMBATCH_MAX_MEMBER_BYTES)"


# --- members -----------------------------------------------------------------------------------


def _take(result: Walk, entry: _Entry, store: Callable[[IO[bytes]], str],
          budget: _Budget) -> str | None:
    """Take one member: store a media file under its item's key (which it returns), read
    labels.csv, or skip it with the reason."""
    raw_name = entry.name
    try:
        raw_name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable bytes as surrogates
        result.skip(raw_name.encode("utf-8", "replace").decode("utf-8"),
                    "name is not valid UTF-8")
        return None
    name = safe_name(raw_name)
    if name is None:
        result.skip(raw_name.replace("\\", "/"), "unsafe path")
        return None
    if len(name) > MAX_NAME_CHARS:
        result.skip(name[:MAX_NAME_CHARS] + "…", f"path longer than {MAX_NAME_CHARS} characters")
        return None
    if any(part.startswith(".") for part in name.split("/")) or name.startswith("__MACOSX/"):
        result.skip(name, "hidden file")
        return None
    folder, _, base = name.rpartition("/")
    if base == LABELS_FILE and "/" not in folder:  # at the root, or in a top-level folder
        if result.has_labels:
            result.skip(name, f"a second {LABELS_FILE} (the first one counts)")
            return None
        result.has_labels = True
        result.labels_folder = folder or None
        labels_entry = _Entry(name, entry.size, entry.opener, MAX_LABELS_BYTES,
                              f"{LABELS_FILE} is larger than {MAX_LABELS_BYTES} bytes",
                              entry.corrupt_is_fatal)
        try:
            with entry.opener() as f:
                data = _MemberReader(f, labels_entry, budget).read()
        except _TooLarge as exc:
            raise ArchiveError(str(exc)) from exc
        except NotImplementedError as exc:  # zip: an unsupported compression method
            raise ArchiveError(f"{LABELS_FILE} cannot be unpacked ({exc})") from exc
        result.labels = parse_labels(data)
        return None
    ext = posixpath.splitext(name)[1].lower()
    if ext in NESTED_ARCHIVE_EXTS:
        result.skip(name, "nested archive (archives inside archives are not unpacked)")
        return None
    modality = modality_of(name)
    if modality is None:
        result.skip(name, "unsupported file type")
        return None
    if entry.size == 0:
        result.skip(name, "empty file (0 bytes)")
        return None
    if entry.size > entry.limit:
        result.skip(name, entry.over_limit)
        return None
    key = posixpath.splitext(name)[0]
    media = result.items.get(key, {})
    if modality in media:
        result.skip(name, f"item {key} already has an {modality} file "
                          f"({media[modality]['name']})")
        return None
    try:
        with entry.opener() as f:
            reader = _MemberReader(f, entry, budget)
            if modality == "text" and entry.size <= TEXT_PEEK_BYTES:
                data = reader.read()
                if _blank(data, name):
                    result.skip(name, "empty caption (whitespace only)")
                    return None
                digest = store(io.BytesIO(data))
            else:
                digest = store(reader)  # type: ignore[arg-type]
    except _TooLarge as exc:
        result.skip(name, str(exc))
        return None
    except _Corrupt as exc:
        if entry.corrupt_is_fatal:
            raise
        result.skip(name, f"corrupt member ({exc})")
        return None
    except NotImplementedError as exc:  # zip: an unsupported compression method
        result.skip(name, f"cannot unpack ({exc})")
        return None
    if not media:
        result.note_item(key)
    result.items.setdefault(key, media)[modality] = {"blob": digest, "name": name}
    return key


def _blank(data: bytes, name: str) -> bool:
    """Whether a caption holds whitespace only (one that does not read as text is the worker's
    to fail, with the reason)."""
    try:
        return not read_text(data, name).text.strip()
    except MediaError:
        return False


def parse_labels(data: bytes) -> Labels:
    """``key,label[,split[,group]]`` rows. A first row whose first cell is ``key`` is a header:
    it is skipped, and where it names ``label``, ``split`` and ``group`` columns, those are read
    from where it puts them."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{LABELS_FILE} is not valid UTF-8: {exc}") from exc
    if "\x00" in text:  # PostgreSQL text cannot hold NUL
        raise ArchiveError(f"{LABELS_FILE} is not valid CSV: it contains a NUL byte")
    labels = Labels()
    first_line: dict[str, int] = {}
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:  # e.g. a NUL byte, or a field over the csv module's size limit
        raise ArchiveError(f"{LABELS_FILE} is not valid CSV: {exc}") from exc
    columns = {"label": 1, "split": 2, "group": 3}
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if lineno == 1 and row[0].strip().lower() == "key":
            named = {cell.strip().lower(): i for i, cell in enumerate(row)}
            if "label" in named:
                columns = {c: named.get(c, -1) for c in columns}
            continue
        label = _cell(row, columns["label"])
        if not row[0].strip() or not label:
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: expected key,label[,split[,group]]")
        if len(label) > 255:
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: a label is at most 255 characters")
        split = _cell(row, columns["split"]).lower() or None
        if split is not None and split not in VAL_SPLITS | TRAIN_SPLITS:
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: unknown split {_cell(row, columns['split'])!r} "
                               "(use train or val)")
        group = _cell(row, columns["group"]) or None
        if group is not None and len(group) > 255:
            raise ArchiveError(f"{LABELS_FILE} line {lineno}: a group is at most 255 characters")
        key = posixpath.splitext(row[0].strip())[0] if modality_of(row[0].strip()) else row[0].strip()
        key = unicodedata.normalize("NFC", key.replace("\\", "/")).removeprefix("./")
        new = LabelRow(label, _canonical_split(split), group)
        if key in labels:
            if labels[key] != new:
                raise ArchiveError(
                    f"{LABELS_FILE} lines {first_line[key]} and {lineno}: item {key} is labelled "
                    f"both {labels[key].label!r} and {label!r}" if labels[key].label != label
                    else f"{LABELS_FILE} lines {first_line[key]} and {lineno}: item {key} is "
                         f"given twice with a different split or group")
            _note_duplicate(labels, key, first_line[key], lineno)
            continue
        labels[key] = new
        first_line[key] = lineno
    return labels


def _note_duplicate(labels: Labels, key: str, first: int, again: int) -> None:
    for seen in labels.duplicates:
        if seen["key"] == key:
            seen["lines"].append(again)
            return
    labels.duplicates.append({"key": key, "lines": [first, again]})


def _cell(row: list[str], index: int) -> str:
    """The stripped cell at ``index``, or "" where the row is shorter (or the column absent)."""
    return row[index].strip() if 0 <= index < len(row) else ""


def _canonical_split(split: str | None) -> str | None:
    if split is None:
        return None
    return "val" if split in VAL_SPLITS else "train"
