"""The schema and its migrations on SQLite and PostgreSQL; counters, upserts, the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from store import jobs
from store.db import Database
from store.features import get_features, put_features
from store.migrate import downgrade, upgrade
from store.registry import default_model, promote, register_model
from store.schema import Base

TABLES = {"jobs", "items", "features", "results", "model_versions", "alembic_version",
          "tenants", "api_keys", "job_members", "leases", "webhook_deliveries", "label_events",
          "label_issues", "search_indexes", "index_segments", "uploads", "batches"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db(db_url: str) -> Database:
    upgrade(db_url)
    database = Database(db_url)
    yield database
    database.dispose()


def test_migrations_match_the_schema_and_downgrade(db_url: str) -> None:
    upgrade(db_url)
    database = Database(db_url)
    with database.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == TABLES
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    downgrade(db_url, "base")
    with database.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    database.dispose()


def test_migrating_keeps_the_rows_there_are(db_url: str) -> None:
    """Up to the newest schema and back down, a job's items stay (on SQLite a migration that
    changes a table rebuilds it, and an enforced foreign key once cascaded its drop to them)."""
    upgrade(db_url)
    database = Database(db_url)
    try:
        job_id, ids = _job_with_items(database, 3)
        for target in ("0008", "head"):
            (downgrade if target != "head" else upgrade)(db_url, target)
            with database.engine.connect() as conn:
                left = conn.exec_driver_sql("SELECT count(*) FROM items WHERE job_id = "
                                            f"'{job_id}'").scalar()
            assert left == len(ids), target
    finally:
        database.dispose()


def _job_with_items(db: Database, n: int) -> tuple[str, list[int]]:
    with db.session() as s:
        job = jobs.create_job(s, kind="embed", archive_blob="0" * 64, archive_name="a.zip",
                              archive_bytes=10, model_version_id=None)
        job_id = job.id
        jobs.transition(s, job_id, ("queued",), "ingesting")
        added = jobs.add_items(s, job_id, ({"key": f"k{i}", "media": {"text": {"blob": "b",
                                                                         "name": f"k{i}.txt"}}}
                                           for i in range(n)))
        assert added == n
        assert jobs.transition(s, job_id, ("ingesting",), "running", total=n)
        return job_id, jobs.item_ids(s, job_id)


def test_counters_move_only_for_new_results_and_the_job_finishes_once(db: Database) -> None:
    job_id, ids = _job_with_items(db, 5)
    first = [jobs.ItemOutcome(ids[0], label="a", embedding=np.ones(4)),
             jobs.ItemOutcome(ids[1], error="image k1.jpg: broken"),
             jobs.ItemOutcome(ids[2], label="b")]
    with db.session() as s:
        commit = jobs.record_outcomes(s, job_id, 0, first)
    assert (commit.new_done, commit.new_failed, commit.completed) == (2, 1, False)
    with db.session() as s:  # the same batch delivered again changes nothing
        again = jobs.record_outcomes(s, job_id, 0, first)
    assert (again.new_done, again.new_failed, again.completed) == (0, 0, False)
    with db.session() as s:
        last = jobs.record_outcomes(s, job_id, 0, [jobs.ItemOutcome(i, label="c") for i in ids[2:]])
        assert (last.new_done, last.new_failed, last.completed) == (2, 0, True)
        assert jobs.finish_job(s, job_id)
        assert not jobs.finish_job(s, job_id)
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.done, job.failed, job.total) == ("succeeded", 4, 1, 5)
        page = jobs.results_page(s, job, after=0, limit=10)
        assert [item.key for item, _ in page] == [f"k{i}" for i in range(5)]
        assert page[1][1].error == "image k1.jpg: broken"
        assert np.frombuffer(page[0][1].embedding, dtype="<f4").tolist() == [1, 1, 1, 1]
        assert not jobs.fail_job(s, job_id, "too late")  # terminal states stay


def test_items_are_unique_per_job_key(db: Database) -> None:
    job_id, ids = _job_with_items(db, 3)
    with db.session() as s:
        assert jobs.add_items(s, job_id, [{"key": "k1", "media": {}}, {"key": "new", "media": {}}]) == 1
        assert len(jobs.item_ids(s, job_id)) == 4


def test_feature_cache_round_trip(db: Database) -> None:
    vec = np.arange(8, dtype=np.float32)
    with db.session() as s:
        assert put_features(s, "enc-v1", {"a" * 64: vec}) == 1
        assert put_features(s, "enc-v1", {"a" * 64: vec}) == 0
    with db.session() as s:
        got = get_features(s, "enc-v1", ["a" * 64, "b" * 64])
        assert list(got) == ["a" * 64] and np.array_equal(got["a" * 64], vec)
        assert get_features(s, "enc-v2", ["a" * 64]) == {}


def test_first_model_is_default_and_promote_moves_it(db: Database) -> None:
    with db.session() as s:
        kwargs = dict(fusion="concat", classes=["a", "b"], encoders={}, metrics={}, config={},
                      checkpoint_blob="c" * 64, job_id=None)
        m1 = register_model(s, name="m", **kwargs)
        m2 = register_model(s, name="m", **kwargs)
        assert (m1.version, m2.version) == (1, 2)
        assert m1.is_default and not m2.is_default
        assert default_model(s).id == m1.id
        promote(s, m2.id)
    with db.session() as s:
        assert default_model(s).id == m2.id
