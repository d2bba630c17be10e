"""Group-disjoint stratified splits: no group on both sides, classes balanced, seeded; and
labels.csv's group carried through ingest to the items and into the trainer's split."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from mmbatch.settings import Settings
from models.training import choose_split, group_split, split_groups
from store import jobs
from store.migrate import upgrade
from store.schema import Item
from worker.ingest import ingest_job
from worker.runtime import Runtime


def _dataset(n_groups: int = 12, per_group: int = 10) -> tuple[list[str], list[str | None]]:
    labels: list[str] = []
    groups: list[str | None] = []
    for g in range(n_groups):
        for i in range(per_group):
            labels.append("abc"[(g + i) % 3])
            groups.append(f"speaker-{g}")
    return labels, groups


def test_no_group_is_on_both_sides() -> None:
    labels, groups = _dataset()
    train, val = group_split(labels, groups, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    # About 20 % to validation, every class there in about its share.
    assert 0.1 <= len(val) / len(labels) <= 0.3
    per_class = Counter(labels[i] for i in val)
    assert set(per_class) == {"a", "b", "c"}


def test_seeded_and_seed_dependent() -> None:
    labels, groups = _dataset(n_groups=30)
    assert group_split(labels, groups, 0.2, 3) == group_split(labels, groups, 0.2, 3)
    draws = {tuple(group_split(labels, groups, 0.2, seed)[1]) for seed in range(6)}
    assert len(draws) > 1


def test_ungrouped_items_are_their_own_groups() -> None:
    labels = ["a", "b"] * 20
    groups: list[str | None] = [None] * 40
    _, val = group_split(labels, groups, 0.25, seed=1)
    assert len(val) == 10 and Counter(labels[i] for i in val) == {"a": 5, "b": 5}


def test_two_groups_give_one_each_and_one_group_gives_no_validation() -> None:
    train, val = group_split(["a", "b", "a", "b"], ["g1", "g1", "g2", "g2"], 0.2, seed=0)
    assert len(train) == 2 and len(val) == 2
    train, val = group_split(["a", "b"], ["g", "g"], 0.2, seed=0)
    assert (train, val) == ([0, 1], [])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        group_split(["a"], ["g"], 1.0, 0)
    with pytest.raises(ValueError, match="1 labels but 2 groups"):
        group_split(["a"], ["g", "h"], 0.2, 0)


def _archive(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "grouped.tar"
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(len(rows) - 1):
            add(f"w{i}.txt", f"word {i}".encode())
        add("labels.csv", "\n".join(rows).encode())
    return path


def test_ingest_keeps_the_group_and_the_trainer_splits_by_it(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    rt = Runtime(settings)
    try:
        rows = ["key,label,group"] + [f"w{i},{'xy'[i % 2]},src{i // 4}" for i in range(24)]
        archive = _archive(tmp_path, rows)
        digest = rt.blobs.put_bytes(archive.read_bytes())
        with rt.db.session() as s:
            job_id = jobs.create_job(s, kind="train", archive_blob=digest,
                                     archive_name=archive.name,
                                     archive_bytes=archive.stat().st_size,
                                     model_version_id=None).id
        assert ingest_job(rt, job_id)
        with rt.db.session() as s:
            items = s.query(Item).filter(Item.job_id == job_id).order_by(Item.id).all()
            got = {it.key: (it.label, it.split, it.group) for it in items}
            assert got["w5"] == ("y", None, "src1")
            items = list(items)
            train, val, how = choose_split([str(it.label) for it in items],
                                           [it.split for it in items],
                                           [it.group for it in items], seed=0)
        assert how.startswith("group-disjoint")
        assert split_groups([it.group for it in items], train, val) == {
            "train": 5, "val": 1, "shared": 0}
    finally:
        rt.close()
