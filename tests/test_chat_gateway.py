"""Chat and OpenAI compatibility at the gateway, against the real stores and stand-in replicas: /v1/chat/completions
takes the same routes as /v1/completions, the sampling fields reach vLLM untouched, the model/adapter rules, and
/adapt's OpenAI chat fine-tuning format. The real-vLLM behaviour is tests/test_chat_stack.py's."""
from __future__ import annotations

import json

import httpx
import pytest

from adapters.backend import open_backend
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.settings import Settings
from gateway_helpers import gateway_client, write_wordlevel_tokenizer
from test_gateway_api import base_name, env, replicas, train_directly  # noqa: F401 (fixtures)
from test_gateway_validation import assert_error, assert_nothing_written

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello world"}]
CONVERSATION = {"messages": [{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "hello world"},
                             {"role": "assistant", "content": "positive"}]}
# Fields vLLM reads and the gateway does not: each must arrive exactly as sent.
SAMPLING = {"n": 2, "logprobs": True, "top_logprobs": 2, "stop": ["\n", "]]"], "seed": 7, "temperature": 0.8,
            "response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["yes", "no"]},
            "max_completion_tokens": 5, "user": "u1", "vllm_xargs": {"k": 1}}


def replica_calls(replicas, path: str) -> list[dict]:
    return [body for app, _ in replicas for p, body in app.state.calls if p == path]


# ---------------------------------------------------------------- /v1/chat/completions
async def test_chat_resolves_the_adapter_forwards_every_field_and_rewrites_model(env, replicas):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    await train_directly(backend, settings, "sentiment")
    response = await client.post(CHAT, json={"model": "sentiment", "messages": MESSAGES, **SAMPLING})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "sentiment@v2" and data["object"] == "chat.completion"
    assert data["echo"] == {"messages": MESSAGES, **SAMPLING}
    sent = replica_calls(replicas, CHAT)[-1]
    assert sent["model"] == vllm_name(DEFAULT_TENANT, "sentiment", 2) and "adapter" not in sent
    assert not replica_calls(replicas, "/v1/completions")

    via_field = await client.post(CHAT, json={"model": base_name(client), "adapter": "sentiment@v1",
                                              "messages": MESSAGES})
    assert via_field.json()["model"] == "sentiment@v1" and "adapter" not in via_field.json()["echo"]
    pinned = await client.post(CHAT, json={"model": "sentiment@v1", "messages": MESSAGES})
    assert pinned.json()["model"] == "sentiment@v1"


