"""A deterministic *shifted* labelled acceptance set: a train archive and a test archive whose
sources share nothing, to measure how well a classifier trained on some sources does on sources
it never saw.

Ten classes, the digits ``zero`` ... ``nine``. Every item shows its class in three modalities,
each on its own (any one of them is enough in principle; what makes it hard is the shift):

- the image (``.png``) is a small grayscale handwritten-like digit: a skeleton of strokes in a
  unit box drawn in a writer's style (slant, stroke width, aspect, jittered control points, a
  small rotation and offset) by one of two renderers, in the spirit of MNIST and USPS: ``A`` is
  28 x 28, light on dark, the digit fitted in a 20 x 20 box in the middle; ``B`` is 16 x 16,
  dark on light, the digit stretched to fill the frame, blurred, with sensor noise. Strokes are
  drawn at 4x and reduced, so they are anti-aliased. (Each renderer keeps one polarity: a test
  source in the other one would turn any linear pixel model's ranking of the classes upside
  down, which is adversarial rather than shifted.)
- the audio (``.wav``, 16 kHz mono PCM_16, 0.4-1.0 s) is a synthetic spoken digit: a fixed
  sequence of 2-4 phones per digit (vowels as formant targets, fricatives as band noise, stops
  as a closure and a burst) from a source-filter synthesiser: a glottal pulse train at the
  speaker's pitch, with jitter and a falling contour, through a cascade of 2-pole formant
  resonators whose targets glide from phone to phone. Each speaker has a pitch, a vocal tract
  length (formants x 0.8-1.25), a speaking rate, breathiness, loudness and an accent (their
  own formant targets and durations for each phone); each item adds timing and formant jitter,
  silence around the word, background noise at 10-30 dB SNR and a random gain. Some digits
  share phones (*five* and *nine* end alike, *six* and *seven* start alike);
- the text (``.txt``) is the digit's number word in the source's language (never the digit
  character), in about a third of the texts inside a short phrase of that language
  (``numéro cinq``, ``ja, drei``, ``tres, por favor``), in random case, with a one-letter typo
  (swap, drop, doubling) in about one text in seven. The languages share cognates (``sieben``,
  ``seven``, ``zeven``), so a character model trained on some of them transfers part of the way
  to others; Finnish and Hungarian share almost nothing with the rest.

A *source* is one writer style with one renderer, one speaker and one language; all its items
share them, and ``group`` in ``labels.csv`` is its name (``de-ben-a``). The train and the test
sources are disjoint in every factor: the test sources speak other languages (Dutch,
Lithuanian, Finnish, Hungarian; train has twelve others), in other voices (a child, a deep slow
voice, a breathy one, a fast one, all with stronger accents), and write in other styles
(backhand, strongly slanted, thin and narrow, thick and wide), one of them drawn at a scale no
train source has (``A-small``: the digit in a 14 x 14 box). About 8% of the items lack one
modality (never more than one). Classes are balanced within each source.

Run ``python -m samples.shifted OUT_DIR [--train N] [--test N] [--seed S]`` to write
``shifted_train.tar`` (3,200 items from 12 sources by default) and ``shifted_test.tar`` (1,200
items from 4 sources), both with ``labels.csv`` (``key,label,group``) after the media. The same
seed gives the same bytes; smaller sets (``--train 600 --test 240``) keep the same sources.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw, ImageFilter
from scipy import fft, signal

__all__ = ["CLASSES", "LANGUAGES", "TEST_SOURCES", "TRAIN_SOURCES", "Renderer", "Source",
           "Speaker", "Writer", "shifted_items", "write_shifted"]

CLASSES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                            "eight", "nine")

_TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z: the same seed gives the same bytes
_MISSING_FRACTION = 0.08
_TYPO_FRACTION = 0.15
_PHRASE_FRACTION = 0.35


# --- sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Writer:
    """A handwriting style; per item, slant and aspect are drawn around these values."""

    slant: float  # mean shear: x moves right by slant x height above the middle
    width: tuple[float, float]  # stroke width range, as a share of the digit's height
    aspect: tuple[float, float]  # width scale range
    jitter: float  # spread of the control points, in units of the digit's height
    rotation: float  # spread of the rotation, degrees


@dataclass(frozen=True)
class Renderer:
    """How a scanner or a data set turns a drawn digit into pixels."""

    name: str
    size: int  # the frame is size x size pixels
    box: int  # the digit's height (A: fitted in box x box; B: stretched to fill size x size)
    fill: bool  # stretch the digit to fill the frame (USPS-like) instead of fitting it
    dark_on_light: bool
    blur: float  # Gaussian radius in output pixels (0: none)
    noise: float  # sensor noise, grey levels


@dataclass(frozen=True)
class Speaker:
    """A voice: the same digit sounds different in each."""

    name: str
    f0: float  # mean pitch, Hz
    tract: float  # formant scale: short tracts (children) have high formants
    rate: float  # speaking rate: 1.3 is fast
    breath: float  # share of aspiration noise in the voice
    level_db: float  # loudness, dB re full scale
    accent: float  # how far the speaker's phones sit from the textbook ones (log spread)


@dataclass(frozen=True)
class Source:
    """One group: a writer with a renderer, a speaker and a language."""

    name: str
    language: str
    speaker: Speaker
    writer: Writer
    renderer: Renderer


_A = Renderer("A", 28, 20, False, False, 0.0, 3.0)
_A_SMALL = Renderer("A-small", 28, 14, False, False, 0.0, 3.0)  # test only: a scale never seen
_B = Renderer("B", 16, 16, True, True, 0.6, 12.0)

# number words 0-9; (phrase with a noun, the word for yes, the word for please)
LANGUAGES: dict[str, tuple[tuple[str, ...], tuple[str, str, str]]] = {
    "en": (("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
           ("number {}", "yes", "please")),
    "de": (("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
           ("Nummer {}", "ja", "bitte")),
    "nl": (("nul", "een", "twee", "drie", "vier", "vijf", "zes", "zeven", "acht", "negen"),
           ("nummer {}", "ja", "alstublieft")),
    "sv": (("noll", "ett", "två", "tre", "fyra", "fem", "sex", "sju", "åtta", "nio"),
           ("nummer {}", "ja", "tack")),
    "da": (("nul", "en", "to", "tre", "fire", "fem", "seks", "syv", "otte", "ni"),
           ("nummer {}", "ja", "tak")),
    "fr": (("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
           ("numéro {}", "oui", "s'il vous plaît")),
    "es": (("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
           ("número {}", "sí", "por favor")),
    "it": (("zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove"),
           ("numero {}", "sì", "per favore")),
    "pt": (("zero", "um", "dois", "três", "quatro", "cinco", "seis", "sete", "oito", "nove"),
           ("número {}", "sim", "por favor")),
    "ro": (("zero", "unu", "doi", "trei", "patru", "cinci", "șase", "șapte", "opt", "nouă"),
           ("numărul {}", "da", "vă rog")),
    "pl": (("zero", "jeden", "dwa", "trzy", "cztery", "pięć", "sześć", "siedem", "osiem",
            "dziewięć"), ("numer {}", "tak", "proszę")),
    "cs": (("nula", "jedna", "dva", "tři", "čtyři", "pět", "šest", "sedm", "osm", "devět"),
           ("číslo {}", "ano", "prosím")),
    "lv": (("nulle", "viens", "divi", "trīs", "četri", "pieci", "seši", "septiņi", "astoņi",
            "deviņi"), ("numurs {}", "jā", "lūdzu")),
    "lt": (("nulis", "vienas", "du", "trys", "keturi", "penki", "šeši", "septyni", "aštuoni",
            "devyni"), ("numeris {}", "taip", "prašau")),
    "fi": (("nolla", "yksi", "kaksi", "kolme", "neljä", "viisi", "kuusi", "seitsemän",
            "kahdeksan", "yhdeksän"), ("numero {}", "kyllä", "kiitos")),
    "hu": (("nulla", "egy", "kettő", "három", "négy", "öt", "hat", "hét", "nyolc", "kilenc"),
           ("szám: {}", "igen", "kérem")),
}

# Train styles: slant -0.1..0.25, stroke 9-13% of the height, aspect 0.8-1.1.
_TRAIN_WRITERS = (
    Writer(0.00, (0.09, 0.12), (0.85, 1.05), 0.035, 4.0),
    Writer(0.15, (0.10, 0.13), (0.80, 1.00), 0.030, 3.0),
    Writer(0.25, (0.09, 0.11), (0.85, 1.10), 0.040, 4.0),
    Writer(-0.10, (0.10, 0.13), (0.90, 1.10), 0.035, 3.0),
    Writer(0.08, (0.09, 0.12), (0.80, 1.00), 0.045, 5.0),
    Writer(0.20, (0.11, 0.13), (0.85, 1.05), 0.030, 3.0),
)
# Test styles: backhand, strongly slanted, thin and narrow, thick and wide.
_TEST_WRITERS = (
    Writer(-0.30, (0.11, 0.14), (0.85, 1.05), 0.040, 4.0),  # backhand
    Writer(0.50, (0.08, 0.10), (0.90, 1.10), 0.040, 4.0),  # strongly slanted
    Writer(0.45, (0.06, 0.08), (0.55, 0.70), 0.045, 5.0),  # slanted, thin and narrow
    Writer(-0.30, (0.18, 0.22), (1.15, 1.35), 0.040, 4.0),  # backhand, thick and wide
)

# Train voices: pitch 95-230 Hz, tract 0.88-1.15, rate 0.85-1.2.
_TRAIN_SPEAKERS = (
    Speaker("anna", 210, 1.12, 1.00, 0.20, -20, 0.10),
    Speaker("ben", 110, 0.92, 1.10, 0.10, -22, 0.10),
    Speaker("carla", 190, 1.08, 0.90, 0.30, -18, 0.10),
    Speaker("dmitri", 95, 0.88, 1.00, 0.05, -24, 0.10),
    Speaker("eva", 230, 1.15, 1.15, 0.25, -21, 0.10),
    Speaker("farid", 125, 0.95, 0.85, 0.15, -19, 0.10),
    Speaker("greta", 175, 1.05, 1.05, 0.35, -23, 0.10),
    Speaker("hugo", 140, 1.00, 0.95, 0.10, -20, 0.10),
    Speaker("ines", 200, 1.10, 1.20, 0.20, -22, 0.10),
    Speaker("jonas", 100, 0.90, 0.90, 0.15, -18, 0.10),
    Speaker("karin", 165, 1.02, 1.00, 0.40, -25, 0.10),
    Speaker("luca", 120, 0.97, 1.10, 0.10, -21, 0.10),
)
# Test voices, each outside the train voices in at least one respect.
_TEST_SPEAKERS = (
    Speaker("mila", 255, 1.25, 1.30, 0.30, -21, 0.30),  # a child: high pitch, short tract, fast
    Speaker("nils", 82, 0.80, 0.75, 0.10, -19, 0.30),  # deep, long tract, slow
    Speaker("olga", 185, 1.18, 0.80, 0.50, -23, 0.30),  # breathy and slow
    Speaker("pavel", 150, 0.84, 1.25, 0.05, -20, 0.30),  # long tract, fast
)

_TRAIN_PLAN = (  # language, speaker, writer, renderer: every writer once with A, once with B
    ("en", 0, 0, _A), ("de", 1, 1, _A), ("sv", 2, 2, _A), ("da", 3, 3, _A),
    ("fr", 4, 4, _A), ("es", 5, 5, _A), ("it", 6, 0, _B), ("pt", 7, 1, _B),
    ("ro", 8, 2, _B), ("pl", 9, 3, _B), ("cs", 10, 4, _B), ("lv", 11, 5, _B),
)
_TEST_PLAN = (
    ("nl", 0, 0, _A_SMALL), ("lt", 1, 1, _B), ("fi", 2, 2, _A), ("hu", 3, 3, _B),
)


def _sources(plan: Sequence[tuple[str, int, int, Renderer]], speakers: Sequence[Speaker],
             writers: Sequence[Writer]) -> tuple[Source, ...]:
    """The plan's sources, named ``language-speaker-renderer`` (their ``group``)."""
    return tuple(Source(f"{lang}-{speakers[s].name}-{renderer.name.lower()}", lang,
                        speakers[s], writers[w], renderer)
                 for lang, s, w, renderer in plan)


