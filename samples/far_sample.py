"""A deterministic labelled archive far from what the pretrained encoders saw: tiny glyph
images and words in several scripts, from several sources (``group`` in ``labels.csv``).

Four classes, two factors, each modality showing one of them:

- the image is a 16 x 16 grayscale rendering of a glyph, a ring or a triangle (the first
  factor), small, shifted, with a source-specific style: dark on light or light on dark,
  stroke width, noise, and a few stray pixels;
- the text is a made-up word of 3-7 letters in the source's script (Latin, Cyrillic, Greek,
  Armenian, Georgian, Ethiopic, Cherokee, Tifinagh) holding a marker letter somewhere, the
  Runic ᚠ or ᚢ (the second factor), for every source. An English sentence encoder maps most of
  these words to one unknown token; a byte-level CNN can find the marker in any script. In one
  word in five the marker is missing, so the text factor cannot be perfect;
- each source (group) has its own script and image style, so a group-disjoint validation split
  asks for what transfers to a new source.

Run ``python -m samples.far_sample OUT_DIR [--per-group N] [--seed S]`` to write
``far_train.tar`` (with ``labels.csv``: ``key,label,group``). The same seed gives the same
bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from samples.clips import picture_clip

__all__ = ["CLASSES", "GROUPS", "write_far_sample"]

SHAPES: tuple[str, ...] = ("ring", "triangle")
MARKERS = "ᚠᚢ"  # Runic fehu, uruz
CLASSES: tuple[str, ...] = tuple(f"{shape}-{marker}" for shape in SHAPES
                                 for marker in ("fehu", "uruz"))
# group -> (filler letters, dark_on_light, stroke, noise sigma)
GROUPS: dict[str, tuple[str, bool, int, float]] = {
    "latin": ("bcdfghklmnprstvz", True, 1, 10.0),
    "cyrillic": ("бвгджзклмнпрстф", False, 1, 20.0),
    "greek": ("βγδζθκλμνξπρστφ", True, 2, 30.0),
    "armenian": ("աբգդեզէըթժիլխծկ", False, 2, 15.0),
    "georgian": ("აბგდევზთიკლმნოპ", True, 1, 25.0),
    "ethiopic": ("ሀለሐመሠረሰሸቀበተቸኀነኘ", False, 1, 10.0),
    "cherokee": ("ᎠᎡᎢᎣᎤᎥᎦᎧᎨᎩᎪᎫᎬᎭᎮ", True, 2, 20.0),
    "tifinagh": ("ⴰⴱⴳⴷⴹⴻⴼⴽⵀⵃⵄⵅⵇⵉⵊ", False, 2, 30.0),
}
SIZE = 16
_MISSING_MARKER = 0.2
_TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z: the same seed gives the same bytes


def _glyph(rng: np.random.Generator, label: int, dark_on_light: bool, stroke: int,
           noise: float) -> Image.Image:
    scale = 4  # drawn at 64 x 64, then reduced: anti-aliased strokes
    big = SIZE * scale
    fg, bg = (30, 225) if dark_on_light else (225, 30)
    img = Image.new("L", (big, big), bg)
    draw = ImageDraw.Draw(img)
    half = int(rng.integers(18, 26))
    cx = big // 2 + int(rng.integers(-8, 9))
    cy = big // 2 + int(rng.integers(-8, 9))
    width = stroke * scale + int(rng.integers(0, 3))
    box = (cx - half, cy - half, cx + half, cy + half)
    if SHAPES[label // len(MARKERS)] == "ring":
        draw.ellipse(box, outline=fg, width=width)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)],
                     outline=fg, width=width)
    for _ in range(int(rng.integers(2, 6))):  # stray marks
        x, y = (int(v) for v in rng.integers(0, big, 2))
        draw.rectangle((x, y, x + scale, y + scale), fill=fg)
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float64)
    small = small + rng.normal(0.0, noise, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), mode="L")


def _word(rng: np.random.Generator, label: int, letters: str) -> str:
    word = [letters[int(rng.integers(len(letters)))] for _ in range(int(rng.integers(3, 8)))]
    if rng.random() >= _MISSING_MARKER:
        word.insert(int(rng.integers(len(word) + 1)), MARKERS[label % len(MARKERS)])
    return "".join(word)


def far_items(per_group: int, seed: int) -> list[tuple[str, str, str, bytes, bytes]]:
    """(key, label, group, png, utf-8 text) for ``per_group`` items of every group, classes
    balanced within each group."""
    out = []
    for g, (group, (letters, dark, stroke, noise)) in enumerate(GROUPS.items()):
        rng = np.random.default_rng([seed, g])
        for i in range(per_group):
            label = i % len(CLASSES)
            buf = io.BytesIO()
            _glyph(rng, label, dark, stroke, noise).save(buf, format="PNG")
            key = f"{group}/item_{i:04d}"
            out.append((key, CLASSES[label], group, buf.getvalue(),
                        _word(rng, label, letters).encode("utf-8")))
    return out


def write_far_sample(out_dir: str | Path, per_group: int = 48, seed: int = 0,
                     clips: bool = False) -> Path:
    """Write ``far_train.tar`` (images, words, ``labels.csv`` with groups); returns its path.
    ``clips``: each image as a one-second clip of it (64 x 64, panning, with noise) instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = far_items(per_group, seed)
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["key", "label", "group"])
    members: list[tuple[str, bytes]] = []
    for key, label, group, png, text in items:
        writer.writerow([key, label, group])
        picture = (f"{key}.mp4", picture_clip(Image.open(io.BytesIO(png)), seconds=1.0,
                                              size=(64, 64), seed=len(members))
                   ) if clips else (f"{key}.png", png)
        members += [picture, (f"{key}.txt", text)]
    members.append(("labels.csv", labels.getvalue().encode("utf-8")))
    path = out / "far_train.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir")
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_far_sample(args.out_dir, args.per_group, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
