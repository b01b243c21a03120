"""Hostile input: path-like and look-alike adapter names, NUL bytes, 10 MB bodies (declared and chunked),
100k-deep JSON. Every one gets a clean 4xx in the one error shape, nothing is written, nothing lands
outside the adapter store, and the gateway stays up (a follow-up /health is 200).

Real stores (SQLite file, real Redis), auth required, a stand-in vLLM replica. The tampered-artifact case
needs the real vLLM and is marked `stack`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote
from uuid import uuid4

import httpx
import pytest

from adapters.api_keys import new_api_key
from adapters.artifacts import LocalArtifactStore
from adapters.backend import open_backend
from adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.settings import Settings
from adapters.warmup import load_everywhere
from drill_records import write_record
from gateway_helpers import ServerThread, fake_replica, gateway_client, tokenizer_dir

REDIS_URL = "redis://127.0.0.1:6379/0"
GOOD = [{"prompt": "hello world", "completion": "positive"}]
TEN_MB = 10 * 1024 * 1024

HOSTILE_NAMES = [
    "..", "../x", "../../etc/passwd", "a/b", "/abs", "a\\b", "x\x00", "\x00", "a..b", ".hidden", "x%2F..",
    "~x", "default~x", "x@v1@v2", "x@v0", "x@v-1",
    "\u0455entiment",  # Cyrillic dze, looks like "s"
    "sent\u0131ment",  # dotless i
    "\uff53entiment",  # full-width s
    "sentiment\u200b",  # zero-width space
    "sentime\u0301nt",  # combining accent
    "SENTIMENT", "a" * 65, "a" * 10_000, " sentiment", "sentiment\n",
]


@pytest.fixture(scope="module")
def replica():
    app = fake_replica("abuse")
    server = ServerThread(app).start()
    yield app, server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path, replica):
    app, server = replica
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), vllm_urls=[server.url],
                  health_interval_s=0.1, auth="required")
    if request.param == "sqlite":
        settings = Settings(redis_url=None, **common)
    else:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=f"test-abuse-{uuid4().hex}", **common)
    backend = open_backend(settings)
    record, key = new_api_key("acme")
    await backend.store.create_api_key(record)
    try:
        async with gateway_client(settings, backend) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            yield client, backend, settings
    finally:
        await backend.close()
        if settings.redis_url:
            import redis.asyncio as aioredis

            r = aioredis.from_url(settings.redis_url)
            keys = [k async for k in r.scan_iter(match=f"{settings.redis_prefix}:*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()


def assert_clean_4xx(response, statuses=(400, 404, 405, 413, 422)) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


async def assert_still_up(client, backend) -> None:
    health = await client.get("/health")
    assert health.status_code == 200, health.text
    assert await backend.store.list_adapters("acme") == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_adapter_names_are_rejected_everywhere(env, name):
    client, backend, settings = env
    assert_clean_4xx(await client.post("/adapt", json={"adapter": name, "examples": GOOD}), (400,))
    for body in ({"model": name, "prompt": "x"}, {"adapter": name, "prompt": "x"}):
        assert_clean_4xx(await client.post("/v1/completions", json=body), (400, 404))
    path = "/v1/adapters/" + quote(name, safe="")
    for method in ("GET", "DELETE"):
        # 400 (invalid name) or 404 (no such route once the path is decoded), never a file-system access.
        assert_clean_4xx(await client.request(method, path), (400, 404))
    await assert_still_up(client, backend)
    # Nothing appeared outside (or inside) the adapter store.
    assert not settings.adapter_root.exists() or list(settings.adapter_root.iterdir()) == []
    # Nothing written anywhere under the test's folder but the store itself.
    written = {p.name for p in settings.data_dir.parent.rglob("*") if p.is_file()} - {"tokenizer.json"}
    assert written <= {"metalora.db", "metalora.db-shm", "metalora.db-wal"}, written


async def test_nul_bytes_in_examples_are_400(env):
    client, backend, _ = env
    for example in ({"prompt": "a\x00b", "completion": "c"}, {"prompt": "a", "completion": "\x00"}):
        assert_clean_4xx(await client.post("/adapt", json={"adapter": "x", "examples": [example]}), (400,))
    await assert_still_up(client, backend)


@pytest.mark.parametrize("path", ["/adapt", "/v1/completions"])
async def test_ten_megabyte_bodies_are_413(env, path):
    client, backend, _ = env
    blob = json.dumps({"adapter": "x", "model": "x", "prompt": "a" * TEN_MB,
                       "examples": [{"prompt": "a" * TEN_MB, "completion": "b"}]}).encode()
    error = assert_clean_4xx(await client.post(path, content=blob,
                                               headers={"content-type": "application/json"}), (413,))
    assert error["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the limit must hold while streaming too
        for start in range(0, len(blob), 64 * 1024):
            yield blob[start:start + 64 * 1024]

    assert_clean_4xx(await client.post(path, content=chunked(), headers={"content-type": "application/json"}),
                     (413,))
    await assert_still_up(client, backend)


@pytest.mark.parametrize("depth", [100_000, 5_000, 1_100])
async def test_deeply_nested_json_is_400(env, depth):
    client, backend, _ = env
    nested = "[" * depth + "]" * depth
    bodies = {
        "/adapt": [nested, '{"adapter": "x", "examples": %s}' % nested],
        "/v1/completions": [nested, '{"model": "x", "prompt": %s}' % nested,
                            '{"model": "x", "stream": true, "extra": {"a": %s}}' % nested],
    }
    for path, contents in bodies.items():
        for content in contents:
            response = await client.post(path, content=content, headers={"content-type": "application/json"})
            assert_clean_4xx(response, (400,))
    await assert_still_up(client, backend)


async def test_moderately_nested_json_is_forwarded_or_rejected_cleanly(env, replica):
    client, backend, _ = env
    base = client.app.state.gateway.base_model_name
    nested = "[" * 500 + "1" + "]" * 500
    response = await client.post("/v1/completions", content='{"model": %s, "prompt": "x", "extra": %s}'
                                 % (json.dumps(base), nested), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert_clean_4xx(await client.post("/adapt", content='{"adapter": "x", "examples": %s}' % nested,
                                       headers={"content-type": "application/json"}), (400,))
    await assert_still_up(client, backend)


async def test_odd_json_values(env):
    client, backend, _ = env
    for content in ['{"adapter": "x", "examples": NaN}', '{"adapter": 1e999, "examples": []}',
                    '{"adapter": "x", "examples": [{"prompt": "a", "completion": "b"}], "steps": '
                    + "9" * 5000 + "}", '"just a string"', "null", "\ufeff{}", b"\xff\xfe{}"]:
        response = await client.post("/adapt", content=content, headers={"content-type": "application/json"})
        assert_clean_4xx(response, (400,))
        response = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        if content == "\ufeff{}":  # a BOM-prefixed {}: a request for the base model (model may be left out)
            assert response.status_code == 200, response.text
            continue
        assert_clean_4xx(response, (400, 404))
    await assert_still_up(client, backend)


# ---------------------------------------------------------------- tampered artifact
# A port nothing listens on: a replica the warm-up would report unreachable if it asked it at all.
CLOSED_REPLICA = "http://127.0.0.1:9"


def stored_version(root: Path, name: str) -> Path:
    store = LocalArtifactStore(root)
    with store.staging(name) as tmp:
        (tmp / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 4}')
        (tmp / ADAPTER_WEIGHTS).write_bytes(b"weights as written")
    return store.path(name)


@pytest.mark.parametrize("tamper", ["modified", "missing", "checksums"])
async def test_warm_up_registers_nothing_whose_files_fail_their_checksums(tmp_path, tamper):
    folder = stored_version(tmp_path, "default~x@v1")
    if tamper == "modified":
        (folder / ADAPTER_WEIGHTS).write_bytes(b"weights changed afterwards")
    elif tamper == "missing":
        (folder / ADAPTER_CONFIG).unlink()
    else:
        (folder / "metalora_checksums.json").write_text("{ not json")
    async with httpx.AsyncClient() as client:
        result = await load_everywhere(client, [CLOSED_REPLICA], folder.name, str(folder))
    # Refused before any replica was asked: the closed port is not even reported unreachable.
    assert result.corrupt and folder.name in result.corrupt
    assert (result.loaded, result.refused, result.unreachable, result.warm) == ([], {}, {}, False)
    assert result.rejected_by_engine() == result.corrupt


async def test_warm_up_asks_the_replicas_once_the_files_check_out(tmp_path):
    folder = stored_version(tmp_path, "default~x@v1")
    async with httpx.AsyncClient() as client:
        result = await load_everywhere(client, [CLOSED_REPLICA], folder.name, str(folder))
    assert result.corrupt is None and list(result.unreachable) == [CLOSED_REPLICA] and not result.warm


# ---------------------------------------------------------------- tampered artifact (real vLLM)
def engine(stack) -> httpx.Client:
    """A client straight to the stack's vLLM replica, with its key when it requires one."""
    key = stack.env.get("METALORA_VLLM_API_KEY")
    return httpx.Client(base_url=stack.env["METALORA_VLLM_URLS"].split(",")[0], timeout=120,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def trained(client, body: dict) -> dict:
    """Submit a job and wait for its end: on a busy 2-core box two steps of the real model can take minutes."""
    job = client.post("/adapt", json=body)
    assert job.status_code == 202, job.text
    job = job.json()
    for _ in range(3):
        if job["status"] not in ("queued", "running"):
            break
        job = client.get(f"/adapt/{job['id']}", params={"wait": "true", "timeout": 600}, timeout=660).json()
    return job


TAMPER_EXAMPLES = [{"prompt": f"Word: {w}\nAnswer:", "completion": f" [[{w}]]"}
                   for w in "apple river candle mountain pencil garden window bottle".split()]


@pytest.mark.stack
def test_tampered_adapter_folder_is_an_error_answer_not_an_outage(stack):
    """A ready adapter whose folder is changed on disk after training (garbage safetensors; a broken
    adapter_config.json). The gateway does not read artifacts: it forwards, and relays vLLM's answer in
    our error shape. What vLLM answers is recorded in results/drills/abuse_tampered_adapter.json."""
    name = f"tampered-{uuid4().hex[:6]}"
    observed = {}
    with stack.client() as client:
        for version, tamper in ((1, "safetensors"), (2, "config")):
            # A seed per version: the same request again would get the first job back (adapters/idempotency.py).
            job = trained(client, {"adapter": name, "examples": TAMPER_EXAMPLES, "steps": 2, "seed": version})
            assert job["status"] == "succeeded", job
            folder = stack.data_dir / "adapters" / f"default~{name}@v{version}"
            assert folder.is_dir()
            if tamper == "safetensors":
                (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 64)
            else:
                (folder / "adapter_config.json").write_text("{ this is not json")
            # The version was registered in vLLM before its job succeeded (warm first request), and vLLM serves
            # the weights it read then (test_folder_tampered_after_warm_registration_never_kills_the_engine).
            # Unregister it, so the next request makes vLLM load the tampered folder afresh through its resolver,
            # as after a vLLM restart: the path this test is about.
            with engine(stack) as vllm:
                unload = vllm.post("/v1/unload_lora_adapter", json={"lora_name": folder.name})
            assert unload.status_code == 200, unload.text
            started = time.monotonic()
            response = client.post("/v1/completions", json={"model": f"{name}@v{version}", "prompt": "Word: x\nAnswer:",
                                                            "max_tokens": 4}, timeout=120)
            observed[tamper] = {"status": response.status_code, "seconds": round(time.monotonic() - started, 1),
                                "body": response.text[:1000]}
            assert response.status_code >= 400, response.text
            body = response.json()
            assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
            # The internal vLLM name (with the tenant) does not leak into the message.
            assert f"default~{name}" not in body["error"]["message"]

            # The engine survived: health is green and the base model (and a good adapter) still answer.
            assert client.get("/health").status_code == 200
            base = client.post("/v1/completions", json={"model": stack.base_model, "prompt": "Hi", "max_tokens": 2})
            assert base.status_code == 200, base.text
    write_record("abuse_tampered_adapter", observed)
    print("\ntampered adapter answers:", json.dumps(observed, indent=2))


def completion(client, model: str, max_tokens: int = 4):
    return client.post("/v1/completions", json={"model": model, "prompt": "Word: teapot\nAnswer:",
                                                "max_tokens": max_tokens, "temperature": 0, "logprobs": 1},
                       timeout=120)


def vllm_models(stack) -> set[str]:
    with engine(stack) as vllm:
        return {m["id"] for m in vllm.get("/v1/models").json()["data"]}


@pytest.mark.stack
async def test_folder_tampered_after_warm_registration_never_kills_the_engine(stack, tmp_path):
    """A version's folder corrupted after the worker registered it in vLLM (before the job reported succeeded)
    and before its first request. vLLM serves the weights it read at registration, after the checksums were
    verified (adapters/warmup.py): the first request is answered from them, the engine keeps running (the same
    vLLM process: a restarted one would have forgotten every registration), and the base model and another
    adapter keep answering as before. A new registration of the tampered folder is refused by its checksums."""
    name, bystander = f"late-{uuid4().hex[:6]}", f"bystander-{uuid4().hex[:6]}"
    with stack.client() as client, engine(stack) as vllm:
        def train(adapter: str, seed: int) -> dict:
            job = trained(client, {"adapter": adapter, "examples": TAMPER_EXAMPLES, "steps": 2, "seed": seed})
            assert job["status"] == "succeeded", job
            assert job["metrics"]["warm"]["warm"] is True, job["metrics"]["warm"]
            return job

        train(bystander, 1)
        bystander_before = completion(client, bystander)
        base_before = completion(client, stack.base_model)
        assert bystander_before.status_code == 200 and base_before.status_code == 200, bystander_before.text

        for version, tamper in ((1, "safetensors"), (2, "config")):
            train(name, version)
            folder = stack.data_dir / "adapters" / f"default~{name}@v{version}"
            # What the worker verified and vLLM read, registered straight in vLLM under another name: the
            # reference the tampered version must answer like.
            intact = tmp_path / f"intact-v{version}"
            intact.mkdir()
            for filename in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                (intact / filename).write_bytes((folder / filename).read_bytes())
            reference_name = f"reference-{name}-v{version}"
            loaded = vllm.post("/v1/load_lora_adapter", json={"lora_name": reference_name, "lora_path": str(intact)})
            assert loaded.status_code == 200, loaded.text

            if tamper == "safetensors":
                (folder / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage, not a safetensors file" * 64)
            else:
                (folder / ADAPTER_CONFIG).write_text("{ this is not json")

            response = completion(client, f"{name}@v{version}")
            assert response.status_code == 200, response.text
            reference = vllm.post("/v1/completions", json={
                "model": reference_name, "prompt": "Word: teapot\nAnswer:", "max_tokens": 4, "temperature": 0,
                "logprobs": 1}).json()
            served, expected = response.json()["choices"][0], reference["choices"][0]
            assert served["text"] == expected["text"]
            assert served["logprobs"]["token_logprobs"] == pytest.approx(expected["logprobs"]["token_logprobs"],
                                                                         abs=1e-3)

            # The engine survived: the same process still holds every registration, health is green, and the
            # base model and the other adapter answer as before.
            assert {f"default~{name}@v{version}", f"default~{bystander}@v1", reference_name} <= vllm_models(stack)
            assert client.get("/health").status_code == 200
            for model, before in ((bystander, bystander_before), (stack.base_model, base_before)):
                again = completion(client, model)
                assert again.status_code == 200, again.text
                assert again.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]

        # Registering the tampered folder afresh (a retried job, an upload): refused by its checksums, so no
        # replica ever holds a version read from files that are not the ones written.
        served_name = f"default~{name}@v1"
        unloaded = vllm.post("/v1/unload_lora_adapter", json={"lora_name": served_name})
        assert unloaded.status_code == 200, unloaded.text
        async with httpx.AsyncClient(headers=vllm.headers) as http:
            result = await load_everywhere(http, [str(vllm.base_url)], served_name,
                                           str(stack.data_dir / "adapters" / served_name))
        assert result.corrupt and "adapter_model.safetensors" in result.corrupt and not result.loaded
        assert served_name not in vllm_models(stack)
