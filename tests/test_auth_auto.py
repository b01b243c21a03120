"""METALORA_AUTH=auto on loopback with SQLite (the embedded default) runs open only while it is safe: a request
relayed by a reverse proxy on the same host (Forwarded / X-Forwarded-For) is refused, and from the first API key
on, every request needs a key. On Redis, auto requires keys from the start."""
from __future__ import annotations

import pytest

from adapters.api_keys import new_api_key
from gateway_helpers import gateway_env
from test_auth import EXAMPLES, assert_error, make_settings, replica  # noqa: F401  (replica: a fixture)

PROXIED = [{"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7;proto=https"},
           {"x-forwarded-for": "127.0.0.1"}]


@pytest.fixture(params=["sqlite", "redis"])
async def auto_env(request, tmp_path, replica):  # noqa: F811
    _, server = replica
    settings = make_settings(request.param, tmp_path, server.url).model_copy(update={"auth": "auto"})
    assert settings.host == "127.0.0.1"
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings


async def test_auto_refuses_proxied_requests_while_open(auto_env):
    client, backend, settings = auto_env
    if settings.redis_url:
        assert_error(await client.get("/v1/adapters"), 401, "missing_api_key")
        return
    assert (await client.get("/v1/adapters")).status_code == 200
    for headers in PROXIED:
        for method, path, body in [("GET", "/v1/adapters", None),
                                   ("POST", "/adapt", {"adapter": "a", "examples": EXAMPLES}),
                                   ("POST", "/v1/completions", {"model": "a", "prompt": "hi"})]:
            response = await client.request(method, path, headers=headers, json=body)
            error = assert_error(response, 401, "proxied_request_refused")
            assert "METALORA_AUTH=required" in error["message"]
    assert await backend.store.list_adapters("default") == []


async def test_auto_requires_keys_once_one_exists(auto_env):
    client, backend, settings = auto_env
    record, key = new_api_key("acme", "first key")
    await backend.store.create_api_key(record)  # as `metalora keys create` does, from another process
    for headers in ({}, {"Authorization": "Bearer unused"}):
        assert_error(await client.get("/v1/adapters", headers=headers), 401,
                     "missing_api_key" if not headers else "invalid_api_key")
    own = {"Authorization": f"Bearer {key}"}
    response = await client.post("/adapt", json={"adapter": "a", "examples": EXAMPLES}, headers=own)
    assert response.status_code == 202, response.text
    assert [a.name for a in await backend.store.list_adapters("acme")] == ["a"]
    assert await backend.store.list_adapters("default") == []
    # Behind a proxy, a key is what counts now.
    assert (await client.get("/v1/adapters", headers={**own, **PROXIED[0]})).status_code == 200
    # Revoking the only key does not reopen the gateway.
    await backend.store.revoke_api_key(record.id)
    assert_error(await client.get("/v1/adapters"), 401, "missing_api_key")
