"""A COMMIT that fails (here: a deferred foreign key a temporary trigger violates, which SQLite checks only at
COMMIT) rolls the transaction back and surfaces as StoreUnavailable (503), and the next write succeeds: the
connection is never left inside the failed transaction."""
from __future__ import annotations

import pytest

from adapters.backend import open_backend
from adapters.errors import JobNotFound, StoreUnavailable
from adapters.records import JobStatus
from adapters.settings import Settings
from server.errors import response_for

EXAMPLES = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]


def break_commits(conn) -> None:
    """Every later insert into jobs leaves a dangling deferred reference, so its transaction cannot commit."""
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript("""
        CREATE TEMP TABLE fk_parent (id TEXT PRIMARY KEY);
        CREATE TEMP TABLE fk_child (parent TEXT REFERENCES fk_parent (id) DEFERRABLE INITIALLY DEFERRED);
        CREATE TEMP TRIGGER fail_at_commit AFTER INSERT ON main.jobs BEGIN INSERT INTO fk_child VALUES ('none'); END;
    """)


async def test_failed_commit_rolls_back_and_the_next_write_succeeds(tmp_path):
    backend = open_backend(Settings(data_dir=tmp_path, redis_url=None))
    store = backend.store
    try:
        break_commits(store.db.conn)
        with pytest.raises(StoreUnavailable):
            await store.submit_job("default", "commits", len(EXAMPLES), EXAMPLES, {})
        assert not store.db.conn.in_transaction
        store.db.conn.execute("DROP TRIGGER temp.fail_at_commit")
        job = await store.submit_job("default", "commits", len(EXAMPLES), EXAMPLES, {})
        assert (await store.get_job(job.id)).status is JobStatus.QUEUED
        assert job.version == 1  # the failed submit left nothing behind, not even its version number
        with pytest.raises(JobNotFound):
            await store.get_job("job-" + "0" * 20)
    finally:
        await backend.close()


def test_store_unavailable_is_a_503():
    response = response_for(StoreUnavailable("SQLite store could not commit"))
    assert response.status_code == 503 and response.headers["Retry-After"]