TRAIN_SOURCES: tuple[Source, ...] = _sources(_TRAIN_PLAN, _TRAIN_SPEAKERS, _TRAIN_WRITERS)
TEST_SOURCES: tuple[Source, ...] = _sources(_TEST_PLAN, _TEST_SPEAKERS, _TEST_WRITERS)


# --- images: a handwritten digit ---------------------------------------------------------------


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float) -> np.ndarray:
    """Points on an elliptic arc from angle a0 to a1 (degrees; y points down, so 90 is the
    bottom and -90 the top)."""
    angles = np.radians(np.linspace(a0, a1, max(3, int(abs(a1 - a0) / 12) + 1)))
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    """Straight strokes through ``points``."""
    return np.array(points, dtype=np.float64)


# Each digit as polylines in a unit box (x right, y down), drawn as one person would write it.
_SKELETONS: tuple[tuple[np.ndarray, ...], ...] = (
    (_arc(0.5, 0.5, 0.30, 0.46, -90, 270),),
    (_poly((0.30, 0.22), (0.52, 0.04), (0.52, 0.96)),),
    (np.concatenate([_arc(0.5, 0.30, 0.30, 0.25, 195, 380), _poly((0.15, 0.95), (0.88, 0.95))]),),
    (np.concatenate([_arc(0.48, 0.27, 0.28, 0.22, 200, 450),
                     _arc(0.48, 0.72, 0.32, 0.24, 270, 520)]),),
    (_poly((0.64, 0.96), (0.64, 0.04), (0.10, 0.68), (0.90, 0.68)),),
    (np.concatenate([_poly((0.82, 0.05), (0.30, 0.05), (0.26, 0.46)),
                     _arc(0.5, 0.68, 0.32, 0.27, 225, 520)]),),
    (np.concatenate([_arc(0.80, 0.70, 0.58, 0.66, 255, 180),
                     _arc(0.50, 0.72, 0.28, 0.24, 180, -180)]),),
    (_poly((0.12, 0.05), (0.88, 0.05), (0.40, 0.96)),),
    (_arc(0.5, 0.27, 0.24, 0.22, 0, 360), _arc(0.5, 0.72, 0.30, 0.24, 0, 360)),
    (np.concatenate([_arc(0.48, 0.30, 0.28, 0.25, 0, -360), _poly((0.76, 0.30), (0.70, 0.96))]),),
)
_DRAW_SCALE = 4  # strokes drawn at 4x, then reduced: anti-aliased


