"""What the gateway and the worker share about talking to vLLM replicas besides loading (adapters/warmup.py): the
engine key every call carries, and keeping what a replica has registered in line with the store.

A replica keeps every version it has registered until told otherwise. The gateway unloads a deleted adapter from
every replica it can reach at the time; a replica that was down or unreachable then comes back still holding it,
so whoever brings it back into rotation (the gateway, when its health check sees it recover) lists what it
holds and unloads each version the store no longer has.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

import httpx

from adapters.warmup import unload_everywhere

log = logging.getLogger("metalora.replicas")

LIST_PATH = "/v1/models"
LIST_TIMEOUT_S = 5.0


def engine_headers(api_key: str | None) -> dict[str, str]:
    """Headers every call to a replica carries: vLLM answers 401 on its API without its key (VLLM_API_KEY)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def registered_loras(client: httpx.AsyncClient, url: str) -> list[str]:
    """The LoRA names a replica has registered (its /v1/models entries with a parent model)."""
    response = await client.get(url.rstrip("/") + LIST_PATH, timeout=LIST_TIMEOUT_S)
    response.raise_for_status()
    return [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and m.get("parent")]


async def unload_stale(client: httpx.AsyncClient, url: str, is_stale: Callable[[str], Awaitable[bool]]
                       ) -> list[str]:
    """Unload from one replica every registered LoRA `is_stale` says must not be served; the names unloaded."""
    stale = [name for name in await registered_loras(client, url) if await is_stale(name)]
    for name in stale:
        await unload_everywhere(client, [url], name)
    if stale:
        log.warning("replica %s still held %d deleted version(s); unloaded: %s", url, len(stale), stale)
    return stale
