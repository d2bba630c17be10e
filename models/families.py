"""Feature families: cheap, hand-made features that survive a shift of domain, beside each
modality's pretrained encoder.

The pretrained encoders are good on data like what they were trained on (photographs, English
sentences) and weak far from it (small grayscale scans, words of other languages, voices they
never heard). Simple features do not know what a photograph is, so they have nothing to forget:
a linear model over downscaled pixels, gradient histograms, character n-grams or cepstral
statistics is often the better witness on such data. The default train job (``strategy=stack``,
models.stacking) fits one head per (modality, family) and lets out-of-fold predictions decide
how much each one counts.

Each family is computed from the same decoded medium as its modality's encoder (one decode per
file) and cached like encoder features, under its own ``version`` (bump it whenever the
computation changes). A family's column in a fusion model is ``"<modality>:<family>"``.

The character n-gram family is stored sparse: a text's hashed n-gram counts as ``[indices...,
counts...]`` (:func:`dense` expands it). Its IDF weights depend on the training set, so they
belong to the model (``FusionConfig.count_columns``), not to the cached per-item part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dct
from skimage.feature import hog
from sklearn.feature_extraction.text import HashingVectorizer

from mmbatch.contract import COLUMN_SEPARATOR


@dataclass(frozen=True)
class Family:
    """One feature family: a modality's decoded medium -> a vector of ``dim`` values."""

    modality: str
    name: str
    version: str  # the feature cache key
    dim: int
    compute: Callable[[Any], np.ndarray]
    sparse: bool = False  # cached as [indices..., counts...]; expand with dense()
    about: str = ""

    @property
    def column(self) -> str:
        """The family's input name in a fusion model: ``"<modality>:<name>"``."""
        return f"{self.modality}{COLUMN_SEPARATOR}{self.name}"

    def features(self, raw: Any) -> np.ndarray:
        """The cached form of ``raw``'s features (float32; sparse pairs for a sparse family)."""
        return np.ascontiguousarray(self.compute(raw), dtype="<f4")


# --- images -------------------------------------------------------------------------------------

PIXELS_SIDE = 16
HOG_SIDE = 32
_INK_THRESHOLD = 0.25  # of the range between background and the brightest ink
WORKING_SIDE = 128  # larger images are reduced to this first (15 ms -> 1 ms a photograph)