def _styled_strokes(rng: np.random.Generator, digit: int, writer: Writer) -> list[np.ndarray]:
    """The digit's skeleton as this writer would draw it once: each stroke shifted a little, a
    smooth random warp, the writer's aspect and slant (varying per item), a small rotation."""
    phases = rng.uniform(0.0, 2 * np.pi, 2)
    warp = rng.normal(0.0, writer.jitter, 2)
    aspect = rng.uniform(*writer.aspect)
    slant = writer.slant + rng.normal(0.0, 0.05)
    angle = np.radians(rng.normal(0.0, writer.rotation))
    cos, sin = np.cos(angle), np.sin(angle)
    strokes = []
    for skeleton in _SKELETONS[digit]:
        pts = skeleton + rng.normal(0.0, writer.jitter * 0.5, 2)
        pts = pts + rng.normal(0.0, writer.jitter * 0.3, pts.shape)
        x, y = pts[:, 0] - 0.5, pts[:, 1] - 0.5
        x = x + warp[0] * np.sin(2 * np.pi * y + phases[0])
        y = y + warp[1] * np.sin(2 * np.pi * x + phases[1])
        x = x * aspect - slant * y
        strokes.append(np.stack([cos * x - sin * y, sin * x + cos * y], axis=1))
    return strokes


