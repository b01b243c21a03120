"""Part 8: examples to first adapted token. `POST /adapt` with 100 short examples and the default procedure (no
options: the worker's defaults), then the first streamed token of the new adapter, broken down, and the first request
to a fresh adapter cold (vLLM loads it on demand, as before versions were warmed) vs warm (loaded by the worker
before the job reported succeeded), side by side in the same run.

    python -m benchmarks.first_token --out results/bench      # starts its own stack; merges into results.json

Where each figure comes from (one job per repeat, after one warm-up job that is not recorded):
- submit: the POST /adapt round trip (validation, token counting, the store write);
- queue pickup: job.started_at - job.created_at (store timestamps);
- tokenisation, LoRA reset, holdout evaluation (before + after), K steps: the engine's metrics.timings;
- write: the PEFT save into the adapter store (metrics.timings.write_s); load: the worker's warm-up (the folder's
  checksums verified, /v1/load_lora_adapter on every replica, the checksums again: metrics.warm.seconds);
- register + bookkeeping: the rest of the worker's time (reading the examples, progress writes, finish_job);
- notice: when this client's 20 ms poll of the store saw `succeeded`, minus job.finished_at;
- first token: time to the first streamed text chunk of the first request naming the adapter.
Cold vs warm: after the warm first request and a few steady ones, the version is unloaded from vLLM
(/v1/unload_lora_adapter) and the next request pays the on-demand load through vLLM's resolver: the cold first
request every new version paid before. Base-model requests are the reference. Then the same pair while 8 clients
keep the engine busy (cold: unloaded; warm: unloaded, then loaded ahead with the worker's own call).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adapters.backend import open_backend
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.settings import Settings
from adapters.warmup import UNLOAD_PATH, load_everywhere
from benchmarks.common import REPO, log, machine_info, median, write_json
from tests.stack_data import examples
from trainer.provenance import git_commit

N_EXAMPLES = 100
TARGET_S = 5.0
MAX_TOKENS = 8
PROMPT = "Word: teapot\nAnswer:"
POLL_S = 0.02
JOB_TIMEOUT_S = 900.0
STEADY_REQUESTS = 3
# The first request to a new version while the engine is busy, as in part 2 where a cold load cost most.
BUSY_CLIENTS = 8
BUSY_MAX_TOKENS = 32
BUSY_RAMP_S = 2.0


async def time_to_first_token(client: httpx.AsyncClient, body: dict) -> tuple[float, float]:
    """(seconds to the first streamed text chunk, seconds to the end) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"completion failed: {response.status_code} {response.text[:300]}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:") and '"text":"' in line and '"text":""' not in line:
                first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0


def engine_client(vllm_key: str | None) -> httpx.AsyncClient:
    """Straight to the replica (unloads, the warm-up's own load), with the key vLLM requires of its callers."""
    return httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {vllm_key}"} if vllm_key else {})


async def unload(client: httpx.AsyncClient, vllm: str, served: str) -> None:
    response = await client.post(vllm + UNLOAD_PATH, json={"lora_name": served})
    if response.status_code != 200:
        raise RuntimeError(f"unload for a cold request: {response.status_code} {response.text[:300]}")


async def first_requests_under_load(client: httpx.AsyncClient, engine: httpx.AsyncClient, vllm: str, served: str,
                                    lora_path: str, request: dict, adapter_request: dict, cold_first: bool) -> dict:
    """The first request to the version while BUSY_CLIENTS stream base-model completions: cold (unloaded, so
    loaded on demand) and warm (loaded ahead with the worker's own call), in the order given."""
    stop = asyncio.Event()

    async def background() -> None:
        while not stop.is_set():
            await time_to_first_token(client, {**request, "max_tokens": BUSY_MAX_TOKENS, "ignore_eos": True})

    load = [asyncio.create_task(background()) for _ in range(BUSY_CLIENTS)]
    try:
        await asyncio.sleep(BUSY_RAMP_S)
        out = {}
        for kind in (("cold", "warm") if cold_first else ("warm", "cold")):
            await unload(engine, vllm, served)
            if kind == "warm":
                loaded = await load_everywhere(engine, [vllm], served, lora_path)
                if not loaded.warm:
                    raise RuntimeError(f"warm load failed: {loaded.to_dict()}")
            out[kind], _ = await time_to_first_token(client, adapter_request)
        return out
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)