def normalized_gray(img: Image.Image, side: int) -> np.ndarray:
    """The image as ``side`` x ``side`` grayscale in [0, 1], ink bright on a dark background,
    cropped to the ink's bounding box and centred in a square.

    Two shifts that a pretrained network does not undo and that a pixel model cannot learn
    from other sources: polarity (dark on light or light on dark: the border's median decides
    which is background) and framing (a digit in the middle of a wide margin or filling the
    frame). A photograph's "ink" covers most of it, so it is only resized.
    """
    if max(img.size) > WORKING_SIDE:  # a photograph: its ink crop needs no more than this
        scale = WORKING_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BOX, reducing_gap=2.0)
    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0  # (H, W)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > gray.mean():
        gray = 1.0 - gray  # ink bright
    background = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    span = float(gray.max()) - background
    if span > 1e-3:
        rows, cols = np.nonzero(gray > background + _INK_THRESHOLD * span)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        gray = gray[top:bottom, left:right]
    h, w = gray.shape
    size = max(h, w)
    square = np.full((size, size), background, dtype=np.float32)
    square[(size - h) // 2:(size - h) // 2 + h, (size - w) // 2:(size - w) // 2 + w] = gray
    # a 10 % margin, so that strokes touching the box keep their edges in the gradients
    pad = max(1, size // 10)
    square = np.pad(square, pad, constant_values=background)
    out = Image.fromarray((square * 255).astype(np.uint8), mode="L")
    return np.asarray(out.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _pixels(img: Image.Image) -> np.ndarray:
    x = normalized_gray(img, PIXELS_SIDE).ravel()
    return (x - x.mean()) / max(float(x.std()), 1e-3)  # contrast-free


def _hog(img: Image.Image) -> np.ndarray:
    # unsigned gradients (0-180 degrees): the same descriptor for either polarity
    return np.asarray(hog(normalized_gray(img, HOG_SIDE), orientations=9, pixels_per_cell=(8, 8),
                          cells_per_block=(2, 2), block_norm="L2-Hys"), dtype=np.float32)


# --- text ---------------------------------------------------------------------------------------

CHAR_FEATURES = 2**14
# Character 1-4 grams within word boundaries, accents folded: language-agnostic, and cognates
# ("sieben", "seven", "zeven") share most of their n-grams. Hashing needs no vocabulary, so the
# per-item counts are cacheable; counts, not weights: IDF is fitted per model.
_CHARS = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=CHAR_FEATURES,
                           alternate_sign=False, norm=None, lowercase=True,
                           strip_accents="unicode", dtype=np.float32)


def _char_counts(text: str) -> np.ndarray:
    row = _CHARS.transform([" ".join(text.split())[:10_000]]).tocsr()
    row.sum_duplicates()
    return np.concatenate([row.indices.astype(np.float32), row.data.astype(np.float32)])


def dense(family: Family, vec: np.ndarray) -> np.ndarray:
    """A cached vector as the (dim,) input of the family's column."""
    if not family.sparse:
        return vec
    out = np.zeros(family.dim, dtype=np.float32)
    half = len(vec) // 2
    out[vec[:half].astype(np.int64)] = vec[half:]
    return out


# --- audio --------------------------------------------------------------------------------------

SAMPLE_RATE = 16_000
_WIN, _HOP, _N_MELS, _N_MFCC, _GRID = 400, 160, 40, 20, 10
_VOICED_DB = 35.0  # frames within this of the loudest count as the utterance


def _mel_filters() -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale, 60 Hz - 7.6 kHz."""
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.fft.rfftfreq(_WIN, 1.0 / SAMPLE_RATE)
    edges = hz(np.linspace(mel(np.array(60.0)), mel(np.array(7600.0)), _N_MELS + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


_MEL = _mel_filters()
_WINDOW = np.hanning(_WIN).astype(np.float32)


def _mfcc(wave: np.ndarray) -> np.ndarray:
    """Per-utterance cepstral features of a 16 kHz waveform: MFCC mean and spread before
    normalisation (channel, voice), the normalised MFCC (CMVN: the speaker's and the
    microphone's average removed) resampled to a fixed grid of ``_GRID`` time steps over the
    voiced part (what is said, in order, whatever the speaking rate), the deltas' spread, and
    the voiced duration."""
    wave = np.asarray(wave, dtype=np.float32)[: SAMPLE_RATE * 30]
    if wave.size < _WIN:
        wave = np.pad(wave, (0, _WIN - wave.size))
    wave = np.append(wave[0], wave[1:] - 0.97 * wave[:-1])  # pre-emphasis
    frames = np.lib.stride_tricks.sliding_window_view(wave, _WIN)[::_HOP] * _WINDOW  # (T, W)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (T, F)
    mel = power @ _MEL.T  # (T, n_mels)
    # a floor 60 dB under the clip's loudest band, not an absolute one: the same word recorded
    # louder or softer gives the same cepstra
    logmel = np.log(mel + 1e-6 * float(mel.max()) + 1e-20)
    energy = 10.0 * np.log10(power.sum(axis=1) + 1e-10)  # (T,)
    voiced = energy >= energy.max() - _VOICED_DB
    idx = np.nonzero(voiced)[0]
    span = logmel[idx[0]:idx[-1] + 1] if idx.size else logmel  # first to last voiced frame
    cep = dct(span, type=2, norm="ortho", axis=1)[:, :_N_MFCC]  # (T', n_mfcc)
    mean, std = cep.mean(axis=0), cep.std(axis=0)
    norm = (cep - mean) / (std + 1e-3)
    steps = np.linspace(0, len(norm) - 1, _GRID)
    grid = np.stack([np.interp(steps, np.arange(len(norm)), norm[:, k])
                     for k in range(_N_MFCC // 2)], axis=1)  # (GRID, n_mfcc / 2)
    delta = np.diff(norm, axis=0) if len(norm) > 1 else np.zeros((1, _N_MFCC))
    seconds = len(span) * _HOP / SAMPLE_RATE
    return np.concatenate([mean, std, grid.ravel(), delta.std(axis=0),
                           [np.log(seconds + 1e-2)]]).astype(np.float32)


_MFCC_DIM = _N_MFCC * 3 + _GRID * (_N_MFCC // 2) + 1

# --- the registry -------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family("image", "pixels", "pixels16-ink-crop-v1", PIXELS_SIDE * PIXELS_SIDE, _pixels,
           about="16x16 grayscale, ink bright, cropped to the ink, standardised per image"),
    Family("image", "hog", "hog32-o9-c8-b2-ink-crop-v1", 324, _hog,
           about="histogram of oriented gradients (scikit-image) of the 32x32 ink crop"),
    Family("text", "chars", f"chargrams1-4-hash{CHAR_FEATURES}-v1", CHAR_FEATURES, _char_counts,
           sparse=True, about="hashed character 1-4 gram counts (TF-IDF fitted per model)"),
    Family("audio", "mfcc", "mfcc20-cmvn-grid10-v1", _MFCC_DIM, _mfcc,
           about="MFCC statistics and the normalised MFCC on a 10-step grid over the "
                 "voiced part"),
)
BY_COLUMN: dict[str, Family] = {f.column: f for f in FAMILIES}


def families_of(modality: str) -> tuple[Family, ...]:
    """The families computed for ``modality`` (none for a modality without any)."""
    return tuple(f for f in FAMILIES if f.modality == modality)
