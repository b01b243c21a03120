"""The gateway counts an example's tokens (server/services.py's ExampleTokenCounter, `tokenizers` only) by
the same rule the trainer encodes it with (trainer/data.py's encode_examples, a transformers tokenizer):
checked here with the real base model's tokenizer, so an example the gateway lets through always fits."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.settings import Settings
from adapters.token_count import tokenize_examples
from server.services import ExampleTokenCounter
from trainer.data import ExampleTooLong, encode_examples

PAIRS = [
    ("Q: 2+2?\nA:", " 4"),
    ("Translate to French: good morning", " bonjour"),
    ("Répondez en français : où est la gare ?", " La gare est à gauche."),
    ("日本語で答えて：空の色は？", " 青です。"),
    ("Emoji: 🙂🚀 and combining e\u0301", " ✓ done\n"),
    ("  leading spaces and\ttabs", "\n\nnew lines  "),
    ("<|im_start|>user\nhi<|im_end|>", " special-looking text"),
]


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
    encoded = encode_examples(hf_tokenizer, [{"prompt": p, "completion": c} for p, c in PAIRS], 10**6)
    assert counter.lengths(PAIRS) == [len(e.input_ids) for e in encoded]
    # Not only the counts: both tokenizer objects give the same ids under the rule.
    assert tokenize_examples(counter.tokenizer, PAIRS) == tokenize_examples(hf_tokenizer, PAIRS)


def test_an_example_the_gateway_counts_at_the_limit_trains_and_one_token_less_is_rejected(base_dir, hf_tokenizer):
    counter = ExampleTokenCounter.from_model_dir(base_dir)
    for prompt, completion in PAIRS:
        [length] = counter.lengths([(prompt, completion)])
        example = [{"prompt": prompt, "completion": completion}]
        [encoded] = encode_examples(hf_tokenizer, example, max_seq_len=length)
        assert encoded.input_ids[-1] == hf_tokenizer.eos_token_id
        with pytest.raises(ExampleTooLong) as info:
            encode_examples(hf_tokenizer, example, max_seq_len=length - 1)
        assert info.value.length == length
