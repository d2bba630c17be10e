"""Deterministic sample data: a small labelled multimodal archive where fusion matters.

Each item is a scene with an animal in it. The label combines two binary factors, and each
modality carries only part of it:

- the image (a rendered landscape) shows the time of day, a bright sky with a sun or a dark sky with
  a moon and stars, and nothing about the animal;
- the audio (2 s) carries the animal, fast high chirps (2-5 kHz) for a bird or low pulsed croaks
  (150-600 Hz) for a frog, and nothing about the time of day;
- the caption hints at the animal in about half of the items and at the time of day in about a
  third, so text alone is weakly informative.

So one modality alone gets about half of the 4-class labels right, and image and audio together
get nearly all of them. About one item in ten lacks one modality (never more than one).

With ``clips`` (a fraction, 0 by default), that share of the items that have both a picture and
a sound come as one video clip instead (``item_0007.mp4``, ``.mkv``, ``.mov`` or ``.avi``): the
scene panning slowly with noise, faded in from black on some, at one of a few sizes, its animal
call as the sound track (samples.clips). ``clips=1`` gives every such item as a clip.

Files are grouped WebDataset style under neutral folders (``batch_00/item_0007.jpg``,
``batch_00/item_0007.txt``, ``batch_00/item_0007.wav`` are the item ``batch_00/item_0007``), so
no path reveals the label. The training archive has ``labels.csv`` (``key,label,split``) at its
root; the unlabelled archive has none, and its labels are written beside it as a truth CSV
(``key,label``). The same seed gives byte-identical archives.

Run ``python -m samples.sample OUT_DIR`` to write them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from samples.clips import picture_clip

__all__ = ["CLASSES", "FORMATS", "SampleArchives", "write_sample"]

CLASSES: tuple[str, ...] = ("day_bird", "day_frog", "night_bird", "night_frog")
FORMATS: tuple[str, ...] = ("zip", "tar", "tar.gz")

_ITEMS_PER_FOLDER = 50
_VAL_FRACTION = 0.2
_MISSING_FRACTION = 0.1
_AUDIO_SECONDS = 2.0
# Archive metadata fixed so that the same seed gives the same bytes.
_TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z
_ZIP_DATE_TIME = (2024, 1, 1, 0, 0, 0)
_PRECOMPRESSED = (".jpg", ".png", ".flac", ".mp4", ".mkv", ".mov", ".avi")
_CLIP_FORMATS = ("mp4", "mkv", "mov", "avi")
_CLIP_SIZES = ((160, 120), (192, 144), (128, 96), (176, 96))


@dataclass(frozen=True)
class SampleArchives:
    """Paths written by :func:`write_sample`."""

    train: Path  # labelled archive, with labels.csv at its root
    unlabelled: Path  # archive without labels
    truth: Path  # CSV key,label for the unlabelled archive, kept outside it


@dataclass(frozen=True)
class _Item:
    key: str
    label: str
    files: dict[str, bytes]  # extension (".jpg", ".txt", ...) -> file content


def write_sample(
    out_dir: Path,
    n_train: int = 240,
    n_unlabelled: int = 80,
    seed: int = 0,
    fmt: str = "tar.gz",
    clips: float = 0.0,
) -> SampleArchives:
    """Write the labelled and unlabelled sample archives and the truth CSV into ``out_dir``.

    ``fmt`` is one of ``"zip"``, ``"tar"``, ``"tar.gz"``. The training items are split about
    80/20 into train and val, stratified by class, with every class in both splits.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if n_train < 2 * len(CLASSES):
        raise ValueError(
            f"n_train must be at least {2 * len(CLASSES)} (two items per class), not {n_train}"
        )
    if n_unlabelled < 1:
        raise ValueError(f"n_unlabelled must be at least 1, not {n_unlabelled}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    if not 0.0 <= clips <= 1.0:
        raise ValueError(f"clips must be a fraction between 0 and 1, not {clips}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(n_train + n_unlabelled - 1)))
    train_items = _make_items(seed, stream=0, first=0, count=n_train, width=width, clips=clips)
    unlabelled_items = _make_items(seed, stream=1, first=n_train, count=n_unlabelled, width=width,
                                   clips=clips)

    splits = _stratified_splits([item.label for item in train_items], seed)
    labels_csv = _csv_bytes(
        ["key", "label", "split"],
        [[item.key, item.label, split] for item, split in zip(train_items, splits, strict=True)],
    )
    truth_csv = _csv_bytes(["key", "label"], [[item.key, item.label] for item in unlabelled_items])

    paths = SampleArchives(
        train=out_dir / f"sample_train.{fmt}",
        unlabelled=out_dir / f"sample_unlabelled.{fmt}",
        truth=out_dir / "sample_unlabelled_truth.csv",
    )
    _write_archive(paths.train, [*_members(train_items), ("labels.csv", labels_csv)], fmt)
    _write_archive(paths.unlabelled, _members(unlabelled_items), fmt)
    _write_atomic(paths.truth, truth_csv)
    return paths


# --- items -------------------------------------------------------------------------------------


def _make_items(seed: int, stream: int, first: int, count: int, width: int,
                clips: float = 0.0) -> list[_Item]:
    # Balanced classes in a random order, so neither the key nor the position reveals the label.
    order_rng = np.random.default_rng([seed, stream, 1_000_003])
    labels = order_rng.permutation(np.resize(np.arange(len(CLASSES)), count))
    items = []
    for offset, label_index in enumerate(labels):
        index = first + offset
        key = f"batch_{index // _ITEMS_PER_FOLDER:02d}/item_{index:0{width}d}"
        items.append(_make_item(seed, stream, index, key, CLASSES[int(label_index)], clips))
    return items


def _make_item(seed: int, stream: int, index: int, key: str, label: str,
               clips: float = 0.0) -> _Item:
    # One generator per concern, so that e.g. a dropped modality does not shift the others.
    meta_rng, image_rng, audio_rng, text_rng = (
        np.random.default_rng(child)
        for child in np.random.SeedSequence([seed, stream, index]).spawn(4)
    )
    time_of_day, animal = label.split("_")

    image_ext = ".jpg" if meta_rng.random() < 0.6 else ".png"
    audio_ext = ".wav" if meta_rng.random() < 0.75 else ".flac"
    rate = int(meta_rng.choice([16000, 22050]))
    missing = None
    if meta_rng.random() < _MISSING_FRACTION:
        missing = str(meta_rng.choice(["image", "text", "audio"]))

    files: dict[str, bytes] = {}
    if missing != "image":
        files[image_ext] = _encode_image(
            _render_scene(image_rng, time_of_day), image_ext, image_rng
        )
    if missing != "text":
        files[".txt"] = _caption(text_rng, time_of_day, animal).encode("utf-8")
    if missing != "audio":
        files[audio_ext] = _encode_audio(_animal_call(audio_rng, animal, rate), rate, audio_ext)
    # its own generator, so that clips=0 gives the same bytes as before clips existed
    clip_rng = np.random.default_rng([seed, stream, index, 7])
    if missing is None and clip_rng.random() < clips:
        files = _as_clip(files, image_ext, audio_ext, clip_rng,
                         np.random.default_rng(np.random.SeedSequence([seed, stream, index])
                                               .spawn(4)[2]), animal, rate)
    return _Item(key=key, label=label, files=files)


def _as_clip(files: dict[str, bytes], image_ext: str, audio_ext: str, rng: np.random.Generator,
             audio_rng: np.random.Generator, animal: str, rate: int) -> dict[str, bytes]:
    """The item with its picture and sound as one clip: the picture panning, with noise, faded
    in on some, and the same animal call as its sound track."""
    fmt = _CLIP_FORMATS[int(rng.integers(len(_CLIP_FORMATS)))]
    size = _CLIP_SIZES[int(rng.integers(len(_CLIP_SIZES)))]
    picture = Image.open(io.BytesIO(files.pop(image_ext)))
    files.pop(audio_ext)
    call = _animal_call(audio_rng, animal, rate)
    files[f".{fmt}"] = picture_clip(picture, seconds=_AUDIO_SECONDS, fps=8, size=size,
                                    fade_in=0.75 if rng.random() < 0.3 else 0.0,
                                    seed=int(rng.integers(2**31)), fmt=fmt, audio=call, rate=rate)
    return files


def _members(items: Sequence[_Item]) -> list[tuple[str, bytes]]:
    return [(item.key + ext, data) for item in items for ext, data in item.files.items()]


def _stratified_splits(labels: Sequence[str], seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 2])
    splits = ["train"] * len(labels)
    for name in CLASSES:
        members = [i for i, label in enumerate(labels) if label == name]
        n_val = min(len(members) - 1, max(1, round(_VAL_FRACTION * len(members))))
        for i in rng.permutation(members)[:n_val]:
            splits[int(i)] = "val"
    return splits


# --- images: the time of day -------------------------------------------------------------------


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _render_scene(rng: np.random.Generator, time_of_day: str) -> Image.Image:
    width, height = (int(v) for v in rng.integers(160, 321, size=2))
    horizon = int(height * rng.uniform(0.55, 0.8))
    day = time_of_day == "day"
    if day:
        top, bottom = _jitter(rng, (70, 130, 220), 20), _jitter(rng, (175, 210, 245), 15)
        ground = _jitter(rng, (90, 140, 60), 30)
    else:
        top, bottom = _jitter(rng, (6, 8, 28), 6), _jitter(rng, (28, 36, 72), 10)
        ground = _jitter(rng, (18, 28, 18), 8)

    # Sky: a vertical gradient down to the horizon, then flat ground.
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0.0, 1.0, horizon)[:, None]  # (horizon, 1)
    sky = (1 - ramp) * np.array(top) + ramp * np.array(bottom)  # (horizon, 3)
    pixels[:horizon] = sky[:, None, :].astype(np.uint8)
    pixels[horizon:] = ground
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)

    short = min(width, height)
    if not day:
        for _ in range(int(rng.integers(10, 60))):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, horizon))
            r = int(rng.integers(0, 2))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (235, 235, 210), 20))
    radius = int(short * rng.uniform(0.05, 0.12))
    cx = int(rng.integers(radius, width - radius))
    cy = int(rng.integers(radius, max(radius + 1, horizon - radius)))
    if day:
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=_jitter(rng, (255, 225, 110), 25),
        )
        for _ in range(int(rng.integers(0, 4))):  # clouds
            w, h = int(short * rng.uniform(0.15, 0.35)), int(short * rng.uniform(0.05, 0.12))
            x, y = int(rng.integers(0, width)), int(rng.integers(0, max(1, horizon - h)))
            draw.ellipse((x - w, y, x + w, y + h), fill=_jitter(rng, (245, 245, 250), 10))
    else:
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=_jitter(rng, (230, 230, 205), 15),
        )
        if rng.random() < 0.5:  # a crescent: cover part of the disc with sky
            shift = int(radius * rng.uniform(0.4, 0.9))
            shade = tuple(int(c) for c in sky[min(cy, horizon - 1)])
            draw.ellipse(
                (cx - radius + shift, cy - radius, cx + radius + shift, cy + radius), fill=shade
            )

    # Clutter: random shapes in random colours, dimmed at night like everything else.
    dim = 1.0 if day else 0.3
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(c * dim) for c in rng.integers(0, 256, size=3))
        size = int(short * rng.uniform(0.06, 0.2))
        x, y = int(rng.integers(0, width)), int(rng.integers(horizon - size, height))
        box = (x - size, y - size, x + size, y + size)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x, y - size), (x - size, y + size), (x + size, y + size)], fill=colour)
    return img


