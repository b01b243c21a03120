"""Deleting an adapter (issue 19 item 1): the gateway purges the version folders it sees, refuses (503, nothing
deleted) when it does not see them, sends the engine key, and unloads a deleted version from a replica that was
down at the time as soon as its health check sees it back. Against a real tiny HTTP replica that keeps what it
has registered, on the embedded SQLite store."""
from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.backend import open_backend
from adapters.names import DEFAULT_TENANT, parse_vllm_name, vllm_name
from adapters.records import AdapterVersion, VersionStatus
from adapters.settings import Settings
from gateway_helpers import ServerThread, free_port, gateway_client, tokenizer_dir

KEY = "engine-secret"


def registering_replica():
    """A vLLM stand-in that answers its API only with the engine key and keeps the LoRAs it has registered."""
    async def health(request: Request):
        return Response(status_code=200)

    def authorized(request: Request) -> bool:
        request.app.state.auth.append(request.headers.get("authorization"))
        return request.headers.get("authorization") == f"Bearer {KEY}"

    async def models(request: Request):
        if not authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        loras = [{"id": n, "object": "model", "parent": "base"} for n in sorted(request.app.state.loras)]
        return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model", "parent": None}, *loras]})

    async def unload(request: Request):
        if not authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        name = (await request.json())["lora_name"]
        if name not in request.app.state.loras:
            return JSONResponse({"error": {"message": "not loaded", "code": 404}}, status_code=404)
        request.app.state.loras.discard(name)
        return Response(status_code=200)

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/unload_lora_adapter", unload, methods=["POST"])])
    app.state.loras, app.state.auth = set(), []
    return app


async def ready_version(store, settings, name: str, version: int = 1, folder: bool = True) -> str:
    await store.add_version(AdapterVersion(tenant=DEFAULT_TENANT, adapter=name, version=version, job_id=f"upload-{name}",
                                           num_examples=0, status=VersionStatus.READY))
    served = vllm_name(DEFAULT_TENANT, name, version)
    if folder:
        (settings.adapter_root / served).mkdir(parents=True)
        (settings.adapter_root / served / "adapter_config.json").write_text("{}")
    return served


async def wait_until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_parse_vllm_name_inverts_vllm_name():
    assert parse_vllm_name(vllm_name("acme", "a.b-c", 12)) == ("acme", "a.b-c", 12)
    for other in ("SmolLM2-135M-Instruct", "acme~init~x@v1", "acme~x", "Acme~x@v1", "~x@v1", "acme~x@v0"):
        assert parse_vllm_name(other) is None, other


async def test_a_replica_down_during_the_delete_unloads_it_when_it_comes_back(tmp_path):
    app = registering_replica()
    port = free_port()
    replica = ServerThread(app, port).start()
    settings = Settings(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), redis_url=None,
                        vllm_urls=[replica.url], health_interval_s=0.1, vllm_api_key=KEY)
    backend = open_backend(settings)
    try:
        async with gateway_client(settings, backend) as client:
            gone = await ready_version(backend.store, settings, "gone")
            kept = await ready_version(backend.store, settings, "kept")
            app.state.loras |= {gone, kept, "acme~init~x@v1"}
            pool = client.app.state.gateway.pool

            replica.stop()  # down while the adapter is deleted: the unload broadcast cannot reach it
            await wait_until(lambda: not pool.upstreams[0].healthy)
            deleted = await client.delete("/v1/adapters/gone")
            assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            assert not (settings.adapter_root / gone).exists()  # the gateway purged the folder it sees
            assert gone in app.state.loras

            replica = ServerThread(app, port).start()  # back, still holding the deleted version
            await wait_until(lambda: gone not in app.state.loras)
            assert app.state.loras == {kept, "acme~init~x@v1"}  # live versions and other names stay
            assert set(app.state.auth) == {f"Bearer {KEY}"}  # every call carried the engine key
    finally:
        replica.stop()
        await backend.close()


async def test_a_delete_the_gateway_cannot_purge_deletes_nothing(tmp_path):
    app = registering_replica()
    with ServerThread(app) as replica:
        settings = Settings(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), redis_url=None,
                            vllm_urls=[replica.url], health_interval_s=0.1, vllm_api_key=KEY)
        backend = open_backend(settings)
        try:
            async with gateway_client(settings, backend) as client:
                # The worker wrote the folder into a volume this gateway does not mount.
                await ready_version(backend.store, settings, "elsewhere", folder=False)
                refused = await client.delete("/v1/adapters/elsewhere")
                assert refused.status_code == 503 and refused.headers["Retry-After"]
                assert refused.json()["error"]["code"] == "adapter_store_unavailable"
                assert (await client.get("/v1/adapters/elsewhere")).json()["versions"][0]["status"] == "ready"
        finally:
            await backend.close()
