"""Helpers several test modules share (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import os

REDIS_URL = os.environ.get("METALORA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def drop_redis_keys(settings) -> None:
    """Delete every key under a test's own prefix, so runs sharing the machine's Redis never collide."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