def _encode_image(img: Image.Image, ext: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if ext == ".jpg":
        img.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# --- audio: the animal -------------------------------------------------------------------------


def _animal_call(rng: np.random.Generator, animal: str, rate: int) -> np.ndarray:
    n = int(_AUDIO_SECONDS * rate)
    signal = np.zeros(n)  # (T,)
    if animal == "bird":
        # Fast chirps sweeping within 2-5 kHz, with a little vibrato.
        for _ in range(int(rng.integers(4, 11))):
            seconds = rng.uniform(0.04, 0.14)
            m = int(seconds * rate)
            start = int(rng.integers(0, n - m))
            t = np.arange(m) / rate
            f0, f1 = rng.uniform(2000, 5000, size=2)
            freq = f0 + (f1 - f0) * t / seconds
            freq += rng.uniform(0, 150) * np.sin(2 * np.pi * rng.uniform(20, 60) * t)
            phase = 2 * np.pi * np.cumsum(freq) / rate
            signal[start : start + m] += rng.uniform(0.4, 1.0) * np.hanning(m) * np.sin(phase)
    else:
        # Low croaks: a 150-300 Hz fundamental with harmonics up to 600 Hz, pulsed at 12-35 Hz.
        for _ in range(int(rng.integers(2, 6))):
            seconds = rng.uniform(0.15, 0.4)
            m = int(seconds * rate)
            start = int(rng.integers(0, n - m))
            t = np.arange(m) / rate
            f0 = rng.uniform(150, 300) * (1 - rng.uniform(0, 0.1) * t / seconds)
            phase = 2 * np.pi * np.cumsum(f0) / rate
            tone = sum(np.sin(h * phase) / h for h in range(1, 5) if h * f0[0] <= 600)
            pulse = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(12, 35) * t)) ** 2
            signal[start : start + m] += rng.uniform(0.4, 1.0) * np.hanning(m) * pulse * tone

    signal /= np.sqrt(np.mean(signal**2)) + 1e-12
    # Pink background noise (power falling as 1/f, like wind and distant traffic) at 6-20 dB SNR.
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / rate), 20.0))
    noise = np.fft.irfft(spectrum, n)
    noise /= np.sqrt(np.mean(noise**2))
    signal += noise * 10 ** (-rng.uniform(6, 20) / 20)
    if rng.random() < 0.2:  # mains hum, now and then
        signal += 0.1 * np.sin(2 * np.pi * rng.choice([50, 60]) * np.arange(n) / rate)
    signal *= rng.uniform(0.3, 0.9) / np.max(np.abs(signal))
    return signal.astype(np.float32)