async def one_job(gateway: str, vllm: str, data_dir: Path, base_model: str, name: str, run: int = 0,
                  vllm_key: str | None = None) -> dict:
    backend = open_backend(Settings(data_dir=data_dir))
    request = {"model": base_model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    adapter_request = {**request, "adapter": name}
    try:
        async with httpx.AsyncClient(base_url=gateway, timeout=600) as client, engine_client(vllm_key) as engine:
            t_submit = time.time()
            response = await client.post("/adapt", json={"adapter": name, "examples": examples("square", N_EXAMPLES)})
            t_accepted = time.time()
            if response.status_code != 202:
                raise RuntimeError(f"/adapt: {response.status_code} {response.text[:300]}")
            job_id = response.json()["id"]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not (job := await backend.store.get_job(job_id)).status.finished:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} still {job.status.value} after {JOB_TIMEOUT_S:.0f}s")
                await asyncio.sleep(POLL_S)
            t_seen = time.time()
            if job.status.value != "succeeded":
                raise RuntimeError(f"job {job_id} {job.status.value}: {job.error}")
            warm_first, _ = await time_to_first_token(client, adapter_request)
            t_first_token = t_seen + warm_first  # wall clock at the first token
            steady = [(await time_to_first_token(client, adapter_request))[0] for _ in range(STEADY_REQUESTS)]
            served = vllm_name(DEFAULT_TENANT, name, job.version)
            await unload(engine, vllm, served)
            cold_first, _ = await time_to_first_token(client, adapter_request)
            base = [(await time_to_first_token(client, request))[0] for _ in range(STEADY_REQUESTS)]
            lora_path = str(Settings(data_dir=data_dir).adapter_root.resolve() / served)
            busy = await first_requests_under_load(client, engine, vllm, served, lora_path, request, adapter_request,
                                                   cold_first=run % 2 == 1)
    finally:
        await backend.close()
    m = job.metrics
    timings, warm = m.get("timings", {}), m.get("warm", {})
    worker_s = job.finished_at - job.started_at
    accounted = m["seconds"] + timings.get("write_s", 0.0) + warm.get("seconds", 0.0)
    engine_other = m["seconds"] - sum(timings.get(k, 0.0) for k in ("encode_s", "reset_s", "eval_s", "steps_s"))
    breakdown = {
        "submit": t_accepted - t_submit,
        "queue_pickup": job.started_at - job.created_at,
        "tokenisation": timings.get("encode_s"),
        "lora_reset": timings.get("reset_s"),
        "holdout_evaluation": timings.get("eval_s"),
        "k_steps": timings.get("steps_s"),
        "engine_other": engine_other,
        "write": timings.get("write_s"),
        "load_into_vllm": warm.get("seconds"),
        "register_and_bookkeeping": worker_s - accounted,
        "notice": t_seen - job.finished_at,
        "first_token": warm_first,
    }
    return {
        "job_id": job_id, "steps": m["steps"], "num_train": m["num_train"], "num_holdout": m["num_holdout"],
        "init": m.get("init"), "loss_before": m["loss_before"], "loss_after": m["loss_after"],
        "step_seconds": m.get("step_seconds"), "warm": warm,
        "breakdown_s": breakdown, "total_s": t_first_token - t_submit,
        "first_token_s": {"warm_first": warm_first, "cold_first": cold_first, "steady": median(steady),
                          "base": median(base), "warm_first_busy": busy["warm"], "cold_first_busy": busy["cold"]},
    }


