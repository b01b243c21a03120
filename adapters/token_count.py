"""How an example becomes tokens, once: the gateway counts with it to reject an example longer than
`max_seq_len` before it queues a job, and the trainer encodes with it (trainer/data.py), so an example the
gateway let through always fits in training.

An example is context spans (masked) and trained spans; one EOS ends every trained span, so a served adapter
stops where the examples stop.
- `{"prompt", "completion"}`: the prompt encoded on its own with the tokenizer's special tokens (exactly what
  vLLM's /v1/completions makes of the prompt), then the completion without special tokens, trained.
- `{"messages": [...]}`: the conversation rendered with the base model's chat template (adapters/chat_template.py,
  as vLLM's /v1/chat/completions renders it). Before each assistant turn, the context is the rendering of the
  messages before it with the generation prompt, which is what vLLM renders when asked to continue there; the
  turn's own rendered text up to the template's EOS is trained. Spans are encoded without special tokens (the
  template writes them, and vLLM's chat route adds none). Text after the last assistant turn is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tokenizers import Tokenizer

from adapters.chat_template import ASSISTANT, ChatTemplate, ChatTemplateError


@dataclass(frozen=True)
class Span:
    ids: tuple[int, ...]
    trained: bool  # trained spans are followed by one EOS


@dataclass(frozen=True)
class ExampleTokens:
    spans: tuple[Span, ...]

    @property
    def length(self) -> int:
        """Tokens of the trained sequence, EOS included."""
        return sum(len(span.ids) + span.trained for span in self.spans)

    def sequence(self, eos_token_id: int) -> tuple[list[int], list[bool]]:
        """The token ids and, per token, whether it is trained (each trained span and its EOS)."""
        ids: list[int] = []
        trained: list[bool] = []
        for span in self.spans:
            ids += span.ids
            trained += [span.trained] * len(span.ids)
            if span.trained:
                ids.append(eos_token_id)
                trained.append(True)
        return ids, trained


def is_chat(example: Mapping) -> bool:
    return "messages" in example


def tokenize_examples(tokenizer, examples: Sequence[Mapping], chat: ChatTemplate | None = None
                      ) -> list[ExampleTokens]:
    """`examples` (prompt/completion or messages dicts, already validated) as tokens. `tokenizer` is a
    `tokenizers.Tokenizer` (the gateway loads only tokenizer.json) or a transformers tokenizer (the trainer's);
    both give the same ids. `chat` is the base model's template, needed for messages (ChatTemplateError if absent)."""
    texts: list[tuple[str, bool]] = []  # every span's text and whether it is trained, all examples in a row
    bounds: list[int] = []
    for example in examples:
        texts += _chat_texts(chat, example["messages"]) if is_chat(example) else [
            (example["prompt"], False), (example["completion"], True)]
        bounds.append(len(texts))
    # The completion format's prompt is the one span encoded with special tokens.
    with_special = {i for i, e in zip([0] + bounds, examples) if not is_chat(e)}
    ids = _encode(tokenizer, [t for t, _ in texts], with_special)
    result, start = [], 0
    for end in bounds:
        result.append(ExampleTokens(tuple(Span(tuple(ids[i]), texts[i][1]) for i in range(start, end))))
        start = end
    return result


def example_lengths(tokenizer, examples: Sequence[Mapping], chat: ChatTemplate | None = None) -> list[int]:
    return [tokens.length for tokens in tokenize_examples(tokenizer, examples, chat)]


def _chat_texts(chat: ChatTemplate | None, messages: Sequence[Mapping]) -> list[tuple[str, bool]]:
    if chat is None:
        raise ChatTemplateError("the base model has no chat template, so it cannot train on messages;"
                                " use prompt/completion examples")
    eos = chat.eos_token
    spans: list[tuple[str, bool]] = []
    done = ""  # the rendered text the spans so far stand for (a trained span's EOS stands for the template's)
    for index, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = chat.render(messages[:index], add_generation_prompt=True)
        whole = chat.render(messages[:index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not whole.startswith(prompt):
            raise ChatTemplateError(
                "the base model's chat template does not render a conversation as its earlier turns, then the"
                " generation prompt, then the assistant turn; it cannot train on messages")
        turn = whole[len(prompt):]
        cut = turn.rfind(eos) if eos else -1
        answer = turn[:cut] if cut >= 0 else turn
        spans += [(prompt[len(done):], False), (answer, True)]
        done = whole[:len(prompt) + cut + len(eos)] if cut >= 0 else whole
    return [(text, trained) for text, trained in spans if text or trained]


def _encode(tokenizer, texts: list[str], with_special: set[int]) -> list[list[int]]:
    """Encode each text; those at `with_special` with the tokenizer's special tokens, the others without."""
    out: list[list[int]] = [[] for _ in texts]
    for special in (True, False):
        picked = [i for i in range(len(texts)) if (i in with_special) == special]
        if not picked:
            continue
        batch = [texts[i] for i in picked]
        if isinstance(tokenizer, Tokenizer):
            encoded = [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=special)]
        else:
            encoded = tokenizer(batch, add_special_tokens=special)["input_ids"]
        for i, ids in zip(picked, encoded):
            out[i] = list(ids)
    return out
