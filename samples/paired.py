"""Deterministic paired sample data for search: pictures and sounds with captions that describe
them in varied, noisy wording.

Each item is a small scene: one or two objects of a kind (a boat, a house, a kite…) and a colour,
on a background (the sea, a meadow, snow…), sometimes with a second, smaller object, and in most
items a sound (birdsong, rain, an engine…). Its caption describes the scene the way people
write captions: synonyms and word orders vary, some attributes are left out, about one caption
in ten gets one of them wrong, filler sentences come and go, a few letters are mistyped; the
sound is mentioned in most captions of items that have one. So a caption pins down its picture
only in part, and retrieval recall is informative, far from 1.

Two archives: ``paired_train`` (for an ``align`` job; ``labels.csv`` gives each item's object
kind as its label and the photo roll it came from as its group, so validation keeps rolls apart)
and ``paired_gallery`` (held out, other rolls: ``mmbatch evaluate ALIGNER paired_gallery…`` asks
each caption to find its picture among the gallery's). About one item in four has no sound;
every item has a picture and a caption. The same seed gives byte-identical archives.

Run ``python -m samples.paired OUT_DIR`` to write them. Fixed before any alignment method was
tuned on it, and not to be changed to suit one.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from samples.sample import _csv_bytes, _write_archive

__all__ = ["KINDS", "PairedArchives", "write_paired"]

KINDS: tuple[str, ...] = ("boat", "house", "tree", "car", "kite", "balloon", "umbrella", "flag")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35), "blue": (35, 70, 200), "green": (40, 160, 60),
    "yellow": (240, 210, 40), "orange": (240, 130, 20), "purple": (130, 50, 160),
    "white": (240, 240, 240), "black": (25, 25, 25)}
BACKGROUNDS: tuple[str, ...] = ("sea", "meadow", "snow", "desert", "night", "sunset")
SOUNDS: tuple[str, ...] = ("birds", "rain", "engine", "bell", "dog", "waves")

_SIZE = 192
_ROLL_ITEMS = 24  # items per photo roll (the group)
_AUDIO_SECONDS = 1.5
_RATE = 16000
_NO_SOUND = 0.25
_WRONG = 0.1  # captions with one attribute wrong
_TYPO = 0.04  # chance per word of a swapped pair of letters

_WORDS: dict[str, tuple[str, ...]] = {
    "boat": ("boat", "sailboat", "little boat", "dinghy", "sailing boat", "vessel"),
    "house": ("house", "cottage", "little house", "cabin", "home", "hut"),
    "tree": ("tree", "oak", "leafy tree", "round tree", "bush-like tree"),
    "car": ("car", "automobile", "small car", "hatchback", "vehicle"),
    "kite": ("kite", "diamond kite", "flying kite", "paper kite"),
    "balloon": ("balloon", "party balloon", "air balloon", "round balloon"),
    "umbrella": ("umbrella", "parasol", "brolly", "open umbrella"),
    "flag": ("flag", "banner", "pennant", "flag on a pole"),
    "red": ("red", "crimson", "scarlet", "bright red", "reddish"),
    "blue": ("blue", "navy", "deep blue", "cobalt", "bluish"),
    "green": ("green", "emerald", "grass-green", "greenish"),
    "yellow": ("yellow", "golden", "lemon", "mustard-coloured"),
    "orange": ("orange", "tangerine", "amber", "orangey"),
    "purple": ("purple", "violet", "lilac", "plum"),
    "white": ("white", "snow-white", "pale", "ivory"),
    "black": ("black", "dark", "jet-black", "charcoal"),
    "sea": ("on the sea", "by the ocean", "on the water", "at the coast", "on a calm bay"),
    "meadow": ("in a meadow", "on the grass", "in a green field", "on a lawn"),
    "snow": ("in the snow", "on a snowy field", "in winter snow", "on white snow"),
    "desert": ("in the desert", "on sand dunes", "on dry sand", "in a sandy place"),
    "night": ("at night", "under the night sky", "after dark", "under the stars"),
    "sunset": ("at sunset", "in the evening glow", "at dusk", "against an orange sky"),
    "birds": ("birds singing", "birdsong", "chirping birds", "a bird tweeting"),
    "rain": ("rain falling", "the patter of rain", "a rain shower", "rain pouring down"),
    "engine": ("an engine humming", "a motor running", "engine noise", "a droning motor"),
    "bell": ("a bell ringing", "church bells", "a ringing chime", "bells tolling"),
    "dog": ("a dog barking", "barking", "a dog yapping", "woofs from a dog"),
    "waves": ("waves crashing", "the surf", "waves on the shore", "the sound of waves"),
}
_TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {kind} {place}.",
    "A photo of {a} {colour} {kind} {place}.",
    "{A} {kind}, {colour}, {place}.",
    "{place_cap} there is {a} {colour} {kind}.",
    "Picture showing {a} {kind} {place}; it is {colour}.",
    "{colour_cap} {kind} {place}",
    "Snapshot: {colour} {kind} {place}.",
    "I took this of {a} {colour} {kind} {place}.",
)
_SOUND_TEMPLATES: tuple[str, ...] = (
    "You can hear {sound}.", "In the background: {sound}.", "With {sound}.",
    "Audio has {sound} in it.", "{sound_cap} can be heard.", "Sound of {sound}.")
_FILLERS: tuple[str, ...] = (
    "Taken on holiday.", "Not the best shot.", "From my phone.", "A bit blurry.",
    "Shared with the family.", "Found this in an old folder.", "Nice light that day.",
    "One of many.", "No edits.", "Weekend trip.")
_COUNTS = {2: ("two", "a pair of", "2")}


@dataclass(frozen=True)
class PairedArchives:
    """Paths written by :func:`write_paired`."""

    train: Path  # labels.csv: key,label (object kind),group (photo roll)
    gallery: Path  # held-out rolls, same layout
    captions: Path  # CSV key,caption of every item of both archives (what was written)


@dataclass(frozen=True)
class _Scene:
    kind: str
    colour: str
    count: int
    background: str
    extra: str | None  # a second, smaller object kind
    sound: str | None


def write_paired(out_dir: Path, n_train: int = 480, n_gallery: int = 160, seed: int = 0,
                 fmt: str = "tar.gz") -> PairedArchives:
    """Write ``paired_train.<fmt>`` and ``paired_gallery.<fmt>`` (and the captions CSV)."""
    if n_train < 8 or n_gallery < 1:
        raise ValueError("n_train must be at least 8 and n_gallery at least 1")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rolls = (n_train + _ROLL_ITEMS - 1) // _ROLL_ITEMS
    paths = PairedArchives(out_dir / f"paired_train.{fmt}", out_dir / f"paired_gallery.{fmt}",
                           out_dir / "paired_captions.csv")
    captions: list[list[str]] = []
    for path, first, count, roll0 in ((paths.train, 0, n_train, 0),
                                      (paths.gallery, n_train, n_gallery, train_rolls)):
        members: list[tuple[str, bytes]] = []
        rows = []
        for index in range(first, first + count):
            roll = roll0 + (index - first) // _ROLL_ITEMS
            key = f"roll_{roll:03d}/shot_{index:05d}"
            scene, files, caption = _make_item(seed, index)
            members += [(key + ext, data) for ext, data in files.items()]
            rows.append([key, scene.kind, f"roll_{roll:03d}"])
            captions.append([key, caption])
        members.append(("labels.csv", _csv_bytes(["key", "label", "group"], rows)))
        _write_archive(path, members, fmt)
    paths.captions.write_bytes(_csv_bytes(["key", "caption"], captions))
    return paths


def _make_item(seed: int, index: int) -> tuple[_Scene, dict[str, bytes], str]:
    scene_rng, image_rng, audio_rng, text_rng = (
        np.random.default_rng(child)
        for child in np.random.SeedSequence([seed, 77, index]).spawn(4))
    kind = str(scene_rng.choice(KINDS))
    scene = _Scene(
        kind=kind, colour=str(scene_rng.choice(list(COLOURS))),
        count=2 if scene_rng.random() < 0.25 else 1,
        background=str(scene_rng.choice(BACKGROUNDS)),
        extra=str(scene_rng.choice([k for k in KINDS if k != kind]))
        if scene_rng.random() < 0.3 else None,
        sound=None if scene_rng.random() < _NO_SOUND else str(scene_rng.choice(SOUNDS)))
    files = {".jpg": _jpeg(_render(image_rng, scene), image_rng)}
    caption = _caption(text_rng, scene)
    files[".txt"] = caption.encode("utf-8")
    if scene.sound is not None:
        files[".wav"] = _wav(_sound(audio_rng, scene.sound))
    return scene, files, caption


# --- pictures ------------------------------------------------------------------------------------

_SKIES = {"sea": ((90, 150, 230), (170, 210, 245)), "meadow": ((80, 140, 225), (185, 215, 240)),
          "snow": ((170, 185, 205), (225, 230, 240)), "desert": ((120, 170, 230), (235, 215, 170)),
          "night": ((5, 8, 30), (25, 35, 70)), "sunset": ((70, 40, 110), (250, 140, 60))}
_GROUNDS = {"sea": (30, 80, 150), "meadow": (70, 150, 60), "snow": (235, 238, 245),
            "desert": (215, 185, 120), "night": (20, 30, 25), "sunset": (90, 60, 50)}


def _tone(rng: np.random.Generator, rgb: Sequence[int], amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _render(rng: np.random.Generator, scene: _Scene) -> Image.Image:
    size = _SIZE
    horizon = int(size * rng.uniform(0.45, 0.65))
    top, bottom = (np.array(_tone(rng, c, 12)) for c in _SKIES[scene.background])
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0.0, 1.0, horizon)[:, None]
    pixels[:horizon] = ((1 - ramp) * top + ramp * bottom)[:, None, :].astype(np.uint8)
    pixels[horizon:] = _tone(rng, _GROUNDS[scene.background], 15)
    noise = rng.normal(0, 6, pixels.shape)
    img = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if scene.background == "night":
        for _ in range(int(rng.integers(15, 50))):
            x, y = int(rng.integers(0, size)), int(rng.integers(0, horizon))
            draw.point((x, y), fill=(230, 230, 210))
    if scene.extra is not None:
        _draw(draw, rng, scene.extra, _tone(rng, COLOURS[str(rng.choice(list(COLOURS)))], 30),
              int(rng.integers(20, size - 20)), horizon + int(rng.integers(-10, 20)),
              int(size * rng.uniform(0.07, 0.11)))
    scale = size * rng.uniform(0.16, 0.27)
    for i in range(scene.count):
        cx = int(size * (rng.uniform(0.25, 0.75) if scene.count == 1 else
                         (0.28 if i == 0 else 0.72) + rng.uniform(-0.06, 0.06)))
        cy = horizon + int(rng.integers(-int(scale * 0.6), int(scale * 0.4)))
        _draw(draw, rng, scene.kind, _tone(rng, COLOURS[scene.colour]), cx, cy,
              int(scale * (0.8 if scene.count == 2 else 1.0)))
    return img


def _draw(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str,
          colour: tuple[int, ...], x: int, y: int, s: int) -> None:
    """One object of ``kind`` standing at (x, y), about ``s`` pixels tall."""
    dark = tuple(max(0, c - 90) for c in colour)
    if kind == "boat":
        draw.polygon([(x - s, y - s // 4), (x + s, y - s // 4), (x + s * 2 // 3, y + s // 5),
                      (x - s * 2 // 3, y + s // 5)], fill=colour)
        draw.line([(x, y - s // 4), (x, y - s * 3 // 2)], fill=(60, 40, 20), width=2)
        draw.polygon([(x + 2, y - s * 3 // 2), (x + 2, y - s // 3), (x + s * 3 // 4, y - s // 3)],
                     fill=(245, 245, 240))
    elif kind == "house":
        draw.rectangle((x - s // 2, y - s, x + s // 2, y), fill=colour)
        draw.polygon([(x - s * 2 // 3, y - s), (x + s * 2 // 3, y - s), (x, y - s * 5 // 3)],
                     fill=dark)
        draw.rectangle((x - s // 8, y - s // 3, x + s // 8, y), fill=(70, 45, 25))
    elif kind == "tree":
        draw.rectangle((x - s // 10, y - s // 2, x + s // 10, y), fill=(100, 65, 30))
        draw.ellipse((x - s // 2, y - s * 3 // 2, x + s // 2, y - s // 3), fill=colour)
    elif kind == "car":
        draw.rectangle((x - s, y - s // 2, x + s, y - s // 8), fill=colour)
        draw.rectangle((x - s // 2, y - s * 5 // 6, x + s // 2, y - s // 2), fill=colour)
        for wx in (x - s * 3 // 5, x + s * 3 // 5):
            draw.ellipse((wx - s // 5, y - s // 4, wx + s // 5, y + s // 6), fill=(20, 20, 20))
    elif kind == "kite":
        top = y - s * 2
        draw.polygon([(x, top - s // 2), (x + s // 3, top), (x, top + s // 2), (x - s // 3, top)],
                     fill=colour)
        draw.line([(x, top + s // 2), (x - s // 4, y), (x + s // 5, y + s // 4)],
                  fill=(60, 60, 60), width=1)
    elif kind == "balloon":
        top = y - s * 2
        draw.ellipse((x - s // 3, top - s // 2, x + s // 3, top + s // 3), fill=colour)
        draw.line([(x, top + s // 3), (x + int(rng.integers(-4, 5)), y)], fill=(80, 80, 80))
    elif kind == "umbrella":
        draw.pieslice((x - s * 2 // 3, y - s * 3 // 2, x + s * 2 // 3, y - s // 6), 180, 360,
                      fill=colour)
        draw.line([(x, y - s * 5 // 6), (x, y)], fill=(40, 40, 40), width=2)
    else:  # flag
        draw.line([(x - s // 3, y), (x - s // 3, y - s * 3 // 2)], fill=(90, 90, 90), width=2)
        draw.rectangle((x - s // 3, y - s * 3 // 2, x + s // 2, y - s), fill=colour)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(80, 95)))
    return buf.getvalue()


# --- sounds --------------------------------------------------------------------------------------

def _sound(rng: np.random.Generator, sound: str) -> np.ndarray:
    n = int(_AUDIO_SECONDS * _RATE)
    t = np.arange(n) / _RATE
    out = np.zeros(n)
    if sound == "birds":
        for _ in range(int(rng.integers(3, 9))):
            m = int(rng.uniform(0.04, 0.12) * _RATE)
            start = int(rng.integers(0, n - m))
            f = np.linspace(*rng.uniform(2500, 5000, size=2), m)
            out[start:start + m] += np.hanning(m) * np.sin(2 * np.pi * np.cumsum(f) / _RATE)
    elif sound == "rain":
        out = rng.standard_normal(n) * (0.4 + 0.2 * rng.random(n))
        for _ in range(int(rng.integers(20, 60))):  # drops
            start = int(rng.integers(0, n - 200))
            out[start:start + 200] += rng.standard_normal(200) * np.exp(-np.arange(200) / 30)
    elif sound == "engine":
        f0 = rng.uniform(40, 90)
        phase = 2 * np.pi * f0 * t * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
        out = sum(np.sin(h * phase) / h for h in range(1, 8)) + 0.1 * rng.standard_normal(n)
    elif sound == "bell":
        for start_s in np.arange(0, _AUDIO_SECONDS, rng.uniform(0.5, 0.8)):
            start = int(start_s * _RATE)
            tt = t[: n - start]
            f0 = rng.uniform(400, 900)
            tone = sum(np.sin(2 * np.pi * f0 * r * tt) / (i + 1)
                       for i, r in enumerate((1.0, 2.0, 2.4, 3.0)))
            out[start:] += tone * np.exp(-tt * 3)
    elif sound == "dog":
        for _ in range(int(rng.integers(2, 5))):
            m = int(rng.uniform(0.1, 0.2) * _RATE)
            start = int(rng.integers(0, n - m))
            f0 = rng.uniform(350, 700)
            tt = np.arange(m) / _RATE
            bark = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in range(1, 6))
            out[start:start + m] += np.hanning(m) * (bark + 0.5 * rng.standard_normal(m))
    else:  # waves
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 0.7) * t) ** 2
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum /= np.maximum(np.fft.rfftfreq(n, 1 / _RATE), 30.0) ** 0.7
        out = np.fft.irfft(spectrum, n) * envelope
    out /= np.sqrt(np.mean(out**2)) + 1e-12
    out += rng.standard_normal(n) * 10 ** (-rng.uniform(8, 20) / 20)  # background noise
    out *= rng.uniform(0.3, 0.9) / np.max(np.abs(out))
    return out.astype(np.float32)


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, _RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --- captions ------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return str(words[int(rng.integers(len(words)))])


def _caption(rng: np.random.Generator, scene: _Scene) -> str:
    colour, kind, background = scene.colour, scene.kind, scene.background
    if rng.random() < _WRONG:  # one attribute described wrongly, as people do
        which = int(rng.integers(3))
        if which == 0:
            colour = _pick(rng, [c for c in COLOURS if c != colour])
        elif which == 1:
            kind = _pick(rng, [k for k in KINDS if k != kind])
        else:
            background = _pick(rng, [b for b in BACKGROUNDS if b != background])
    words = {"colour": _pick(rng, _WORDS[colour]) if rng.random() < 0.85 else "",
             "kind": _pick(rng, _WORDS[kind]),
             "place": _pick(rng, _WORDS[background]) if rng.random() < 0.75 else ""}
    if scene.count == 2:
        words["a"] = _pick(rng, _COUNTS[2])
        words["kind"] += "s" if not words["kind"].endswith("s") else ""
    else:
        following = words["colour"] or words["kind"]
        words["a"] = "an" if following[:1] in tuple("aeiou") else "a"
    text = _pick(rng, _TEMPLATES).format(
        A=words["a"].capitalize(), colour_cap=words["colour"].capitalize(),
        place_cap=words["place"].capitalize(), **words)
    text = " ".join(text.split()).replace(" ,", ",").replace(" .", ".").replace(" ;", ";")
    sentences = [text.replace(",.", ".").replace(", .", ".").replace(";.", ".")]
    if scene.extra is not None and rng.random() < 0.4:
        sentences.append(f"Also a {_pick(rng, _WORDS[scene.extra])} in the back.")
    if scene.sound is not None and rng.random() < 0.75:
        sound = _pick(rng, _WORDS[scene.sound])
        sentences.append(_pick(rng, _SOUND_TEMPLATES).format(sound=sound,
                                                              sound_cap=sound.capitalize()))
    for _ in range(int(rng.integers(0, 3))):
        sentences.append(_pick(rng, _FILLERS))
    head, tail = sentences[0], sentences[1:]
    tail = [tail[int(i)] for i in rng.permutation(len(tail))]
    caption = " ".join([head, *tail]) if rng.random() < 0.8 else " ".join([*tail, head])
    caption = " ".join(_typo(rng, w) for w in caption.split())
    return (caption.lower() if rng.random() < 0.2 else caption) + "\n"


def _typo(rng: np.random.Generator, word: str) -> str:
    if len(word) < 4 or rng.random() >= _TYPO:
        return word
    i = int(rng.integers(1, len(word) - 2))
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samples.paired",
        description="Write the paired sample (pictures, sounds, captions) for search.")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--train", type=int, default=480, help="items to align on (default 480)")
    parser.add_argument("--gallery", type=int, default=160,
                        help="held-out items to evaluate on (default 160)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_paired(args.out_dir, args.train, args.gallery, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"train:    {paths.train}\ngallery:  {paths.gallery}\ncaptions: {paths.captions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
