"""Every bad input to the gateway -> the right status, the one error shape, and nothing written.

Runs against the real stores (SQLite file and real Redis with a unique prefix) and the real tokenizer
(or a tiny one when the base model is not prepared). No vLLM: the upstream URL points at a closed port.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from adapters.names import DEFAULT_TENANT
from adapters.settings import Settings
from gateway_helpers import free_port, gateway_env, tokenizer_dir
from helpers import REDIS_URL

MAX_EXAMPLES = 5
MAX_BODY = 64 * 1024
GOOD = [{"prompt": "hello world", "completion": "positive"}]


def make_settings(kind: str, tmp_path: Path, **extra) -> Settings:
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)),
                  vllm_urls=[f"http://127.0.0.1:{free_port()}"], health_interval_s=0.2,
                  max_examples=MAX_EXAMPLES, max_body_bytes=MAX_BODY, **extra)
    if kind == "sqlite":
        return Settings(redis_url=None, **common)
    return Settings(redis_url=REDIS_URL, redis_prefix=f"test-gw-{uuid4().hex}", **common)




@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path):
    settings = make_settings(request.param, tmp_path)
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings


async def assert_nothing_written(backend, settings: Settings) -> None:
    assert await backend.store.list_adapters(DEFAULT_TENANT) == []
    if settings.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(settings.redis_url)
        try:
            written = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")
                       if b":job:" in k or b":adapter" in k or b":jobs:" in k]
        finally:
            await client.aclose()
        assert written == []
    else:
        with sqlite3.connect(settings.sqlite_path) as db:
            for table in ("jobs", "versions", "examples", "queue", "counters"):
                assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def assert_error(response, status: int, code: str | None = None, mentions: tuple[str, ...] = ()) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    for text in mentions:
        assert text in error["message"], (text, error["message"])
    return error


def adapt(adapter="sentiment", examples=None, **options):
    return {"adapter": adapter, "examples": GOOD if examples is None else examples, **options}


# ---------------------------------------------------------------- POST /adapt: bad inputs
@pytest.mark.parametrize("name", [
    "../x", "a/b", "UPPER", "x\u0000", "a" * 65, "\u0455entiment", "", ".hidden", "-x", "a..b", "x@v1", "~x",
])
async def test_invalid_adapter_names_are_400_and_nothing_is_written(env, name):
    client, backend, settings = env
    response = await client.post("/adapt", json=adapt(adapter=name))
    assert_error(response, 400, "invalid_adapter_name")
    await assert_nothing_written(backend, settings)


@pytest.mark.parametrize("examples, mentions", [
    ([], ("got 0", "between 1 and 5")),
    (GOOD * (MAX_EXAMPLES + 1), (f"got {MAX_EXAMPLES + 1}", "between 1 and 5")),
])
async def test_example_count_out_of_bounds_states_the_limits(env, examples, mentions):
    client, backend, settings = env
    error = assert_error(await client.post("/adapt", json=adapt(examples=examples)), 400, "invalid_request",
                         mentions)
    assert error["param"] == "examples"
    await assert_nothing_written(backend, settings)


async def test_example_longer_than_max_seq_len_names_its_index(env):
    client, backend, settings = env
    long = {"prompt": "hello " * 200, "completion": "world " * 100}
    error = assert_error(await client.post("/adapt", json=adapt(examples=GOOD + GOOD + [long])), 400,
                         "example_too_long", ("examples.2", "max_seq_len=256"))
    assert error["param"] == "examples.2"
    # Raising max_seq_len makes the same example fit ...
    fits = await client.post("/adapt", json=adapt(adapter="fits", examples=[long], max_seq_len=512))
    assert fits.status_code == 202, fits.text
    # ... but never beyond the model context.
    assert_error(await client.post("/adapt", json=adapt(adapter="x", max_seq_len=settings.vllm_max_model_len + 1)),
                 400, "invalid_request", ("model context",))


@pytest.mark.parametrize("examples, field", [
    ([{"prompt": "hello"}], "examples.0.completion"),
    ([{"completion": "positive"}], "examples.0.prompt"),
    ([GOOD[0], {"prompt": 3, "completion": "x"}], "examples.1.prompt"),
    ([{"prompt": "hello", "completion": ["x"]}], "examples.0.completion"),
    ([{"prompt": "", "completion": "x"}], "examples.0.prompt"),
    ([{"prompt": "hello", "completion": "   "}], "examples.0.completion"),
    ([{"prompt": "hello", "completion": None}], "examples.0.completion"),
    (["just a string"], "examples.0"),
    ("not a list", "examples"),
    ([{"prompt": "hello", "completion": "x", "label": 1}], "examples.0.label"),
])
async def test_missing_or_non_string_fields_name_the_field(env, examples, field):
    client, backend, settings = env
    error = assert_error(await client.post("/adapt", json=adapt(examples=examples)), 400, "invalid_request",
                         (field,))
    assert error["type"] == "invalid_request_error" and error["param"] == field
    await assert_nothing_written(backend, settings)


@pytest.mark.parametrize("options, field", [
    ({"steps": 0}, "steps"), ({"steps": "many"}, "steps"), ({"learning_rate": -1}, "learning_rate"),
    ({"rank": 1000}, "rank"), ({"step": 5}, "step"), ({"max_seq_len": 2}, "max_seq_len"),
])
async def test_bounded_options(env, options, field):
    client, backend, settings = env
    assert_error(await client.post("/adapt", json=adapt(**options)), 400, "invalid_request", (field,))
    await assert_nothing_written(backend, settings)


async def test_rank_above_the_engines_max_lora_rank_is_rejected(env):
    client, backend, settings = env
    assert_error(await client.post("/adapt", json=adapt(rank=settings.vllm_max_lora_rank * 2)), 400,
                 "invalid_request", ("max LoRA rank",))
    await assert_nothing_written(backend, settings)


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"adapter": "x", "examples": [}', b"\xff\xfe"])
async def test_malformed_json_is_400_in_our_shape(env, raw):
    client, backend, settings = env
    response = await client.post("/adapt", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)
    assert response.json()["error"]["type"] == "invalid_request_error"
    await assert_nothing_written(backend, settings)
    # Same for the OpenAI proxy route, which parses its body itself.
    response = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


async def test_missing_body_and_wrong_top_level_type(env):
    client, backend, settings = env
    assert_error(await client.post("/adapt"), 400, "invalid_request")
    assert_error(await client.post("/adapt", json=[1, 2]), 400, "invalid_request")
    assert_error(await client.post("/v1/completions", json=[1, 2]), 400, "invalid_request")
    await assert_nothing_written(backend, settings)


async def test_body_over_the_limit_is_413(env):
    client, backend, settings = env
    big = adapt(examples=[{"prompt": "hello " * (MAX_BODY // 5), "completion": "x"}])
    assert_error(await client.post("/adapt", json=big), 413, "request_too_large", (str(MAX_BODY),))

    async def chunked():  # no Content-Length: counted while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    assert_error(await client.post("/adapt", content=chunked(), headers={"content-type": "application/json"}),
                 413, "request_too_large")
    assert_error(await client.post("/v1/completions", json={"model": "x", "prompt": "a" * (MAX_BODY + 1)}),
                 413, "request_too_large")
    await assert_nothing_written(backend, settings)


async def test_a_valid_request_after_all_that_is_accepted(env):
    client, backend, settings = env
    response = await client.post("/adapt", json=adapt())
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/adapt/{response.json()['id']}"


# ---------------------------------------------------------------- /v1/completions: resolution errors
async def test_unknown_adapter_is_404(env):
    client, _, _ = env
    assert_error(await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404,
                 "adapter_not_found", ("nope",))
    assert_error(await client.post("/v1/completions", json={"model": "nope@v3", "prompt": "hi"}), 404,
                 "adapter_not_found")
    base = client.app.state.gateway.base_model_name
    assert_error(await client.post("/v1/completions", json={"model": base, "adapter": "nope", "prompt": "hi"}),
                 404, "adapter_not_found")


async def test_invalid_model_ref_is_400(env):
    client, _, _ = env
    for model in ("../etc", "a/b", "x@v0", "x@vfoo"):
        assert_error(await client.post("/v1/completions", json={"model": model, "prompt": "hi"}), 400,
                     "invalid_adapter_name")
    assert_error(await client.post("/v1/completions", json={"model": 3, "prompt": "hi"}), 400, "invalid_request",
                 ("model",))


async def test_adapter_with_only_a_queued_version_is_409_naming_its_status(env):
    client, backend, _ = env
    await backend.store.submit_job(DEFAULT_TENANT, "sentiment", 1, GOOD, {})
    for model in ("sentiment", "sentiment@v1"):
        assert_error(await client.post("/v1/completions", json={"model": model, "prompt": "hi"}), 409,
                     "adapter_not_ready", ("queued",))
    assert_error(await client.post("/v1/completions", json={"model": "sentiment@v2", "prompt": "hi"}), 404,
                 "adapter_not_found")


async def test_model_and_adapter_naming_different_models_is_400(env):
    client, backend, _ = env
    await backend.store.submit_job(DEFAULT_TENANT, "sentiment", 1, GOOD, {})
    for model in ("gpt-4", "other", "org/model", "sentiment@v1"):
        assert_error(await client.post("/v1/completions", json={"model": model, "adapter": "sentiment@v2",
                                                                "prompt": "hi"}),
                     400, "model_adapter_mismatch", (repr(model), "'sentiment@v2'"))
    assert_error(await client.post("/v1/completions", json={"adapter": 5, "prompt": "hi"}), 400,
                 "invalid_request", ("adapter",))


async def test_unknown_routes_and_methods_use_the_same_shape(env):
    client, _, _ = env
    assert_error(await client.get("/nope"), 404)
    assert_error(await client.put("/adapt"), 405)
    assert_error(await client.get("/adapt/job-doesnotexist"), 404, "job_not_found")
