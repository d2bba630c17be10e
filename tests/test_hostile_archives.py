"""Hostile archives through walk(): each bad input ends as a named skip or an ArchiveError.

Every archive here is built byte by byte in the test. Nothing is ever extracted to a path, so the
tests also check that nothing appeared outside the blob store and that no half-written blob
(``.incoming-*``) is left behind.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from media.archive import (
    MAX_TAR_HEADER_BYTES,
    ArchiveError,
    Limits,
    Walk,
    _Budget,
    _Entry,
    _MemberReader,
    _TooLarge,
    walk,
)
from store.blobs import BlobStore

MB = 1024 * 1024


# --- builders ----------------------------------------------------------------------------------


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w",
         fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]],
         method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _leftovers(blobs: BlobStore) -> list[str]:
    """Temp files of interrupted blob writes."""
    return [p.name for p in blobs.root.glob(".incoming-*")]


def _reasons(found: Walk) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in found.skipped}


GOOD = [("ok/a.txt", b"a caption"), ("ok/a.png", b"png bytes")]


# --- paths that try to escape ------------------------------------------------------------------

ESCAPES = ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt", "//server/share/evil.txt",
           "C:/evil.txt", "C:evil.txt", "c:\\windows\\evil.txt", "..\\evil.txt",
           "a\\..\\..\\evil.txt", "new\nline.txt", "tab\there.txt", "bell\x07.txt"]


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_escaping_names_are_skipped_as_unsafe_and_nothing_is_written(tmp_path: Path,
                                                                    fmt: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    members = [(name, b"x") for name in ESCAPES] + GOOD
    if fmt == "tar":
        archive = _tar(work / "a.tar", members)
    else:
        archive = work / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members:
                info = zipfile.ZipInfo("placeholder")
                info.filename = name  # ZipInfo() would normalise the name; an attacker does not
                zf.writestr(info, data)
    blobs = _blobs(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*") if "blobs" not in p.parts)
    cwd = os.getcwd()
    os.chdir(work)  # a walk that extracted relative paths would write here
    try:
        found = walk(archive, blobs.put_stream)
    finally:
        os.chdir(cwd)
    assert set(found.items) == {"ok/a"}
    reasons = _reasons(found)
    for name in ESCAPES:
        assert reasons[name.replace("\\", "/")] == "unsafe path", name  # shown with / separators
    after = sorted(p for p in tmp_path.rglob("*") if "blobs" not in p.parts)
    assert after == before
    assert not Path("/etc/evil.txt").exists()
    assert _leftovers(blobs) == []


def test_dot_segments_that_stay_inside_are_normalised(tmp_path: Path) -> None:
    found = walk(_tar(tmp_path / "a.tar", [("./a/./b/../c.txt", b"x")]),
                 _blobs(tmp_path).put_stream)
    assert set(found.items) == {"a/c"}


# --- links, devices, special files -------------------------------------------------------------


def test_links_devices_and_fifos_in_a_tar_are_skipped_by_kind(tmp_path: Path) -> None:
    members = [
        _special("s/sym.txt", tarfile.SYMTYPE, "/etc/passwd"),
        _special("s/rel.jpg", tarfile.SYMTYPE, "../../../../etc/shadow"),
        _special("s/hard.txt", tarfile.LNKTYPE, "ok/a.txt"),
        _special("s/char.wav", tarfile.CHRTYPE),
        _special("s/block.png", tarfile.BLKTYPE),
        _special("s/fifo.txt", tarfile.FIFOTYPE),
        *GOOD,
    ]
    found = walk(_tar(tmp_path / "a.tar", members), _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert _reasons(found) == {
        "s/sym.txt": "symbolic link", "s/rel.jpg": "symbolic link", "s/hard.txt": "hard link",
        "s/char.wav": "device file", "s/block.png": "device file", "s/fifo.txt": "FIFO"}


def test_symlink_and_device_entries_in_a_zip_are_skipped(tmp_path: Path) -> None:
    def entry(name: str, mode: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
        info.external_attr = mode << 16
        return info

    archive = _zip(tmp_path / "a.zip", [(entry("l/link.txt", 0o120777), b"/etc/passwd"),
                                        (entry("l/dev.wav", 0o020644), b""),
                                        (entry("l/file.txt", 0o100644), b"regular"), *GOOD])
    found = walk(archive, _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a", "l/file"}
    assert _reasons(found) == {"l/link.txt": "symbolic link", "l/dev.wav": "device file"}


def test_sparse_tar_member_is_skipped(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse member")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge.wav", "wb") as f:  # 1 GiB that is all hole: a tiny archive
        f.truncate(1 << 30)
    (src / "a.txt").write_bytes(b"fine")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(src), "huge.wav", "a.txt"],
                   check=True)
    assert archive.stat().st_size < MB
    blobs = _blobs(tmp_path)
    found = walk(archive, blobs.put_stream)
    assert set(found.items) == {"a"}
    assert _reasons(found) == {"huge.wav": "sparse file (not supported)"}
    assert found.unpacked_bytes < MB


# --- bombs -------------------------------------------------------------------------------------


def test_zip_member_over_the_compression_ratio_is_skipped_and_stores_nothing(
        tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", [("b/zeros.wav", bytes(40 * MB)), *GOOD])
    assert archive.stat().st_size < 100_000
    blobs = _blobs(tmp_path)
    found = walk(archive, blobs.put_stream)
    assert set(found.items) == {"ok/a"}
    assert "unpacks to more than 100 times its compressed size" in _reasons(found)["b/zeros.wav"]
    assert found.unpacked_bytes < MB  # refused on the declared sizes, before inflating anything
    assert _leftovers(blobs) == []
    assert sum(p.stat().st_size for p in blobs.root.rglob("*") if p.is_file()) < 1000


def test_zip_member_whose_header_lies_about_its_size_is_corrupt(tmp_path: Path) -> None:
    """The central directory says 10 bytes; the data is 2 MiB: only 10 are read, CRC fails."""
    archive = _zip(tmp_path / "lie.zip", [("l/liar.txt", b"y" * (2 * MB)), *GOOD],
                   method=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    cd = data.find(b"PK\x01\x02")  # the first entry's central directory record
    struct.pack_into("<I", data, cd + 24, 10)  # uncompressed size
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 10)
    archive.write_bytes(bytes(data))
    blobs = _blobs(tmp_path)
    found = walk(archive, blobs.put_stream)
    assert set(found.items) == {"ok/a"}
    assert _reasons(found)["l/liar.txt"].startswith("corrupt member (BadZipFile: Bad CRC-32")
    assert _leftovers(blobs) == []


@pytest.mark.timeout(60)  # a hang guard: inflating without the ratio check would take long
def test_tar_gz_bomb_fails_the_archive_quickly(tmp_path: Path) -> None:
    # 200 MiB of zeros in a member whose name is skipped anyway: the stream still has to be
    # inflated to get past it, so the ratio is judged on the stream, not on members.
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=9) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 200 * MB
        tf.addfile(info, _Zeros(info.size))
    assert archive.stat().st_size < 400_000
    with pytest.raises(ArchiveError, match=r"more than 100 times its compressed size .*"
                                           r"MMBATCH_MAX_COMPRESSION_RATIO"):
        walk(archive, _blobs(tmp_path).put_stream)


def test_total_unpacked_size_is_capped(tmp_path: Path) -> None:
    members = [(f"t/{i}.txt", os.urandom(4000)) for i in range(10)]
    limits = Limits(max_unpacked_bytes=20_000)
    for fmt in ("zip", "tar", "tar.gz"):
        blobs = _blobs(tmp_path / fmt)
        if fmt == "zip":
            archive = _zip(tmp_path / "t.zip", members)
        else:
            archive = _tar(tmp_path / f"t.{fmt}", members, "w:gz" if fmt == "tar.gz" else "w")
        with pytest.raises(ArchiveError, match=r"unpacks to more than 20000 bytes "
                                               r"\(limit MMBATCH_MAX_UNPACKED_BYTES\)"):
            walk(archive, blobs.put_stream, limits)
        assert _leftovers(blobs) == []


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_member_over_the_size_limit_is_skipped_and_the_rest_goes_on(tmp_path: Path,
                                                                   fmt: str) -> None:
    members = [("big/a.wav", os.urandom(5000)), *GOOD]
    if fmt == "zip":
        archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / f"a.{fmt}", members, "w:gz" if fmt == "tar.gz" else "w")
    blobs = _blobs(tmp_path)
    found = walk(archive, blobs.put_stream, Limits(max_member_bytes=4096))
    assert set(found.items) == {"ok/a"}
    assert _reasons(found) == {
        "big/a.wav": "larger than 4096 bytes (limit MMBATCH_MAX_MEMBER_BYTES)"}


def test_a_member_cut_off_mid_stream_leaves_no_blob(tmp_path: Path) -> None:
    """The streaming guard itself: a reader that outgrows its limit while the blob is written."""
    blobs = _blobs(tmp_path)
    entry = _Entry("x.wav", 10, lambda: io.BytesIO(), 3 * MB, "too big", corrupt_is_fatal=True)
    reader = _MemberReader(io.BytesIO(os.urandom(5 * MB)), entry, _Budget(Limits()))
    with pytest.raises(_TooLarge, match="too big"):
        blobs.put_stream(reader)  # type: ignore[arg-type]
    assert reader.count <= 4 * MB  # stopped within one chunk of the limit
    assert list(blobs.root.rglob("*")) == []


# --- too many entries, oversized headers -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_too_many_entries_fail_the_archive(tmp_path: Path, fmt: str) -> None:
    members = [(f"n/{i}.txt", b"x") for i in range(11)]
    if fmt == "zip":
        archive = _zip(tmp_path / "n.zip", members)
    else:
        archive = _tar(tmp_path / f"n.{fmt}", members, "w:gz" if fmt == "tar.gz" else "w")
    with pytest.raises(ArchiveError, match=r"more than 10 .*MMBATCH_MAX_ARCHIVE_MEMBERS"):
        walk(archive, _blobs(tmp_path).put_stream, Limits(max_members=10))
    assert len(walk(archive, _blobs(tmp_path).put_stream, Limits(max_members=11)).items) == 11


def test_zip_claiming_millions_of_entries_is_refused_before_zipfile_reads_them(
        tmp_path: Path) -> None:
    archive = _zip(tmp_path / "z.zip", GOOD)
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 0xFFFE, 0xFFFE)
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="65534 entries, more than 1000"):
        walk(archive, _blobs(tmp_path).put_stream, Limits(max_members=1000))
    # and a Zip64 end record claiming 10 million
    zip64 = tmp_path / "z64.zip"
    with zipfile.ZipFile(zip64, "w") as zf:
        for name, payload in GOOD:
            zf.writestr(name, payload)
    data = bytearray(zip64.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    record = (struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 10**7, 10**7,
                          10**8, 0))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
    forged = bytes(data[:end]) + record + locator + bytes(data[end:])
    zip64.write_bytes(forged)
    with pytest.raises(ArchiveError, match="10000000 entries"):
        walk(zip64, _blobs(tmp_path).put_stream)


def test_oversized_pax_or_longname_header_fails_the_archive(tmp_path: Path) -> None:
    big = "x" * (MAX_TAR_HEADER_BYTES + 10)
    pax = tarfile.TarInfo("p.txt")
    pax.pax_headers = {"comment": big}
    archive = _tar(tmp_path / "pax.tar", [pax, *[tarfile.TarInfo(n) for n, _ in GOOD]],
                   fmt=tarfile.PAX_FORMAT)
    with pytest.raises(ArchiveError, match="extended header of .* bytes"):
        walk(archive, _blobs(tmp_path).put_stream)
    longname = _tar(tmp_path / "long.tar", [(big[:-4] + ".txt", b"x")], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(ArchiveError, match="extended header"):
        walk(longname, _blobs(tmp_path).put_stream)


def test_long_but_allowed_names_are_skipped_not_stored(tmp_path: Path) -> None:
    found = walk(_tar(tmp_path / "n.tar", [("d/" + "n" * 2000 + ".txt", b"x"), *GOOD]),
                 _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert found.skipped[0]["reason"] == "path longer than 1024 characters"


# --- nested archives, duplicates, empty, unsupported, odd names --------------------------------


def test_nested_archives_are_skipped_with_a_reason(tmp_path: Path) -> None:
    inner = _zip(tmp_path / "inner.zip", GOOD).read_bytes()
    members = [("n/inner.zip", inner), ("n/inner.tar.gz", b"\x1f\x8b" + bytes(50)),
               ("n/inner.tar", bytes(1024)), ("n/x.7z", b"7z"), *GOOD]
    found = walk(_tar(tmp_path / "a.tar", members), _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    reason = "nested archive (archives inside archives are not unpacked)"
    assert _reasons(found) == {"n/inner.zip": reason, "n/inner.tar.gz": reason,
                               "n/inner.tar": reason, "n/x.7z": reason}


def test_duplicate_keys_and_names_keep_the_first(tmp_path: Path) -> None:
    members = [("d/a.jpg", b"first"), ("d/a.png", b"second"), ("d/a.JPG", b"third"),
               ("d/a.txt", b"one"), ("d/a.txt", b"two"),
               ("labels.csv", b"d/a,cat\n"), ("labels.csv", b"d/a,dog\n")]
    blobs = _blobs(tmp_path)
    found = walk(_tar(tmp_path / "a.tar", members), blobs.put_stream)
    assert blobs.read(found.items["d/a"]["image"]["blob"]) == b"first"
    assert blobs.read(found.items["d/a"]["text"]["blob"]) == b"one"
    assert found.labels == {"d/a": ("cat", None, None)}
    assert [s["reason"] for s in found.skipped] == [
        "item d/a already has an image file (d/a.jpg)",
        "item d/a already has an image file (d/a.jpg)",
        "item d/a already has an text file (d/a.txt)",
        "a second labels.csv (the first one counts)"]


def test_empty_unsupported_and_hidden_files_are_listed_not_fatal(tmp_path: Path) -> None:
    members = [("e/empty.txt", b""), ("e/empty.wav", b""), ("e/x.exe", b"MZ"),
               ("e/x.pdf", b"%PDF"), ("e/noext", b"?"), ("e/.secret.txt", b"s"),
               (".git/config.txt", b"c"), ("__MACOSX/._a.png", b"m"), *GOOD]
    found = walk(_tar(tmp_path / "a.tar", members), _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert _reasons(found) == {
        "e/empty.txt": "empty file (0 bytes)", "e/empty.wav": "empty file (0 bytes)",
        "e/x.exe": "unsupported file type", "e/x.pdf": "unsupported file type",
        "e/noext": "unsupported file type", "e/.secret.txt": "hidden file",
        ".git/config.txt": "hidden file", "__MACOSX/._a.png": "hidden file"}


def test_names_that_are_not_utf8_are_skipped(tmp_path: Path) -> None:
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in [("caf\xe9.txt", b"x"), *GOOD]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    found = walk(archive, _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert found.skipped == [{"name": "caf?.txt", "reason": "name is not valid UTF-8"}]


def test_zip_member_with_an_unsupported_compression_method_is_skipped(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", [("m/a.txt", b"hello"), *GOOD], method=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<H", data, local + 8, 97)  # no such method
    cd = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, cd + 10, 97)
    archive.write_bytes(bytes(data))
    found = walk(archive, _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert _reasons(found)["m/a.txt"].startswith("cannot unpack (")


def test_labels_csv_with_an_unsupported_compression_method_fails_the_archive(
        tmp_path: Path) -> None:
    """Found by the mutation test: the labels, unlike a media file, cannot just be skipped."""
    archive = _zip(tmp_path / "l.zip", [("labels.csv", b"ok/a,x\n"), *GOOD],
                   method=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    struct.pack_into("<H", data, data.find(b"PK\x03\x04") + 8, 19720)
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 10, 19720)
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"^labels\.csv cannot be unpacked \("):
        walk(archive, _blobs(tmp_path).put_stream)


@pytest.mark.parametrize("labels,message", [
    (b"k,\x00label\n", "not valid CSV"),
    (b"k," + b"L" * 300 + b"\n", "at most 255 characters"),
    (b"\xff\xfek,l\n", "not valid UTF-8"),
])
def test_hostile_labels_csv_fails_the_archive(tmp_path: Path, labels: bytes,
                                              message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        walk(_tar(tmp_path / "l.tar", [("labels.csv", labels), *GOOD]),
             _blobs(tmp_path).put_stream)


# --- corrupt and truncated streams -------------------------------------------------------------


def test_corrupt_header_in_the_middle_of_a_tar_is_an_error_not_a_shorter_archive(
        tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar", [(f"k/{i}.txt", b"x" * 600) for i in range(5)])
    data = bytearray(archive.read_bytes())
    third = 2 * (512 + 1024)  # each member: a header block and two data blocks
    data[third + 148:third + 156] = b"garbage!"  # its checksum field
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt: a bad header"):
        walk(archive, _blobs(tmp_path).put_stream)


def test_corrupt_deflate_data_in_a_tar_gz_is_an_archive_error(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [(f"k/{i}.txt", os.urandom(3000)) for i in range(20)],
                   "w:gz")
    data = bytearray(archive.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="cannot read the tar.gz archive"):
        walk(archive, _blobs(tmp_path).put_stream)


def test_corrupt_zip_member_data_skips_that_member(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", [("c/a.txt", os.urandom(20_000)), *GOOD])
    data = bytearray(archive.read_bytes())
    for i in range(200, 264):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    found = walk(archive, _blobs(tmp_path).put_stream)
    assert set(found.items) == {"ok/a"}
    assert _reasons(found)["c/a.txt"].startswith("corrupt member (")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_mutated_archives_end_as_a_walk_or_an_archive_error(tmp_path: Path, fmt: str) -> None:
    """300 seeded mutations (flipped bytes, cuts, splices) of a small archive: walk() either
    returns or raises ArchiveError, each within a second, and never leaves a partial blob."""
    content = random.Random(f"content-{fmt}")  # seeded: the same 300 archives every run
    members = [(f"m/{i}.{ext}", content.randbytes(300) + b"caption " * 50)
               for i in range(6) for ext in ("txt", "png")] + [("labels.csv", b"m/0,a\nm/1,b\n")]
    if fmt == "zip":
        base = _zip(tmp_path / "base.zip", members).read_bytes()
    else:
        base = _tar(tmp_path / f"base.{fmt}", members,
                    "w:gz" if fmt == "tar.gz" else "w").read_bytes()
    rng = random.Random(f"mutate-{fmt}")
    blobs = _blobs(tmp_path)
    outcomes = {"walk": 0, "ArchiveError": 0}
    for n in range(300):
        data = bytearray(base)
        how = n % 3
        if how == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 1:
            del data[rng.randrange(1, len(data)):]
        else:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
        path = tmp_path / f"m{n}"
        path.write_bytes(bytes(data))
        try:
            walk(path, blobs.put_stream, Limits(max_members=1000, max_member_bytes=MB,
                                                max_unpacked_bytes=16 * MB))
            outcomes["walk"] += 1
        except ArchiveError:
            outcomes["ArchiveError"] += 1
        path.unlink()
    assert _leftovers(blobs) == []
    assert outcomes["walk"] + outcomes["ArchiveError"] == 300
    print(f"{fmt}: {outcomes}")


class _Zeros(io.RawIOBase):
    """A stream of n zero bytes without holding them."""

    def __init__(self, n: int) -> None:
        self._left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self._left)
        buf[:n] = bytes(n)
        self._left -= n
        return n


def test_gzip_helper_sanity() -> None:
    assert len(zlib.compress(bytes(MB))) < 2000
