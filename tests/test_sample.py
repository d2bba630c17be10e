"""The sample data generator: determinism, archive layout, and a dataset where fusion matters."""

from __future__ import annotations

import csv
import io
import itertools
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from samples.sample import CLASSES, SampleArchives, main, write_sample

MODALITY_EXTS = {
    ".jpg": "image",
    ".png": "image",
    ".txt": "text",
    ".wav": "audio",
    ".flac": "audio",
}


def read_members(path: Path) -> dict[str, bytes]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    members = {}
    with tarfile.open(path) as archive:
        for info in archive.getmembers():
            stream = archive.extractfile(info)
            if stream is not None:  # regular files only
                members[info.name] = stream.read()
    return members


def group_items(members: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """WebDataset grouping: the key is the path up to the first dot of the file name."""
    items: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        if name == "labels.csv":
            continue
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        items.setdefault(f"{folder}/{stem}", {})[dot + ext] = data
    return items


def read_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


class Sample:
    def __init__(self, paths: SampleArchives) -> None:
        self.paths = paths
        self.train_members = read_members(paths.train)
        self.unlabelled_members = read_members(paths.unlabelled)
        self.train_items = group_items(self.train_members)
        self.unlabelled_items = group_items(self.unlabelled_members)
        self.labels = read_csv(self.train_members["labels.csv"])
        self.truth = read_csv(paths.truth.read_bytes())
        self.label_of = {row["key"]: row["label"] for row in self.labels + self.truth}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return Sample(write_sample(tmp_path_factory.mktemp("sample")))


# --- determinism and formats -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar.gz", "zip", "tar"])
def test_same_seed_gives_identical_bytes(tmp_path: Path, fmt: str) -> None:
    first = write_sample(tmp_path / "a", n_train=12, n_unlabelled=4, seed=3, fmt=fmt)
    second = write_sample(tmp_path / "b", n_train=12, n_unlabelled=4, seed=3, fmt=fmt)
    for a, b in [
        (first.train, second.train),
        (first.unlabelled, second.unlabelled),
        (first.truth, second.truth),
    ]:
        assert a.name == b.name
        assert a.read_bytes() == b.read_bytes()
    assert first.train.name == f"sample_train.{fmt}"


def test_formats_hold_the_same_members(tmp_path: Path) -> None:
    archives = {
        fmt: read_members(write_sample(tmp_path / fmt, n_train=8, n_unlabelled=2, fmt=fmt).train)
        for fmt in ["tar.gz", "zip", "tar"]
    }
    assert archives["tar.gz"] == archives["zip"] == archives["tar"]


def test_archive_metadata_is_fixed(sample: Sample) -> None:
    with tarfile.open(sample.paths.train) as archive:
        infos = archive.getmembers()
    assert [i.name for i in infos] == sorted(i.name for i in infos)
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {
        (infos[0].mtime, 0, 0, "", "", 0o644)
    }
    assert all(i.isfile() for i in infos)


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a", n_train=8, n_unlabelled=1, seed=1)
    b = write_sample(tmp_path / "b", n_train=8, n_unlabelled=1, seed=2)
    assert a.train.read_bytes() != b.train.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "rar"}, "fmt must be one of"),
        ({"n_train": 7}, "n_train must be at least 8"),
        ({"n_unlabelled": 0}, "n_unlabelled must be at least 1"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_sample(tmp_path, **kwargs)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--train", "8", "--unlabelled", "2", "--format", "zip"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "sample_train.zip") in out
    assert (tmp_path / "sample_unlabelled.zip").exists()
    assert (tmp_path / "sample_unlabelled_truth.csv").exists()
    assert not list(tmp_path.glob("*.partial"))


# --- layout ------------------------------------------------------------------------------------


def test_items_have_one_to_three_modalities(sample: Sample) -> None:
    assert len(sample.train_items) == 240 and len(sample.unlabelled_items) == 80
    missing: Counter[str] = Counter()
    for files in [*sample.train_items.values(), *sample.unlabelled_items.values()]:
        modalities = [MODALITY_EXTS[ext] for ext in files]
        assert len(modalities) == len(set(modalities)), "one file per modality"
        # by design at most one modality is missing
        assert 2 <= len(modalities) <= 3
        missing.update({"image", "text", "audio"} - set(modalities))
    assert set(missing) == {"image", "text", "audio"}
    assert 0.04 * 320 <= sum(missing.values()) <= 0.2 * 320


def test_members_are_grouped_in_neutral_folders(sample: Sample) -> None:
    names = [*sample.train_members, *sample.unlabelled_members]
    pattern = re.compile(r"batch_\d\d/item_\d{4}\.(jpg|png|txt|wav|flac)")
    assert all(pattern.fullmatch(n) for n in names if n != "labels.csv")
    words = {part for c in CLASSES for part in [c, *c.split("_")]}
    assert not [n for n in names if any(w in n.lower() for w in words)]


def test_labels_csv_matches_items_with_stratified_splits(sample: Sample) -> None:
    assert list(sample.labels[0]) == ["key", "label", "split"]
    assert [r["key"] for r in sample.labels] == sorted(sample.train_items)
    assert {r["label"] for r in sample.labels} == set(CLASSES)
    splits = Counter((r["label"], r["split"]) for r in sample.labels)
    for name in CLASSES:
        assert splits[(name, "train")] > 0 and splits[(name, "val")] > 0
    val = sum(1 for r in sample.labels if r["split"] == "val")
    assert 0.15 <= val / len(sample.labels) <= 0.25


def test_truth_covers_exactly_the_unlabelled_items(sample: Sample) -> None:
    assert "labels.csv" not in sample.unlabelled_members
    assert list(sample.truth[0]) == ["key", "label"]
    assert {r["key"] for r in sample.truth} == set(sample.unlabelled_items)
    assert len(sample.truth) == len(sample.unlabelled_items)
    assert {r["label"] for r in sample.truth} <= set(CLASSES)
    assert not set(sample.unlabelled_items) & set(sample.train_items)
    assert sample.paths.truth.parent == sample.paths.unlabelled.parent


def test_media_files_decode(sample: Sample) -> None:
    for files in list(sample.train_items.values())[:40]:
        for ext, data in files.items():
            if MODALITY_EXTS[ext] == "image":
                img = Image.open(io.BytesIO(data))
                img.load()
                assert 160 <= min(img.size) and max(img.size) <= 320
            elif MODALITY_EXTS[ext] == "audio":
                samples, rate = soundfile.read(io.BytesIO(data))
                assert rate in (16000, 22050) and len(samples) == 2 * rate
            else:
                words = data.decode("utf-8").split()
                assert 10 <= len(words) <= 30


# --- each modality alone is only partly informative --------------------------------------------


def image_features(data: bytes) -> np.ndarray:
    """Mean brightness, then a 6x6 grey thumbnail."""
    grey = Image.open(io.BytesIO(data)).convert("L")
    thumb = np.asarray(grey.resize((6, 6), Image.Resampling.BOX), dtype=np.float64).ravel()
    return np.concatenate([[np.asarray(grey, dtype=np.float64).mean()], thumb])


def audio_features(data: bytes) -> np.ndarray:
    """Power-weighted spectral centroid (Hz), then log power in 16 bands up to 8 kHz."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float64")
    power = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    centroid = (freqs * power).sum() / power.sum()
    edges = np.linspace(0, 8000, 17)
    bands = [
        np.log(power[(freqs >= lo) & (freqs < hi)].sum() + 1e-9)
        for lo, hi in itertools.pairwise(edges)
    ]
    return np.concatenate([[centroid], bands])


def text_words(data: bytes) -> list[str]:
    return re.findall(r"[a-z']+", data.decode("utf-8").lower())


def features(items: dict[str, dict[str, bytes]], modality: str) -> dict[str, np.ndarray]:
    extract = image_features if modality == "image" else audio_features
    return {
        key: extract(data)
        for key, files in items.items()
        for ext, data in files.items()
        if MODALITY_EXTS[ext] == modality
    }


def nearest_centroid_accuracy(
    train: dict[str, np.ndarray], test: dict[str, np.ndarray], target: dict[str, str]
) -> float:
    """Fit class centroids on standardised features, return accuracy on ``test``."""
    x = np.stack(list(train.values()))
    mean, std = x.mean(0), x.std(0) + 1e-9
    classes = sorted(set(target[k] for k in train))
    centroids = np.stack(
        [
            np.mean([(v - mean) / std for k, v in train.items() if target[k] == c], axis=0)
            for c in classes
        ]
    )
    hits = [
        classes[int(np.argmin(((((v - mean) / std) - centroids) ** 2).sum(1)))] == target[k]
        for k, v in test.items()
    ]
    return float(np.mean(hits))


def naive_bayes_accuracy(
    train: dict[str, list[str]], test: dict[str, list[str]], target: dict[str, str]
) -> float:
    classes = sorted(set(target[k] for k in train))
    vocab = sorted({w for words in train.values() for w in words})
    index = {w: i for i, w in enumerate(vocab)}
    counts = np.ones((len(classes), len(vocab)))  # Laplace smoothing
    for key, words in train.items():
        for w in words:
            counts[classes.index(target[key]), index[w]] += 1
    log_p = np.log(counts / counts.sum(1, keepdims=True))
    hits = []
    for key, words in test.items():
        scores = [sum(log_p[c, index[w]] for w in words if w in index) for c in range(len(classes))]
        hits.append(classes[int(np.argmax(scores))] == target[key])
    return float(np.mean(hits))


def factor(label_of: dict[str, str], part: int) -> dict[str, str]:
    return {key: label.split("_")[part] for key, label in label_of.items()}


def test_image_brightness_tells_time_of_day(sample: Sample) -> None:
    images = {**features(sample.train_items, "image"), **features(sample.unlabelled_items, "image")}
    time_of = factor(sample.label_of, 0)
    hits = [("day" if f[0] > 90 else "night") == time_of[k] for k, f in images.items()]
    assert np.mean(hits) > 0.9


def test_audio_centroid_tells_animal(sample: Sample) -> None:
    sounds = {**features(sample.train_items, "audio"), **features(sample.unlabelled_items, "audio")}
    animal_of = factor(sample.label_of, 1)
    hits = [("bird" if f[0] > 1500 else "frog") == animal_of[k] for k, f in sounds.items()]
    assert np.mean(hits) > 0.9


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_one_modality_alone_gets_about_half_the_labels(sample: Sample, modality: str) -> None:
    train = features(sample.train_items, modality)
    test = features(sample.unlabelled_items, modality)
    own, other = (0, 1) if modality == "image" else (1, 0)
    # its own factor, learned from the training archive: nearly always right
    assert nearest_centroid_accuracy(train, test, factor(sample.label_of, own)) > 0.9
    # the other factor: no better than chance
    assert nearest_centroid_accuracy(train, test, factor(sample.label_of, other)) < 0.65
    # the 4-class label: about half
    assert nearest_centroid_accuracy(train, test, sample.label_of) <= 0.6


def test_text_alone_is_weakly_informative(sample: Sample) -> None:
    def words(items: dict[str, dict[str, bytes]]) -> dict[str, list[str]]:
        return {k: text_words(f[".txt"]) for k, f in items.items() if ".txt" in f}

    accuracy = naive_bayes_accuracy(
        words(sample.train_items), words(sample.unlabelled_items), sample.label_of
    )
    assert 0.3 < accuracy <= 0.6


def test_image_and_audio_together_get_nearly_all_labels(sample: Sample) -> None:
    images = features(sample.unlabelled_items, "image")
    sounds = features(sample.unlabelled_items, "audio")
    both = images.keys() & sounds.keys()
    hits = [
        f"{'day' if images[k][0] > 90 else 'night'}_{'bird' if sounds[k][0] > 1500 else 'frog'}"
        == sample.label_of[k]
        for k in both
    ]
    assert len(both) >= 0.85 * len(sample.unlabelled_items)
    assert np.mean(hits) > 0.9
