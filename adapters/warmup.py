"""Load a new adapter version into every reachable vLLM replica before anyone asks for it, so the first request
pays no cold load (reading the folder, building the LoRA weights).

vLLM runs with runtime LoRA updating on (metalora/vllm_command.py), so `POST /v1/load_lora_adapter` registers the
version under its vLLM name, and vLLM reads its tensors into the replica's CPU LoRA cache during that call (its
engine's add_lora), so no completion is needed to force the read: a folder vLLM cannot read is a clean error answer
then, not a crash later. The path is the version's folder in the adapter store, which vLLM's filesystem resolver
reads too (the same path on every machine: docker/compose.yaml mounts the store at the same place).

Integrity. Registration happens once per version, so it is where the files are checked: the folder must match
the sha256 recorded when it was written (adapters/artifacts.py) before any replica is asked, and again after, so
the weights every replica now holds in memory were read from verified files; a mismatch either time leaves the
version registered nowhere (`corrupt`). Registration never sets `load_inplace`: vLLM keeps the request it
registered and hands it to the engine with every completion, and with `load_inplace` the engine core re-reads the
folder at every request, in its step loop, where an unreadable file (a folder corrupted after registration) is
fatal to the engine (SafetensorError -> EngineDeadError) and any changed file is served unverified. Without it
the engine serves the weights read at registration, whatever happens to the folder after. A repeat is made
harmless by asking first: a name a replica already lists (a retried job, a replica that resolved it on its own)
counts as loaded, and so does one whose load answers 4xx because it was registered in between.
What this cannot cover: vLLM reads the folder again when the version was evicted from a replica's CPU LoRA cache
(more than METALORA_VLLM_MAX_CPU_LORAS versions used there since) or the replica restarted (its resolver loads
afresh on first use; a refusal there is an error answer, but an evicted one is re-read inside the engine step).

Best effort by design: a replica that is down or slow is skipped, and its first request for the version loads it
through the resolver as before. The worker calls this before marking a trained version ready, the gateway
before registering an uploaded one (where a replica's refusal, or files that fail their checksums, rejects the
upload).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from adapters.artifacts import verify_folder
from adapters.errors import ArtifactCorrupt

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
MODELS_PATH = "/v1/models"
LOAD_TIMEOUT_S = 30.0


@dataclass
class WarmResult:
    replicas: int
    loaded: list[str] = field(default_factory=list)
    # url -> {"status", "message"}: the replica answered but did not load it. vLLM answers 500 for an adapter it
    # cannot load (bad shapes, unsupported features) and 404 when it cannot see the folder.
    refused: dict[str, dict] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # url -> transport error: down, skipped
    # Why the folder failed its checksums (before or after the replicas read it): registered nowhere.
    corrupt: str | None = None
    seconds: float = 0.0

    @property
    def warm(self) -> bool:
        """Every replica that could be reached has the version loaded (and at least one could)."""
        return bool(self.loaded) and not self.refused and self.corrupt is None

    def rejected_by_engine(self) -> str | None:
        """A verdict on the adapter itself (its files fail their checksums, or a replica refused it other than
        with a 404 about the folder), or None."""
        if self.corrupt is not None:
            return self.corrupt
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
    if not await _intact(result, lora_path):
        result.seconds = time.perf_counter() - started
        return result

    async def one(url: str) -> None:
        base = url.rstrip("/")
        try:
            if await _lists(client, base, lora_name, timeout_s):
                result.loaded.append(url)
                return
            response = await client.post(base + LOAD_PATH, timeout=timeout_s, json={
                "lora_name": lora_name, "lora_path": lora_path})
            if response.status_code == 200 or (400 <= response.status_code < 500 and response.status_code != 404
                                               and await _lists(client, base, lora_name, timeout_s)):
                result.loaded.append(url)
                return
        except httpx.HTTPError as exc:
            result.unreachable[url] = type(exc).__name__
            return
        result.refused[url] = {"status": response.status_code, "message": _message(response)}

    await asyncio.gather(*(one(u) for u in urls))
    if result.loaded and not await _intact(result, lora_path):
        # Changed while the replicas read it: what they hold was not verified, so none may serve it.
        await unload_everywhere(client, result.loaded, lora_name)
        result.loaded.clear()
    result.seconds = time.perf_counter() - started
    return result


async def _intact(result: WarmResult, lora_path: str) -> bool:
    try:
        await asyncio.to_thread(verify_folder, Path(lora_path))
    except ArtifactCorrupt as exc:
        result.corrupt = str(exc)
        return False
    return True


async def _lists(client: httpx.AsyncClient, base: str, lora_name: str, timeout_s: float) -> bool:
    """Whether the replica already serves the name (registered by an earlier load or by its resolver)."""
    response = await client.get(base + MODELS_PATH, timeout=timeout_s)
    if response.status_code != 200:
        return False
    try:
        return any(m.get("id") == lora_name for m in response.json().get("data", []))
    except (ValueError, AttributeError):
        return False


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
