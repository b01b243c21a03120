"""Load a new adapter version into every reachable vLLM replica before anyone asks for it, so the first request
pays no cold load (reading the folder, building the LoRA weights).

vLLM runs with runtime LoRA updating on (metalora/vllm_command.py), so `POST /v1/load_lora_adapter` registers
the version under its vLLM name and loads its weights into the replica's LoRA cache. The path is the version's
folder in the adapter store, which vLLM's filesystem resolver reads too (the same path on every machine:
docker/compose.yaml mounts the store at the same place). `load_inplace` makes a repeat harmless: a retried job
or a replica that resolved the name on its own answers 200 again instead of "already loaded".

Best effort by design: a replica that is down or slow is skipped, and its first request for the version loads it
through the resolver as before. The worker calls this before marking a trained version ready, the gateway
before registering an uploaded one (where a replica's refusal also rejects the upload).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import httpx

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
LOAD_TIMEOUT_S = 30.0


@dataclass
class WarmResult:
    replicas: int
    loaded: list[str] = field(default_factory=list)
    # url -> {"status", "message"}: the replica answered but did not load it. vLLM answers 500 for an adapter it
    # cannot load (bad shapes, unsupported features) and 404 when it cannot see the folder.
    refused: dict[str, dict] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # url -> transport error: down, skipped
    seconds: float = 0.0

    @property
    def warm(self) -> bool:
        """Every replica that could be reached has the version loaded (and at least one could)."""
        return bool(self.loaded) and not self.refused

    def rejected_by_engine(self) -> str | None:
        """A replica's verdict on the adapter itself (not a 404 about the folder), or None."""
        for url, answer in self.refused.items():
            if answer["status"] != 404:
                return answer["message"]
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "warm": self.warm}


async def load_everywhere(client: httpx.AsyncClient, urls: list[str], lora_name: str, lora_path: str,
                          timeout_s: float = LOAD_TIMEOUT_S) -> WarmResult:
    result = WarmResult(replicas=len(urls))
    started = time.perf_counter()

    async def one(url: str) -> None:
        try:
            response = await client.post(url.rstrip("/") + LOAD_PATH, timeout=timeout_s, json={
                "lora_name": lora_name, "lora_path": lora_path, "load_inplace": True})
        except httpx.HTTPError as exc:
            result.unreachable[url] = type(exc).__name__
            return
        if response.status_code == 200:
            result.loaded.append(url)
        else:
            result.refused[url] = {"status": response.status_code, "message": _message(response)}

    await asyncio.gather(*(one(u) for u in urls))
    result.seconds = time.perf_counter() - started
    return result


async def unload_everywhere(client: httpx.AsyncClient, urls: list[str], lora_name: str,
                            timeout_s: float = 5.0) -> None:
    """Best effort: a version that will not be served must not keep a slot in any replica's LoRA cache."""
    async def one(url: str) -> None:
        try:
            await client.post(url.rstrip("/") + UNLOAD_PATH, json={"lora_name": lora_name}, timeout=timeout_s)
        except httpx.HTTPError:
            pass

    await asyncio.gather(*(one(u) for u in urls))


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"][:300]
    return response.text[:300]
