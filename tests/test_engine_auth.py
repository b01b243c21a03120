"""metalora/engine_auth.py, the key middleware vLLM loads with --middleware: every path but /health needs the key,
including paths vLLM's own --api-key leaves open (/invocations, /adapters). Run on a real ASGI app, and checked to
import nothing outside the standard library (it runs in the stock vLLM image too)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from metalora.engine_auth import RequireEngineKey
from metalora.vllm_command import ENGINE_AUTH_MIDDLEWARE

KEY = "s3cret-engine-key"


def app_with(key: str | None) -> TestClient:
    app = FastAPI()
    for path in ("/health", "/v1/models", "/invocations", "/adapters"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET", "POST"])
    app.add_middleware(RequireEngineKey, key=key)
    return TestClient(app)


def test_every_path_but_health_needs_the_key():
    client = app_with(KEY)
    for path in ("/v1/models", "/invocations", "/adapters"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.post(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401, (path, headers)
        assert client.post(path, headers={"Authorization": f"Bearer {KEY}"}).json() == {"ok": True}
    assert client.get("/health").status_code == 200


def test_without_a_key_nothing_is_refused():
    assert app_with("").post("/adapters").status_code == 200


def test_key_comes_from_vllms_own_variable(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    app = FastAPI()
    app.add_api_route("/invocations", lambda: {"ok": True}, methods=["POST"])
    app.add_middleware(RequireEngineKey)  # as vLLM adds it: the class alone
    client = TestClient(app)
    assert client.post("/invocations").status_code == 401
    assert client.post("/invocations", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_middleware_path_names_this_class_and_imports_only_the_standard_library():
    module, name = ENGINE_AUTH_MIDDLEWARE.rsplit(".", 1)
    assert getattr(sys.modules[module], name) is RequireEngineKey
    tree = ast.parse(Path(sys.modules[module].__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