def _encode_audio(samples: np.ndarray, rate: int, ext: str) -> bytes:
    buf = io.BytesIO()
    # PCM_16: float WAVs get a PEAK chunk with a timestamp, which would break determinism.
    soundfile.write(buf, samples, rate, format="WAV" if ext == ".wav" else "FLAC", subtype="PCM_16")
    return buf.getvalue()


# --- captions: weak hints ----------------------------------------------------------------------

_NEUTRAL = (
    "The {place} is {quiet}.",
    "{Plants} sway gently near the {water}.",
    "A narrow path runs past some {things}.",
    "The recording was made {where}.",
    "There is {an_object} in the foreground.",
    "A light wind can be heard in the background.",
    "Someone left {an_object} by the {water}.",
    "The picture shows a {quiet} {place} with a few shapes in it.",
    "Nothing much happens for a while.",
    "It is a {quiet} spot {where}.",
    "The camera was held low, close to the {things}.",
    "A few {things} are scattered across the ground.",
)
# Hints that fit every class: they mention an animal or the light, but not which.
_AMBIGUOUS_ANIMAL = (
    "An animal calls now and then.",
    "Some creature is making noise nearby.",
    "You can hear something moving in the {plants_lower}.",
)
_AMBIGUOUS_TIME = (
    "It was taken around dusk, or maybe a little later.",
    "The light was changing while we waited.",
)
_SLOTS: dict[str, tuple[str, ...]] = {
    "place": ("pond", "meadow", "marsh", "clearing", "riverbank", "garden", "field", "lake shore"),
    "quiet": ("quiet", "calm", "peaceful", "still", "empty", "remote", "sheltered"),
    "Plants": ("Reeds", "Tall grasses", "Ferns", "Bushes", "Cattails", "Wild flowers"),
    "plants_lower": ("reeds", "tall grass", "ferns", "bushes", "undergrowth"),
    "water": ("water", "pond", "stream", "shore", "puddle"),
    "things": ("rocks", "logs", "stones", "fallen branches", "tree stumps", "old fence posts"),
    "where": (
        "near the water",
        "at the edge of a field",
        "from a wooden bridge",
        "behind an old shed",
        "on a hiking trip",
        "in a park",
    ),
    "an_object": ("a bucket", "a red box", "a bicycle", "an old boot", "a flat stone", "a ball"),
}
_ANIMAL_HINTS: dict[str, tuple[str, ...]] = {
    "bird": (
        "A {bird} {sings} somewhere close by.",
        "Something with feathers keeps {singing_ing} in the branches.",
        "You can hear a {bird} {singing_ing} over and over.",
        "The {bird} in the tree {sings} brightly.",
    ),
    "frog": (
        "A {frog} {croaks} somewhere close by.",
        "Something slimy keeps {croaking_ing} among the reeds.",
        "You can hear a {frog} {croaking_ing} over and over.",
        "The {frog} at the water's edge {croaks} in a deep voice.",
    ),
}
_ANIMAL_SLOTS: dict[str, tuple[str, ...]] = {
    "bird": ("songbird", "finch", "sparrow", "warbler", "little bird", "robin", "wren"),
    "sings": ("chirps", "sings", "trills", "whistles", "tweets"),
    "singing_ing": ("chirping", "singing", "trilling", "whistling", "tweeting"),
    "frog": ("toad", "bullfrog", "tree frog", "green frog", "small amphibian", "spring peeper"),
    "croaks": ("croaks", "ribbits", "grunts", "gurgles", "calls"),
    "croaking_ing": ("croaking", "ribbiting", "grunting", "gurgling"),
}
_TIME_HINTS: dict[str, tuple[str, ...]] = {
    "day": (
        "The sun is high and bright.",
        "It was taken around {midday}.",
        "Everything is lit by {daylight}.",
        "The sky is clear and blue.",
    ),
    "night": (
        "The moon is out.",
        "It was taken {late}.",
        "Stars are scattered overhead.",
        "Everything is dark except the moonlight.",
    ),
}
_TIME_SLOTS: dict[str, tuple[str, ...]] = {
    "midday": ("noon", "midday", "the middle of the afternoon", "late morning"),
    "daylight": ("bright daylight", "warm sunshine", "the afternoon sun"),
    "late": ("late at night", "after midnight", "well after dark", "in the middle of the night"),
}