def _render_digit(rng: np.random.Generator, digit: int, writer: Writer,
                  renderer: Renderer) -> Image.Image:
    """The digit written once by ``writer`` and put into pixels by ``renderer``: the ink's
    bounding box fitted (A) or stretched (B) into the frame, so the two renderers differ in
    size, position and proportions as MNIST and USPS do."""
    strokes = _styled_strokes(rng, digit, writer)
    points = np.concatenate(strokes)
    low, high = points.min(axis=0), points.max(axis=0)
    extent = np.maximum(high - low, 1e-3)
    width = rng.uniform(*writer.width) * renderer.box  # stroke width, output pixels
    if renderer.fill:  # USPS-like: stretched to the frame, a thin digit not beyond 2x
        scale_y = (renderer.size - width) / extent[1]
        scale = np.array([min((renderer.size - width) / extent[0], 2.0 * scale_y), scale_y])
        shift = rng.normal(0.0, 0.3, 2)
    else:  # MNIST-like: the longer side fitted in the box, the box in the middle
        scale = np.full(2, (renderer.box - width) / extent.max())
        shift = rng.normal(0.0, 0.7, 2)
    centre = renderer.size / 2 + shift
    big = renderer.size * _DRAW_SCALE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    line = max(1, round(width * _DRAW_SCALE))
    for stroke in strokes:
        xy = ((stroke - (low + high) / 2) * scale + centre) * _DRAW_SCALE
        coords = [(float(px), float(py)) for px, py in xy]
        draw.line(coords, fill=255, width=line, joint="curve")
        for px, py in (coords[0], coords[-1]):  # round caps
            draw.ellipse((px - line / 2, py - line / 2, px + line / 2, py + line / 2), fill=255)
    small = img.resize((renderer.size, renderer.size), Image.Resampling.BOX)
    if renderer.blur:
        small = small.filter(ImageFilter.GaussianBlur(renderer.blur))
    ink = np.asarray(small, dtype=np.float64) / 255.0
    paper, pen = rng.uniform(0, 25), rng.uniform(215, 255)
    if renderer.dark_on_light:
        paper, pen = 255 - paper, 255 - pen
    pixels = paper + (pen - paper) * ink + rng.normal(0.0, renderer.noise, ink.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _png(img: Image.Image) -> bytes:
    """PNG bytes: lossless and without a timestamp, so the same seed gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- audio: a spoken digit ---------------------------------------------------------------------

_RATE = 16_000
_HOP = 128  # the synthesiser's parameters change every 8 ms, cross-faded
_WIN = 256  # overlap-added Hann frames of 16 ms, two per hop
_NFFT = 512  # room for the resonators' ringing without wrapping much

# A segment: share of the phone's time, F1, F2, F3 (Hz, adult male), voicing, aspiration,
# frication level, frication centre Hz, frication bandwidth Hz. Consonants carry their place's
# formant "locus", which shapes the vowels' transitions into and out of them.
_Segment = tuple[float, float, float, float, float, float, float, float, float]
_PHONES: dict[str, tuple[_Segment, ...]] = {
    "i": ((1.0, 270, 2290, 3010, 1.0, 0, 0, 0, 1),),
    "ɪ": ((1.0, 390, 1990, 2550, 1.0, 0, 0, 0, 1),),
    "e": ((1.0, 480, 2000, 2600, 1.0, 0, 0, 0, 1),),
    "ɛ": ((1.0, 530, 1840, 2480, 1.0, 0, 0, 0, 1),),
    "a": ((1.0, 730, 1090, 2440, 1.0, 0, 0, 0, 1),),
    "ʌ": ((1.0, 640, 1190, 2390, 1.0, 0, 0, 0, 1),),
    "ɔ": ((1.0, 570, 840, 2410, 1.0, 0, 0, 0, 1),),
    "o": ((1.0, 450, 860, 2400, 1.0, 0, 0, 0, 1),),
    "u": ((1.0, 300, 870, 2240, 1.0, 0, 0, 0, 1),),
    "r": ((1.0, 460, 1190, 1600, 0.7, 0, 0, 0, 1),),
    "w": ((1.0, 300, 650, 2200, 0.7, 0, 0, 0, 1),),
    "n": ((1.0, 260, 1300, 2500, 0.3, 0, 0, 0, 1),),
    "v": ((1.0, 300, 1100, 2300, 0.35, 0, 0.2, 4000, 3000),),
    "z": ((1.0, 280, 1700, 2600, 0.35, 0, 0.45, 5000, 1500),),
    "f": ((1.0, 350, 1000, 2300, 0.0, 0, 0.25, 4500, 4000),),
    "θ": ((1.0, 350, 1500, 2500, 0.0, 0, 0.2, 6000, 3500),),
    "s": ((1.0, 350, 1800, 2600, 0.0, 0, 0.8, 5500, 1200),),
    "t": ((0.55, 350, 1800, 2600, 0.0, 0, 0, 4500, 2500),  # closure
          (0.15, 350, 1800, 2600, 0.0, 0, 1.0, 4500, 2500),  # burst
          (0.30, 400, 1800, 2600, 0.0, 0.35, 0, 4500, 2500)),  # aspiration
    "k": ((0.55, 300, 2000, 2500, 0.0, 0, 0, 2000, 800),
          (0.15, 300, 2000, 2500, 0.0, 0, 1.0, 2000, 800),
          (0.30, 400, 2000, 2500, 0.0, 0.35, 0, 2000, 800)),
}
# Each digit as (phone, ms at rate 1), after its English pronunciation.
_WORDS: tuple[tuple[tuple[str, float], ...], ...] = (
    (("z", 90), ("i", 90), ("r", 70), ("o", 170)),
    (("w", 70), ("ʌ", 160), ("n", 120)),
    (("t", 100), ("u", 230)),
    (("θ", 110), ("r", 60), ("i", 220)),
    (("f", 110), ("ɔ", 180), ("r", 120)),
    (("f", 100), ("a", 140), ("i", 90), ("v", 80)),
    (("s", 120), ("ɪ", 110), ("k", 80), ("s", 130)),
    (("s", 120), ("ɛ", 110), ("v", 70), ("n", 130)),
    (("e", 150), ("i", 100), ("t", 90)),
    (("n", 80), ("a", 150), ("i", 100), ("n", 120)),
)
_ACCENT_TIMING = 0.15  # log spread of a speaker's phone durations
_FORMANT_JITTER = 0.08  # spread of an item's formant targets around the speaker's
_MS_PER_STEP = 4.0  # the phone targets' time grid, finer than the filter's hop
_MAX_SPEECH_MS = 900.0  # longer words are spoken faster, so that every clip fits in 1 s
_BANDWIDTHS = (70.0, 100.0, 160.0)
_OMEGA = np.linspace(0.0, np.pi, _NFFT // 2 + 1)
_Z1 = np.exp(-1j * _OMEGA).astype(np.complex64)
_Z2 = np.exp(-2j * _OMEGA).astype(np.complex64)
_HANN = np.hanning(_WIN + 1)[:-1].astype(np.float32)  # periodic: sums to 1 at half overlap


def _smooth(track: np.ndarray, steps: int) -> np.ndarray:
    """Each column of (T, k) smoothed by a Hann window of ``steps``: targets become glides."""
    kernel = np.hanning(steps + 2)[1:-1]
    kernel /= kernel.sum()
    pad = steps // 2
    padded = np.pad(track, ((pad, pad), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, j], kernel, mode="same")[pad:pad + len(track)]
                     for j in range(track.shape[1])], axis=1)


def _resonator(freq: np.ndarray, bw: np.ndarray | float, peak: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Gain (frames, 1) and denominator (frames, bins) of the frequency response of a 2-pole
    resonator at ``freq`` with bandwidth ``bw`` (Hz, per frame): unit gain at 0 Hz (a formant
    in a cascade synthesiser) or at its peak (a noise band)."""
    r = np.exp(-np.pi * np.asarray(bw, dtype=np.float32) / _RATE) * np.ones_like(freq)
    theta = (2 * np.pi / _RATE) * freq
    c1, c2 = (2 * r * np.cos(theta))[:, None], (-r * r)[:, None]
    denominator = (1.0 - c2 * _Z2) - c1 * _Z1
    if peak:
        gain = ((1 - r) * np.sqrt(1 - 2 * r * np.cos(2 * theta) + r * r))[:, None]
    else:
        gain = 1.0 - c1 - c2
    return gain.astype(np.float32), denominator


def _filter_frames(x: np.ndarray, response: np.ndarray) -> np.ndarray:
    """``x`` through a filter that changes every hop: Hann frames at half overlap, each
    multiplied by its frame's response, overlap-added. The vectorised form of a time-varying
    cascade of resonators (an ``lfilter`` call per frame and resonator is ~20x slower)."""
    frames = response.shape[0]
    padded = np.zeros((frames + 1) * _HOP, dtype=np.float32)
    padded[_WIN // 2:_WIN // 2 + len(x)] = x[:len(padded) - _WIN // 2]
    windows = np.lib.stride_tricks.sliding_window_view(padded, _WIN)[::_HOP][:frames]
    blocks = fft.irfft(fft.rfft(windows * _HANN, _NFFT) * response, _NFFT)
    per_hop = _NFFT // _HOP
    out = np.zeros((frames + per_hop, _HOP), dtype=np.float32)
    for r in range(per_hop):
        out[r:r + frames] += blocks[:, r * _HOP:(r + 1) * _HOP]
    return out.reshape(-1)[_WIN // 2:_WIN // 2 + len(x)]


@functools.lru_cache(maxsize=64)
def _accent(name: str, spread: float) -> dict[str, tuple[float, float, float, float]]:
    """The speaker's own way with each phone (their dialect, fixed by their name): formant
    targets moved by several per cent and a longer or shorter duration. A new speaker's phones
    sit somewhere the train speakers' never did, not just scaled by another tract length."""
    rng = np.random.default_rng(list(name.encode("utf-8")))
    return {phone: (*(float(v) for v in np.exp(rng.normal(0.0, spread, 3))),
                    float(np.exp(rng.normal(0.0, _ACCENT_TIMING))))
            for phone in _PHONES}


def _speech(rng: np.random.Generator, digit: int, speaker: Speaker) -> np.ndarray:
    """The digit in this speaker's voice, without silence or noise around it, unit RMS."""
    rate = speaker.rate * np.exp(rng.normal(0.0, 0.06))
    accent = _accent(speaker.name, speaker.accent)
    rest = np.array([1, 500, 1500, 2500, 0, 0, 0, 4000, 2000], dtype=np.float64)
    rows, counts = [rest], [3]
    for phone, ms in _WORDS[digit]:
        stretch = rng.uniform(0.8, 1.25) * ms / rate * accent[phone][3]
        formant_jitter = np.exp(rng.normal(0.0, _FORMANT_JITTER, 3)) * accent[phone][:3]
        for segment in _PHONES[phone]:
            row = np.array(segment, dtype=np.float64)
            row[1:4] *= formant_jitter
            rows.append(row)
            counts.append(max(1, round(segment[0] * stretch / _MS_PER_STEP)))
    longest = int(_MAX_SPEECH_MS / _MS_PER_STEP) - 6  # a slow speaker speeds up, not cut off
    if sum(counts) > longest:
        counts = [max(1, c * longest // sum(counts)) for c in counts]
    rows.append(rest)
    counts.append(3)
    track = np.repeat(np.stack(rows), counts, axis=0)  # (steps, 9) on a 4 ms grid
    track[:, 1:4] = _smooth(track[:, 1:4], 11) * speaker.tract  # 44 ms formant glides
    track[:, 4:7] = _smooth(track[:, 4:7], 3)  # 12 ms amplitude ramps
    track[:, 7] *= np.sqrt(speaker.tract)
    n = int(len(track) * _MS_PER_STEP * _RATE / 1000)
    step_at = np.arange(n) * (1000 / _RATE / _MS_PER_STEP)
    steps = np.arange(len(track))
    voicing, aspiration, frication = (np.interp(step_at, steps, track[:, j]) for j in (4, 5, 6))

    # Source: a glottal pulse train at a falling pitch with jitter, shaped (-6 dB/octave).
    t = np.arange(n) / n
    f0 = speaker.f0 * np.exp(rng.normal(0.0, 0.06)) * (
        rng.uniform(1.05, 1.15) - rng.uniform(0.15, 0.3) * t)
    f0 *= 1 + 0.02 * signal.lfilter([0.3], [1, -0.7], rng.standard_normal(n))
    pulses = np.diff(np.floor(np.cumsum(f0) / _RATE), prepend=0.0)
    glottal = signal.lfilter([1.0, -1.0], [1.0, -1.9, 0.9025], pulses)
    glottal /= np.sqrt(np.mean(glottal**2)) + 1e-12
    noise = rng.standard_normal((2, n))
    source = voicing * glottal + (speaker.breath * voicing + aspiration) * noise[0]

    # Filter: a cascade of formant resonators (F4 fixed per speaker), and the frication noise
    # through a resonator of its own, both changing every hop.
    frames = n // _HOP + 2
    at = np.minimum(np.arange(frames) * (_HOP * 1000 / _RATE / _MS_PER_STEP), len(track) - 1)
    params = np.stack([np.interp(at, steps, track[:, j]) for j in (1, 2, 3, 7, 8)],
                      axis=1).astype(np.float32)
    gain, denominator = _resonator(np.full(frames, min(3500 * speaker.tract, 7000),
                                           dtype=np.float32), 250.0)
    for k, bw in enumerate(_BANDWIDTHS):
        g, d = _resonator(params[:, k], bw * speaker.tract)
        gain, denominator = gain * g, denominator * d
    voiced = _filter_frames(source, gain / denominator)
    g, d = _resonator(params[:, 3], params[:, 4], peak=True)
    speech = voiced + _filter_frames(2.0 * frication * noise[1], g / d)
    return speech / (np.sqrt(np.mean(speech**2)) + 1e-12)


def _utterance(rng: np.random.Generator, digit: int, speaker: Speaker) -> np.ndarray:
    """The spoken digit with silence around it (0.4-1.0 s in all), background noise at 10-30
    dB SNR (white, pink or brown), the speaker's loudness and a random gain."""
    speech = _speech(rng, digit, speaker)
    room = int(rng.uniform(0.4, 1.0) * _RATE) - len(speech)
    room = max(room, int(0.4 * _RATE) - len(speech), int(0.02 * _RATE))
    room = min(room, _RATE - len(speech))
    lead = int(rng.uniform(0.2, 0.8) * room)
    total = len(speech) + room
    out = np.zeros(total)
    out[lead:lead + len(speech)] = speech
    colour = int(rng.integers(3))  # 0 white, 1 pink, 2 brown
    size = fft.next_fast_len(total, real=True)
    spectrum = fft.rfft(rng.standard_normal(size))
    spectrum /= np.maximum(fft.rfftfreq(size, 1 / _RATE), 50.0) ** (colour / 2)
    noise = fft.irfft(spectrum, size)[:total]
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    out += noise * 10 ** (-rng.uniform(10, 30) / 20)  # speech has unit RMS
    out *= 10 ** ((speaker.level_db + rng.normal(0.0, 4.0)) / 20)
    peak = np.max(np.abs(out))
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


def _wav(samples: np.ndarray) -> bytes:
    """16-bit WAV bytes of a 16 kHz clip."""
    buf = io.BytesIO()
    # PCM_16: float WAVs get a PEAK chunk with a timestamp, which would break determinism.
    soundfile.write(buf, samples, _RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --- text: the number word ---------------------------------------------------------------------


def _typo(rng: np.random.Generator, word: str) -> str:
    """One slip of the hand: two letters swapped, one dropped or one doubled."""
    if len(word) < 2:
        return word + word
    i = int(rng.integers(len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i + 1] + word[i:]


def _text(rng: np.random.Generator, digit: int, language: str) -> str:
    """The number word as someone might type it: a slip now and then, sometimes in a phrase
    (whose other words are the same for every class, so they only dilute), any case."""
    words, (noun, yes, please) = LANGUAGES[language]
    word = words[digit]
    if rng.random() < _TYPO_FRACTION:
        word = _typo(rng, word)
    if rng.random() < _PHRASE_FRACTION:
        template = (noun, f"{yes}, {{}}", f"{{}}, {please}")[int(rng.integers(3))]
        word = template.format(word)
    case = rng.random()
    if case < 0.25:
        word = word.upper()
    elif case < 0.55:
        word = word[:1].upper() + word[1:]
    return word + "\n"


# --- items and archives ------------------------------------------------------------------------


def _counts(total: int, parts: int) -> list[int]:
    """``total`` split as evenly as can be into ``parts`` (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def shifted_items(sources: Sequence[Source], total: int, seed: int, split: int
                  ) -> list[tuple[str, str, str, dict[str, bytes]]]:
    """(key, label, group, {extension: bytes}) for ``total`` items spread evenly over the
    sources, classes balanced within each, in a seeded order that mixes the sources. ``split``
    (0 train, 1 test) keeps the two archives' random streams apart. Each item draws from its
    own streams, so a dropped modality does not change the others."""
    items = []
    for s, (source, count) in enumerate(zip(sources, _counts(total, len(sources)), strict=True)):
        order = np.random.default_rng([seed, split, s, 1_000_003])
        labels = order.permutation(np.resize(np.arange(len(CLASSES)), count))
        for i, digit in enumerate(int(v) for v in labels):
            meta, image_rng, audio_rng, text_rng = (
                np.random.default_rng(child)
                for child in np.random.SeedSequence([seed, split, s, i]).spawn(4))
            missing = (str(meta.choice(["image", "audio", "text"]))
                       if meta.random() < _MISSING_FRACTION else None)
            files: dict[str, bytes] = {}
            if missing != "image":
                files[".png"] = _png(_render_digit(image_rng, digit, source.writer,
                                                   source.renderer))
            if missing != "audio":
                files[".wav"] = _wav(_utterance(audio_rng, digit, source.speaker))
            if missing != "text":
                files[".txt"] = _text(text_rng, digit, source.language).encode("utf-8")
            items.append((f"{source.name}/item_{i:04d}", CLASSES[digit], source.name, files))
    mix = np.random.default_rng([seed, split, 2_000_003]).permutation(len(items))
    return [items[int(i)] for i in mix]


def _write_tar(path: Path, items: Sequence[tuple[str, str, str, dict[str, bytes]]]) -> None:
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["key", "label", "group"])
    members: list[tuple[str, bytes]] = []
    for key, label, group, files in items:
        writer.writerow([key, label, group])
        members += [(key + ext, data) for ext, data in files.items()]
    members.append(("labels.csv", labels.getvalue().encode("utf-8")))
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(partial, path)


def write_shifted(out_dir: str | Path, train: int = 3200, test: int = 1200,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write ``shifted_train.tar`` (``train`` items from the train sources) and
    ``shifted_test.tar`` (``test`` items from the disjoint test sources) into ``out_dir``;
    returns their paths. Any sizes keep the same sources, so a small set is the same task."""
    if train < len(TRAIN_SOURCES) or test < len(TEST_SOURCES):
        raise ValueError(f"need at least one item per source: train >= {len(TRAIN_SOURCES)}, "
                         f"test >= {len(TEST_SOURCES)}, not {train} and {test}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "shifted_train.tar", out / "shifted_test.tar"
    _write_tar(paths[0], shifted_items(TRAIN_SOURCES, train, seed, split=0))
    _write_tar(paths[1], shifted_items(TEST_SOURCES, test, seed, split=1))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samples.shifted",
        description="Write shifted_train.tar and shifted_test.tar: labelled image, audio and "
                    "text digits whose train and test sources share no writer, voice or language.")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--train", type=int, default=3200, help="train items (default 3200)")
    parser.add_argument("--test", type=int, default=1200, help="test items (default 1200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        train, test = write_shifted(args.out_dir, args.train, args.test, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"train: {train}")
    print(f"test:  {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
