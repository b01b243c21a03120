"""Retention: after a version turns ready, remove its adapter's versions beyond the newest
`Settings.retain_versions` ready ones (records first, then each one's load on the replicas and its files).

The records go first, in one store transaction (MetadataStore.prune_versions): from then on nobody resolves a
pruned version, and its name pinned is 404 version_pruned. The files and loads go after, best effort: a process
that dies in between leaves folders no record names, which the next delete of the adapter does not see either
(noted in README, Limits and retention). Whoever makes a version ready runs this: the worker after a job, the
gateway after an upload.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from adapters.artifacts import ArtifactStore
from adapters.names import vllm_name
from adapters.records import AdapterVersion
from adapters.store import MetadataStore

log = logging.getLogger("metalora.retention")


def folder_bytes(folder: Path) -> int:
    """Bytes of a version's files (what counts against the tenant's stored-bytes quota)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


async def prune(store: MetadataStore, artifacts: ArtifactStore, tenant: str, adapter: str, keep: int,
                unload: Callable[[str], Awaitable[object]]) -> list[AdapterVersion]:
    """Apply retention to one adapter; `unload(vllm_name)` drops a pruned version from every replica. Returns the
    versions removed. Never raises for the files or the unloads: the version that just turned ready stands."""
    pruned = await store.prune_versions(tenant, adapter, keep)
    for version in pruned:
        name = vllm_name(tenant, version.adapter, version.version)
        try:
            await unload(name)
            await asyncio.to_thread(artifacts.delete, name)
        except Exception as exc:
            log.warning("retention removed %s from the records but not all of it from the replicas or the disk:"
                        " %s: %s", name, type(exc).__name__, exc)
    if pruned:
        log.info("retention: %s/%s keeps its newest %d ready versions; removed %s", tenant, adapter, keep,
                 [v.version for v in pruned])
    return pruned