def _fill(rng: np.random.Generator, template: str, slots: dict[str, tuple[str, ...]]) -> str:
    return template.format_map({name: str(rng.choice(words)) for name, words in slots.items()})


def _caption(rng: np.random.Generator, time_of_day: str, animal: str) -> str:
    hints = []
    if rng.random() < 0.5:
        hints.append(_fill(rng, str(rng.choice(_ANIMAL_HINTS[animal])), _ANIMAL_SLOTS))
    elif rng.random() < 0.3:
        hints.append(_fill(rng, str(rng.choice(_AMBIGUOUS_ANIMAL)), _SLOTS))
    if rng.random() < 0.3:
        hints.append(_fill(rng, str(rng.choice(_TIME_HINTS[time_of_day])), _TIME_SLOTS))
    elif rng.random() < 0.3:
        hints.append(_fill(rng, str(rng.choice(_AMBIGUOUS_TIME)), _SLOTS))

    target = int(rng.integers(10, 31))
    sentences = list(hints)
    neutral = [str(s) for s in rng.permutation(_NEUTRAL)]
    while neutral and _words(sentences) < target:
        candidate = _fill(rng, neutral.pop(), _SLOTS)
        if _words(sentences) + len(candidate.split()) <= 30:
            sentences.append(candidate)
    sentences = [sentences[int(i)] for i in rng.permutation(len(sentences))]
    return " ".join(sentences) + "\n"


