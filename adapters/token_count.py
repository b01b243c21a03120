"""How an example becomes tokens, once: the gateway counts with it to reject an example longer than
`max_seq_len` before it queues a job, and the trainer encodes with it (trainer/data.py), so an example the
gateway let through always fits in training.

The rule: the prompt encoded on its own with the tokenizer's special tokens (exactly what vLLM's
/v1/completions makes of the prompt), then the completion without special tokens, then one EOS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tokenizers import Tokenizer


@dataclass(frozen=True)
class ExampleTokens:
    prompt_ids: list[int]
    completion_ids: list[int]  # without the EOS

    @property
    def length(self) -> int:
        """Tokens of the trained sequence: prompt, completion and the EOS."""
        return len(self.prompt_ids) + len(self.completion_ids) + 1

    def target_ids(self, eos_token_id: int) -> list[int]:
        """The trained tokens: the completion, then the EOS (so a served adapter stops where examples stop)."""
        return self.completion_ids + [eos_token_id]


def tokenize_examples(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[ExampleTokens]:
    """`pairs` of (prompt, completion) as tokens. `tokenizer` is a `tokenizers.Tokenizer` (the gateway loads
    only tokenizer.json) or a transformers tokenizer (the trainer's); both give the same ids."""
    if not pairs:
        return []
    prompts = _encode(tokenizer, [p for p, _ in pairs], special_tokens=True)
    completions = _encode(tokenizer, [c for _, c in pairs], special_tokens=False)
    return [ExampleTokens(list(p), list(c)) for p, c in zip(prompts, completions)]


def example_lengths(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[int]:
    return [tokens.length for tokens in tokenize_examples(tokenizer, pairs)]


def _encode(tokenizer, texts: list[str], *, special_tokens: bool) -> list[list[int]]:
    if isinstance(tokenizer, Tokenizer):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=special_tokens)]
    return tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