def summarize(rows: list[dict]) -> dict:
    def med(get):
        values = [v for v in (get(r) for r in rows) if v is not None]
        return median(values)

    keys = rows[0]["breakdown_s"].keys()
    total = med(lambda r: r["total_s"])
    return {
        "breakdown_median_s": {k: med(lambda r, k=k: r["breakdown_s"][k]) for k in keys},
        "total_median_s": total,
        "everything_but_k_steps_median_s": med(lambda r: r["total_s"] - r["breakdown_s"]["k_steps"]),
        "first_token_median_s": {k: med(lambda r, k=k: r["first_token_s"][k]) for k in (
            "warm_first", "cold_first", "steady", "base", "warm_first_busy", "cold_first_busy")},
        "cold_minus_warm_first_token_median_s": med(
            lambda r: r["first_token_s"]["cold_first"] - r["first_token_s"]["warm_first"]),
        "cold_minus_warm_first_token_busy_median_s": med(
            lambda r: r["first_token_s"]["cold_first_busy"] - r["first_token_s"]["warm_first_busy"]),
        "target_total_s": TARGET_S, "target_met": total is not None and total <= TARGET_S,
    }


def first_token(gateway: str, vllm: str, data_dir: Path, base_model: str, repeats: int,
                vllm_key: str | None = None) -> dict:
    """`vllm_key`: the stack's engine key (METALORA_VLLM_API_KEY), when its vLLM requires one."""
    log("part 8: warm-up job (not recorded)")
    asyncio.run(one_job(gateway, vllm, data_dir, base_model, "ft-warmup", vllm_key=vllm_key))
    rows = []
    for r in range(repeats):
        rows.append(asyncio.run(one_job(gateway, vllm, data_dir, base_model, f"ft-{r}", r, vllm_key)))
        row, ft = rows[-1], rows[-1]["first_token_s"]
        log(f"part 8 run {r + 1}/{repeats}: POST /adapt -> first adapted token {row['total_s']:.2f}s (K steps"
            f" {row['breakdown_s']['k_steps']:.2f}s); first token warm {ft['warm_first']:.3f}s, cold"
            f" {ft['cold_first']:.3f}s; under load warm {ft['warm_first_busy']:.3f}s, cold {ft['cold_first_busy']:.3f}s")
    return {"config": {"examples": N_EXAMPLES, "procedure": "default (no options: the worker's defaults)",
                       "max_tokens": MAX_TOKENS, "prompt": PROMPT, "repeats": repeats, "poll_s": POLL_S,
                       "cold": "the version unloaded from vLLM (/v1/unload_lora_adapter), then requested: vLLM's"
                               " resolver loads it on demand, as every new version's first request did before",
                       "busy": f"{BUSY_CLIENTS} clients streaming {BUSY_MAX_TOKENS}-token base completions meanwhile;"
                               " warm = loaded ahead with /v1/load_lora_adapter (the worker's call); cold and warm"
                               " alternate in order run by run"},
            "runs": rows, "summary": summarize(rows)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench", help="folder of results.json / summary.md to merge into")
    p.add_argument("--repeats", type=int, default=3, help="recorded jobs (after one warm-up job)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import start_stack, stop_stack  # the stack harness, as benchmarks/run_all.py uses it

    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    tmp = Path(tempfile.mkdtemp(prefix="metalora-first-token-"))
    t0 = time.perf_counter()
    vllm_key = secrets.token_urlsafe(24)  # the stack's engine key, so this client may unload and load there
    stack = start_stack(tmp, {"METALORA_DATA_DIR": str(tmp / "data"), "METALORA_VLLM_API_KEY": vllm_key})
    log(f"stack up in {time.perf_counter() - t0:.0f}s: {stack.url}")
    try:
        result = first_token(stack.url, stack.env["METALORA_VLLM_URLS"], tmp / "data", stack.base_model,
                             args.repeats, vllm_key)
    finally:
        stop_stack(stack)
    result.update(command="python -m benchmarks.first_token " + " ".join(argv or sys.argv[1:]),
                  git_commit=git_commit(), machine=machine_info(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(out / "first_token.json", result)
    merge(out, result)


def merge(out: Path, result: dict) -> None:
    """Into results.json as part 8 (the other parts' figures stay), and summary.md re-rendered."""
    from benchmarks.report import write_summary

    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["first_token"] = result
    write_json(path, results)
    write_summary(results, out, sorted(p.name for p in out.glob("*.png")))
    log(f"part 8 merged into {path} and {out / 'summary.md'}")


if __name__ == "__main__":
    main()
