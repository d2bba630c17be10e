"""The benchmark's synthetic archive: realistic sizes, deterministic bytes.

Each item is ``item_NNNNNN`` with three files:

- ``.jpg``: a 640x480 photo-like JPEG (quality 90): smooth colour fields, a few shapes and
  per-pixel grain, so the file is the size of a real photo (about 60-120 KB), not a flat colour;
- ``.txt``: a caption of 20-60 words;
- ``.wav``: 5 s of 44.1 kHz stereo 16-bit PCM (882 KB): tones, a sweep and noise.

The class of an item (one of four) tints the image, sets the audio's tone and colours the
caption, so a trained head has something to learn. ``labels=True`` adds ``labels.csv``. Archives
are plain tar: JPEG and PCM do not compress, and gzip would only add CPU time to every run.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("forest", "harbour", "market", "desert")
WIDTH, HEIGHT = 640, 480
AUDIO_RATE = 44_100
AUDIO_SECONDS = 5.0
JPEG_QUALITY = 90

_TINTS = {"forest": (40, 110, 50), "harbour": (40, 90, 160), "market": (170, 90, 40),
          "desert": (200, 170, 110)}
_TONES = {"forest": 330.0, "harbour": 110.0, "market": 880.0, "desert": 1760.0}
_CLASS_WORDS = {
    "forest": ("pine", "moss", "trail", "canopy", "fern", "owl", "bark", "stream"),
    "harbour": ("boat", "pier", "gull", "tide", "rope", "crane", "hull", "buoy"),
    "market": ("stall", "crowd", "fruit", "vendor", "spice", "coin", "basket", "awning"),
    "desert": ("dune", "sand", "camel", "heat", "mirage", "rock", "cactus", "wind"),
}
_WORDS = ("the", "a", "of", "and", "with", "near", "under", "bright", "quiet", "old", "small",
          "large", "morning", "evening", "light", "shadow", "people", "walking", "view",
          "distant", "colour", "sound", "afternoon", "early", "late", "warm", "cold", "photo",
          "picture", "scene", "long", "short", "clear", "soft", "loud", "green", "blue", "red")


def label_of(index: int) -> str:
    return CLASSES[index % len(CLASSES)]


def make_image(rng: np.random.Generator, label: str) -> bytes:
    # Smooth colour field: low-resolution noise upsampled, tinted by the class.
    base = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(base).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    tint = np.array(_TINTS[label], dtype=np.float32)
    pixels = 0.55 * field + 0.45 * tint
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, WIDTH - 40)), int(rng.integers(0, HEIGHT - 40))
        x1, y1 = x0 + int(rng.integers(20, 240)), y0 + int(rng.integers(20, 180))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    # Grain: what makes a photo's JPEG large.
    grain = rng.normal(0.0, 9.0, size=(HEIGHT, WIDTH, 1)).astype(np.float32)
    pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_caption(rng: np.random.Generator, label: str) -> bytes:
    n = int(rng.integers(20, 61))
    words = [str(w) for w in rng.choice(_WORDS, size=n)]
    for i in rng.choice(n, size=max(2, n // 8), replace=False):
        words[int(i)] = str(rng.choice(_CLASS_WORDS[label]))
    words[0] = words[0].capitalize()
    return (" ".join(words) + ".").encode("utf-8")


def make_audio(rng: np.random.Generator, label: str) -> bytes:
    n = int(AUDIO_SECONDS * AUDIO_RATE)
    t = np.arange(n, dtype=np.float32) / AUDIO_RATE
    tone = _TONES[label] * rng.uniform(0.95, 1.05)
    sweep = rng.uniform(200, 4000) + rng.uniform(-150, 150) * t
    left = 0.3 * np.sin(2 * np.pi * tone * t) + 0.1 * np.sin(2 * np.pi * sweep * t)
    right = 0.3 * np.sin(2 * np.pi * tone * t + rng.uniform(0, np.pi))
    noise = rng.normal(0, 0.05, size=(n, 2)).astype(np.float32)
    stereo = np.stack([left, right], axis=1).astype(np.float32) + noise  # (T, 2)
    stereo *= rng.uniform(0.4, 0.9) / max(float(np.abs(stereo).max()), 1e-6)
    buf = io.BytesIO()
    soundfile.write(buf, stereo, AUDIO_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_item(seed: int, index: int) -> tuple[str, dict[str, bytes]]:
    label = label_of(index)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)]
    files = {".jpg": make_image(rngs[0], label), ".txt": make_caption(rngs[1], label),
             ".wav": make_audio(rngs[2], label)}
    return label, files


def write_archive(path: Path, n_items: int, seed: int, labels: bool = False) -> Path:
    """Write ``n_items`` items to a tar at ``path`` (kept if it is already there)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    rows = ["key,label,split"]
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(n_items):
            label, files = make_item(seed, index)
            key = f"item_{index:06d}"
            rows.append(f"{key},{label},{'val' if index % 5 == 4 else 'train'}")
            for ext, data in files.items():
                _add(tar, key + ext, data)
        if labels:
            _add(tar, "labels.csv", ("\n".join(rows) + "\n").encode())
    partial.replace(path)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_704_067_200
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_items(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The archive's items in order: (key, {extension: bytes}); labels.csv is left out."""
    items: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile() or member.name == "labels.csv":
                continue
            key, _, ext = member.name.rpartition(".")
            f = tar.extractfile(member)
            assert f is not None
            items.setdefault(key, {})["." + ext] = f.read()
    return list(items.items())
