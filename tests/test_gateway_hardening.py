"""Bad input the gateway once answered with a 500 or handled wrongly: a lone UTF-16 surrogate in an inference
body, a `stream` that is not a boolean, and a job id that is not one (on Redis, `<id>:examples` named another
key). Each is a 4xx in the one error shape, on both stores."""
from __future__ import annotations

import pytest

from adapters.names import DEFAULT_TENANT
from gateway_helpers import gateway_env
from test_gateway_validation import GOOD, assert_error, make_settings

JSON = {"content-type": "application/json"}


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path):
    settings = make_settings(request.param, tmp_path)
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_lone_surrogate_is_a_400(env, path):
    client, _, _ = env
    for raw in (rb'{"prompt": "x\ud800y"}', rb'{"messages": [{"role": "user", "content": "\udfff"}]}',
                rb'{"prompt": "ok", "stop": ["\ud83d"]}'):
        assert_error(await client.post(path, content=raw, headers=JSON), 400, "invalid_json",
                     mentions=("surrogate",))
    # A surrogate pair is a character, and an escaped backslash is text: both go on (to a closed port here).
    for raw in (rb'{"prompt": "\ud83d\ude00"}', rb'{"prompt": "\\ud800"}'):
        assert (await client.post(path, content=raw, headers=JSON)).status_code == 503


@pytest.mark.parametrize("stream", [1, 0, "true", "false", None, [True]])
async def test_stream_must_be_a_boolean(env, stream):
    client, _, _ = env
    body = {"prompt": "hi", "stream": stream} if stream is not None else {"prompt": "hi", "stream": None}
    response = await client.post("/v1/completions", json=body)
    if stream is None:  # null means "not set", as in OpenAI's API
        assert response.status_code == 503, response.text
    else:
        assert_error(response, 400, "invalid_request", mentions=("stream",))


@pytest.mark.parametrize("job_id", ["JOB", "job-0", "job-" + "0" * 21, "job-" + "g" * 20, "x", "%20"])
async def test_a_malformed_job_id_is_a_404(env, job_id):
    client, _, _ = env
    for method, path in (("GET", f"/adapt/{job_id}"), ("GET", f"/adapt/{job_id}/events"),
                         ("POST", f"/adapt/{job_id}/cancel")):
        assert_error(await client.request(method, path), 404, "job_not_found")


async def test_a_job_id_cannot_name_another_key(env):
    client, backend, _ = env
    job = await backend.store.submit_job(DEFAULT_TENANT, "keys", len(GOOD), GOOD, {})
    for suffix in (":examples", ":events", "%3Aexamples"):
        assert_error(await client.get(f"/adapt/{job.id}{suffix}"), 404, "job_not_found")
        assert_error(await client.get(f"/adapt/{job.id}{suffix}", params={"wait": "true", "timeout": 0}), 404,
                     "job_not_found")
    assert (await client.get(f"/adapt/{job.id}")).status_code == 200