async def test_chat_streaming_rewrites_each_chunk(env):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    async with client.stream("POST", CHAT, json={"adapter": "sentiment", "messages": MESSAGES,
                                                 "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = (await response.aread()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) == 3 and {c["model"] for c in chunks} == {"sentiment@v1"}


@pytest.mark.parametrize("path, payload", [("/v1/completions", {"prompt": "hi"}), (CHAT, {"messages": MESSAGES})])
async def test_model_left_out_is_the_base_model(env, replicas, path, payload):
    client, _, _ = env
    for body in (payload, {"model": None, **payload}):
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == base_name(client)
        assert replica_calls(replicas, path)[-1]["model"] == base_name(client)


async def test_model_and_adapter_naming_the_same_adapter_is_accepted(env):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    await train_directly(backend, settings, "sentiment")
    for model, adapter, served in [("sentiment", "sentiment", "sentiment@v2"),
                                   ("sentiment@v1", "sentiment", "sentiment@v1"),
                                   ("sentiment", "sentiment@v1", "sentiment@v1"),
                                   ("sentiment@v1", "sentiment@v1", "sentiment@v1")]:
        response = await client.post(CHAT, json={"model": model, "adapter": adapter, "messages": MESSAGES})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == served, (model, adapter)
    assert_error(await client.post(CHAT, json={"model": "sentiment@v1", "adapter": "sentiment@v2",
                                               "messages": MESSAGES}), 400, "model_adapter_mismatch")


async def test_an_unknown_adapter_is_404_naming_it(env):
    client, _, _ = env
    for body in ({"model": "nope"}, {"adapter": "nope"}, {"model": "nope", "adapter": "nope"},
                 {"model": base_name(client), "adapter": "nope@v2"}):
        error = assert_error(await client.post(CHAT, json={**body, "messages": MESSAGES}), 404, "adapter_not_found",
                             ("'nope",))
        assert "base model" not in error["message"]


@pytest.mark.parametrize("body, field", [
    ({"model": 3}, "model"), ({"adapter": ["x"]}, "adapter"), ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
])
async def test_the_fields_the_gateway_reads_are_validated(env, body, field):
    client, _, _ = env
    for path in ("/v1/completions", CHAT):
        error = assert_error(await client.post(path, json={"messages": MESSAGES, **body}), 400, "invalid_request",
                             (field,))
        assert error["param"] == field
    assert_error(await client.post(CHAT, content=b"{", headers={"content-type": "application/json"}), 400,
                 "invalid_json")


async def test_openai_client_chat_against_the_gateway(env):
    import openai

    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://gateway") as http:
        oai = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0)
        by_model = await oai.chat.completions.create(model="sentiment", messages=MESSAGES, n=2, seed=3)
        by_field = await oai.chat.completions.create(model=base_name(client), messages=MESSAGES,
                                                     extra_body={"adapter": "sentiment"})
        assert by_model.model == by_field.model == "sentiment@v1"
        assert by_model.choices[0].message.content.startswith("from ")
        stream = await oai.chat.completions.create(model="sentiment", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        assert len(chunks) == 3 and {c.model for c in chunks} == {"sentiment@v1"}
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="missing", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await oai.chat.completions.create(model="other", messages=MESSAGES, extra_body={"adapter": "sentiment"})


# ---------------------------------------------------------------- /adapt in OpenAI's chat fine-tuning format
async def test_adapt_takes_chat_examples_beside_prompt_completion_and_stores_them_as_sent(env):
    client, backend, _ = env
    examples = [CONVERSATION, {"prompt": "hello world", "completion": "positive"},
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    response = await client.post("/adapt", json={"adapter": "chatty", "examples": examples})
    assert response.status_code == 202, response.text
    assert response.json()["num_examples"] == 3
    assert await backend.store.get_job_examples(response.json()["id"]) == examples


def turns(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"text {i}"} for i, role in enumerate(roles)]}


@pytest.mark.parametrize("example, field, mentions", [
    (turns("user"), "examples.0.messages.0", "last message must be an assistant turn"),
    (turns("system", "user"), "examples.0.messages.1", "last message must be an assistant turn"),
    (turns("user", "assistant", "user"), "examples.0.messages.2", "last message must be an assistant turn"),
    (turns("assistant"), "examples.0.messages.0", "first message must be a system or user message"),
    ({"messages": []}, "examples.0.messages", "at least one message"),
    (turns("user", "tool"), "examples.0.messages.1.role", "'assistant'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
     "examples.0.messages.0.content", "blank"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "examples.0.messages.1.content", "at least 1 character"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["x"]}]},
     "examples.0.messages.1.content", "string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "examples.0.messages.1.content",
     "required"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
     "examples.0.messages.0.weight", "not permitted"),
    ({"messages": {"role": "user"}}, "examples.0.messages", "list"),
    ({**CONVERSATION, "prompt": "x"}, "examples.0.prompt", "not permitted"),
])
async def test_bad_conversations_are_400_naming_the_place_and_write_nothing(env, example, field, mentions):
    client, backend, settings = env
    response = await client.post("/adapt", json={"adapter": "chatty", "examples": [CONVERSATION, example]})
    field = field.replace("examples.0", "examples.1")
    error = assert_error(response, 400, None, (field, mentions))
    assert error["param"] == field
    await assert_nothing_written(backend, settings)


async def test_a_conversation_longer_than_max_seq_len_is_400_and_writes_nothing(env):
    client, backend, settings = env
    long = {"messages": [{"role": "user", "content": "hello " * 300}, {"role": "assistant", "content": "world"}]}
    error = assert_error(await client.post("/adapt", json={"adapter": "chatty", "examples": [CONVERSATION, long]}),
                         400, "example_too_long", ("examples.1", "chat template", "max_seq_len=256"))
    assert error["param"] == "examples.1"
    await assert_nothing_written(backend, settings)


async def test_chat_examples_need_a_base_model_with_a_chat_template(tmp_path):
    settings = Settings(redis_url=None, data_dir=tmp_path / "data", vllm_urls=["http://127.0.0.1:9"],
                        base_model=str(write_wordlevel_tokenizer(tmp_path / "no-template")))
    backend = open_backend(settings)
    try:
        async with gateway_client(settings, backend) as client:
            error = assert_error(await client.post("/adapt", json={"adapter": "chatty", "examples": [CONVERSATION]}),
                                 400, "chat_template_unsupported", ("no chat template",))
            assert error["param"] == "examples"
            await assert_nothing_written(backend, settings)
            ok = await client.post("/adapt", json={"adapter": "plain", "examples": [{"prompt": "hello",
                                                                                    "completion": "world"}]})
            assert ok.status_code == 202, ok.text
    finally:
        await backend.close()
