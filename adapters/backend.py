"""Choose the metadata store + queue implementation from Settings.

Redis when `redis_url` is set (deployments), else the embedded SQLite file in data_dir. Another backend
(e.g. Postgres) is one more entry in BACKENDS keyed by its URL scheme.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from adapters.settings import Settings
from adapters.store import JobQueue, MetadataStore


@dataclass
class Backend:
    store: MetadataStore
    queue: JobQueue

    async def close(self) -> None:
        await self.queue.close()
        await self.store.close()


def _open_redis(settings: Settings) -> Backend:
    from adapters.redis_store import RedisJobQueue, RedisMetadataStore, connect

    # One client (one connection pool) for both: blocking reads take their own pooled connection.
    client = connect(settings)
    return Backend(RedisMetadataStore(client, settings), RedisJobQueue(client, settings))


def _open_sqlite(settings: Settings) -> Backend:
    from adapters.sqlite_store import SqliteJobQueue, SqliteMetadataStore, open_db

    db = open_db(settings.sqlite_path)
    return Backend(SqliteMetadataStore(db), SqliteJobQueue(db, settings))


BACKENDS: dict[str, Callable[[Settings], Backend]] = {
    "redis": _open_redis,
    "rediss": _open_redis,
    "unix": _open_redis,
}


def open_backend(settings: Settings) -> Backend:
    if not settings.redis_url:
        return _open_sqlite(settings)
    scheme = urlsplit(settings.redis_url).scheme
    try:
        opener = BACKENDS[scheme]
    except KeyError:
        raise ValueError(
            f"METALORA_REDIS_URL scheme {scheme!r} is not supported (use one of {sorted(BACKENDS)})"
        ) from None
    return opener(settings)
