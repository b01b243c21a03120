"""The gateway counts an example's tokens (server/services.py's ExampleTokenCounter, `tokenizers` and jinja2
only) by the same rule the trainer encodes it with (trainer/data.py's encode_examples, a transformers tokenizer):
checked here with the real base model's tokenizer and chat template, so an example the gateway lets through
always fits; and a conversation renders as transformers (so vLLM) renders it, with only the assistant turns
trained."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.chat_template import ChatTemplate
from adapters.settings import Settings
from adapters.token_count import tokenize_examples
from server.services import ExampleTokenCounter
from trainer.data import IGNORE_INDEX, ExampleTooLong, InvalidExample, encode_examples

PAIRS = [
    ("Q: 2+2?\nA:", " 4"),
    ("Translate to French: good morning", " bonjour"),
    ("Répondez en français : où est la gare ?", " La gare est à gauche."),
    ("日本語で答えて：空の色は？", " 青です。"),
    ("Emoji: 🙂🚀 and combining e\u0301", " ✓ done\n"),
    ("  leading spaces and\ttabs", "\n\nnew lines  "),
    ("<|im_start|>user\nhi<|im_end|>", " special-looking text"),
]
COMPLETIONS = [{"prompt": p, "completion": c} for p, c in PAIRS]


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


CONVERSATIONS = [
    chat(("user", "Word: apple"), ("assistant", "[[apple]]")),
    chat(("system", "Be terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6")),
    chat(("user", "Répondez : où est la gare ?"), ("assistant", " La gare est à gauche.\n")),
    chat(("user", "日本語で？"), ("assistant", "青です。🙂")),
    chat(("user", "x"), ("user", "y"), ("assistant", "\n\nz  ")),
]
EXAMPLES = COMPLETIONS + CONVERSATIONS


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from trainer.model_prep import ensure_base_model

    return ensure_base_model(Settings())


@pytest.fixture(scope="module")
def hf_tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def test_gateway_counts_what_the_trainer_encodes(base_dir, hf_tokenizer):
    counter = ExampleTokenCounter.from_model_dir(base_dir)
    encoded = encode_examples(hf_tokenizer, EXAMPLES, 10**6)
    assert counter.lengths(EXAMPLES) == [len(e.input_ids) for e in encoded]
    # Not only the counts: both tokenizer objects (and the template read from files or from the tokenizer) give
    # the same ids under the rule.
    assert counter.chat == ChatTemplate.of_tokenizer(hf_tokenizer)
    assert tokenize_examples(counter.tokenizer, EXAMPLES, counter.chat) == tokenize_examples(
        hf_tokenizer, EXAMPLES, ChatTemplate.of_tokenizer(hf_tokenizer))


def test_an_example_the_gateway_counts_at_the_limit_trains_and_one_token_less_is_rejected(base_dir, hf_tokenizer):
    counter = ExampleTokenCounter.from_model_dir(base_dir)
    for example in EXAMPLES:
        [length] = counter.lengths([example])
        example = [example]
        [encoded] = encode_examples(hf_tokenizer, example, max_seq_len=length)
        assert encoded.input_ids[-1] == hf_tokenizer.eos_token_id
        with pytest.raises(ExampleTooLong) as info:
            encode_examples(hf_tokenizer, example, max_seq_len=length - 1)
        assert info.value.length == length


def test_a_conversation_renders_as_transformers_renders_it(hf_tokenizer):
    template = ChatTemplate.of_tokenizer(hf_tokenizer)
    for example in CONVERSATIONS:
        messages = example["messages"]
        for end in range(1, len(messages) + 1):
            for generation in (False, True):
                assert template.render(messages[:end], generation) == hf_tokenizer.apply_chat_template(
                    messages[:end], tokenize=False, add_generation_prompt=generation)


def test_a_conversation_trains_its_assistant_turns_and_their_eos_only(hf_tokenizer):
    for example in CONVERSATIONS:
        messages = example["messages"]
        [encoded] = encode_examples(hf_tokenizer, [example], 10**6)
        # The sequence is the template's tokens (vLLM's chat route adds no special tokens), up to the last EOS;
        # an answer is encoded on its own (as the model generates it), so an answer opening or closing with
        # white space may split at its edges unlike the whole rendering would.
        rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        expected = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if all(m["content"] == m["content"].strip() for m in messages):
            assert encoded.input_ids == expected[:len(encoded.input_ids)]
        assert encoded.input_ids[-1] == hf_tokenizer.eos_token_id
        # Trained: each assistant turn's tokens and its EOS, exactly what vLLM generates after the prompt.
        trained_runs, run = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            if label == IGNORE_INDEX:
                trained_runs, run = trained_runs + ([run] if run else []), []
            else:
                assert label == token
                run.append(token)
        trained_runs.append(run)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [hf_tokenizer.decode(r) for r in trained_runs] == [a + hf_tokenizer.eos_token for a in answers]
        # The last turn's context is exactly what vLLM renders for a request holding the messages before it.
        prompt = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert encoded.input_ids[:len(prompt_ids)] == prompt_ids
        assert encoded.labels[len(prompt_ids) - 1] == IGNORE_INDEX and encoded.labels[len(prompt_ids)] != IGNORE_INDEX


@pytest.mark.parametrize("example", [
    chat(("user", "x")), chat(("assistant", "x")), {"messages": "x"}, chat(("user", "x"), ("assistant", "")),
    chat(("robot", "x"), ("assistant", "y")),
])
def test_the_trainer_refuses_what_the_gateway_refuses(hf_tokenizer, example):
    with pytest.raises(InvalidExample):
        encode_examples(hf_tokenizer, [example], 10**6)