def _words(sentences: Sequence[str]) -> int:
    return sum(len(s.split()) for s in sentences)


# --- files -------------------------------------------------------------------------------------


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _write_archive(path: Path, members: list[tuple[str, bytes]], fmt: str) -> None:
    partial = path.with_name(path.name + ".partial")
    members = sorted(members)
    with open(partial, "wb") as raw:
        if fmt == "zip":
            _write_zip(raw, members)
        elif fmt == "tar":
            _write_tar(raw, members)
        else:
            # GzipFile, not tarfile's "w:gz": that one stores the file name and the current time.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                _write_tar(gz, members)
    os.replace(partial, path)


def _write_tar(
    fileobj: io.BufferedIOBase | gzip.GzipFile, members: list[tuple[str, bytes]]
) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def _write_zip(fileobj: io.BufferedIOBase, members: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(fileobj, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.create_system = 3  # Unix, whatever the platform, so external_attr means the same
            info.external_attr = 0o644 << 16
            stored = name.endswith(_PRECOMPRESSED)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=None if stored else 6)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samples.sample",
        description="Write the labelled and unlabelled sample archives and the truth CSV.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--train", type=int, default=240, help="labelled items (default 240)")
    parser.add_argument("--unlabelled", type=int, default=80, help="unlabelled items (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--format", choices=FORMATS, default="tar.gz", help="archive format")
    parser.add_argument("--clips", type=float, default=0.0,
                        help="share of the items given as one video clip (default 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_sample(args.out_dir, args.train, args.unlabelled, args.seed, args.format,
                             clips=args.clips)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"train:      {paths.train}")
    print(f"unlabelled: {paths.unlabelled}")
    print(f"truth:      {paths.truth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
