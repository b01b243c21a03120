"""Retention: after a version turns ready, remove its adapter's versions beyond the newest
`Settings.retain_versions` ready ones (records first, then each one's load on the replicas and its files).

The records go first, in one store transaction (MetadataStore.prune_versions): from then on nobody resolves a
pruned version, and its name pinned is 404 version_pruned. The files and loads go after, best effort: a process
that dies in between leaves folders no record names. The next prune of the adapter and its delete sweep those
(`sweep_leftovers`): a folder of a version at or below one just removed, with no record, and not written in the last
LEFTOVER_MIN_AGE_S (so an upload between its rename into place and its record is spared). Whoever makes a version
ready runs this: the worker after a job, the gateway after an upload.
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

# An upload's folder exists a moment before its record; a folder this fresh is never a leftover.
LEFTOVER_MIN_AGE_S = 600.0


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
        try:
            recorded = {v.version for v in (await store.get_adapter(tenant, adapter)).versions}
            for name in await asyncio.to_thread(sweep_leftovers, artifacts, tenant, adapter,
                                                max(v.version for v in pruned), recorded):
                await unload(name)
        except Exception as exc:
            log.warning("retention could not sweep the leftover folders of %s/%s: %s: %s", tenant, adapter,
                        type(exc).__name__, exc)
    return pruned


def sweep_leftovers(artifacts: ArtifactStore, tenant: str, adapter: str, through: int | None, recorded: set[int],
                    min_age_s: float = LEFTOVER_MIN_AGE_S) -> list[str]:
    """Delete the folders of `adapter`'s versions up to `through` (None: all) that no record names (`recorded`: the
    versions the store still has) and that were not written in the last `min_age_s`; the names deleted. A crash
    between a record's removal and its folder's leaves such folders; versions are never reused, so none can belong
    to a later job."""
    removed = []
    for version, age in sorted(artifacts.version_ages(tenant, adapter).items()):
        if (through is None or version <= through) and version not in recorded and age >= min_age_s:
            name = vllm_name(tenant, adapter, version)
            if artifacts.delete(name):
                removed.append(name)
    if removed:
        log.warning("removed %d leftover folder(s) of %s/%s that no record names: %s", len(removed), tenant,
                    adapter, removed)
    return removed
