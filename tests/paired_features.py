"""The paired sample's frozen features, encoded in-process with the project's encoders, for the
aligner's tests and measurements (no database, no worker: what an align job's training reads
from the feature cache, made directly)."""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from media.decode import decode_audio, decode_image, decode_text, modality_of
from models.align import PairedFeatures
from models.registry import build_encoder
from models.training import choose_split
from samples.paired import write_paired

MODALITIES = ("image", "text", "audio")
_DECODE = {"image": decode_image, "text": decode_text, "audio": decode_audio}


@dataclass(frozen=True)
class PairedSet:
    data: PairedFeatures
    keys: list[str]
    labels: list[str]
    groups: list[str]
    train_idx: list[int]
    val_idx: list[int]
    split: str


def read_archive(path: Path) -> tuple[dict[str, dict[str, bytes]], dict[str, tuple[str, str]]]:
    """Items (key -> modality -> bytes) and labels.csv (key -> (label, group))."""
    items: dict[str, dict[str, bytes]] = {}
    labels: dict[str, tuple[str, str]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "labels.csv":
                for row in csv.DictReader(io.StringIO(data.decode())):
                    labels[row["key"]] = (row["label"], row["group"])
                continue
            key, _ = member.name.rsplit(".", 1)
            modality = modality_of(member.name)
            if modality is not None:
                items.setdefault(key, {})[modality] = data
    return items, labels


def encode_archive(path: Path, modalities: tuple[str, ...] = MODALITIES
                   ) -> tuple[PairedFeatures, list[str], list[str], list[str]]:
    items, labels = read_archive(path)
    keys = sorted(items)
    feats = {}
    mask = torch.zeros(len(keys), len(modalities), dtype=torch.bool)
    for j, m in enumerate(modalities):
        encoder = build_encoder(m, "cpu")
        rows = [i for i, k in enumerate(keys) if m in items[k]]
        raws = [encoder.preprocess(_DECODE[m](items[keys[i]][m], f"{keys[i]}.x"))
                for i in rows]
        with torch.no_grad():
            out = torch.cat([encoder.encode(raws[s:s + 32]).float()
                             for s in range(0, len(raws), 32)])  # (n, D)
        x = torch.zeros(len(keys), out.shape[1])
        x[rows] = out
        mask[rows, j] = True
        feats[m] = x
    return (PairedFeatures(feats, mask), keys, [labels[k][0] for k in keys],
            [labels[k][1] for k in keys])


def paired_set(out_dir: Path, n_train: int, seed: int = 0,
               modalities: tuple[str, ...] = MODALITIES) -> PairedSet:
    """The paired sample's training archive, encoded, with the split an align job makes."""
    paths = write_paired(out_dir, n_train=n_train, n_gallery=1, seed=seed)
    data, keys, labels, groups = encode_archive(paths.train, modalities)
    train_idx, val_idx, how = choose_split(labels, [None] * len(keys), groups, seed)
    return PairedSet(data, keys, labels, groups, train_idx, val_idx, how)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)
