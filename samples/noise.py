"""Label noise planted on purpose: a copy of a labelled archive with a share of its training
labels changed to another class (seeded), and the answer key of what was changed. The label
issue tests and ``bench/label_issues.py`` measure how many of the flips a train job finds."""

from __future__ import annotations

import csv
import io
import random
import tarfile
from collections.abc import Collection
from pathlib import Path


def read_labels(archive: Path) -> list[dict[str, str]]:
    """The rows of an archive's labels.csv."""
    with tarfile.open(archive) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("labels.csv"))
        data = tf.extractfile(member).read()  # type: ignore[union-attr]
    return list(csv.DictReader(io.StringIO(data.decode())))


def flip_labels(source: Path, target: Path, share: float, seed: int = 0,
                fix: dict[str, str] | None = None, val: Collection[str] | None = None
                ) -> dict[str, tuple[str, str]]:
    """Write ``source`` (a tar.gz with a labels.csv) to ``target`` with ``share`` of its train
    split's labels flipped to another class, drawn with ``seed``; ``fix`` then sets keys to
    given labels (a correction). ``val``: the keys written to the val split, every other item
    to train, before the flips are drawn (so a validation label is never flipped, and the
    split no longer depends on the labels). Returns per flipped key (true label, label given)."""
    with tarfile.open(source) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                   for m in tf.getmembers()]
    index = next(i for i, (m, _) in enumerate(members) if m.name.endswith("labels.csv"))
    rows = list(csv.DictReader(io.StringIO(members[index][1].decode())))
    if val is not None:
        for r in rows:
            r["split"] = "val" if r["key"] in val else "train"
    classes = sorted({r["label"] for r in rows})
    train = [r for r in rows if r.get("split", "train") in ("train", "", None)]
    rng = random.Random(seed)
    flipped: dict[str, tuple[str, str]] = {}
    for r in rng.sample(train, round(share * len(train))):
        new = rng.choice([c for c in classes if c != r["label"]])
        flipped[r["key"]] = (r["label"], new)
        r["label"] = new
    for r in rows:
        if fix and r["key"] in fix:
            r["label"] = fix[r["key"]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    members[index] = (members[index][0], out.getvalue().encode())
    with tarfile.open(target, "w:gz") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return flipped
