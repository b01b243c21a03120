"""Examples -> token ids with everything but the answers masked, batching, and held-out loss.

Two formats, encoded by adapters/token_count.py's rule: prompt/completion (the completion and EOS trained, as
vLLM's /v1/completions serves it) and OpenAI chat `messages` (rendered with the base model's chat template,
assistant turns and their EOS trained, as vLLM's /v1/chat/completions serves it). EOS is trained so the
served adapter stops where the examples stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from adapters.chat_template import ChatTemplate, ChatTemplateError, InvalidConversation, check_conversation
from adapters.token_count import is_chat, tokenize_examples
from trainer.precision import autocast_for

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index, what HF models expect in labels
PAD_ID = 0  # any id works: padded positions are masked out of attention and labels


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


class ExampleTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int):
        super().__init__(
            f"example {index} is {length} tokens long (with its EOS tokens); the limit is"
            f" max_seq_len={limit}: shorten it or raise max_seq_len"
        )
        self.index = index
        self.length = length
        self.limit = limit


class InvalidExample(ValueError):
    def __init__(self, index: int, reason: str):
        super().__init__(f"example {index}: {reason}")
        self.index = index


def encode_examples(tokenizer, examples: list[dict], max_seq_len: int) -> list[EncodedExample]:
    """Token ids with all but the trained tokens masked out of the labels, by adapters/token_count.py's rule
    (the gateway counts lengths with the same rule)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions would never learn to stop")
    for index, example in enumerate(examples):
        _check_example(index, example)
    chat = ChatTemplate.of_tokenizer(tokenizer) if any(is_chat(e) for e in examples) else None
    try:
        tokenized = tokenize_examples(tokenizer, examples, chat)
    except ChatTemplateError as exc:
        raise InvalidExample(next(i for i, e in enumerate(examples) if is_chat(e)), str(exc)) from None
    encoded = []
    for index, tokens in enumerate(tokenized):
        if tokens.length > max_seq_len:
            raise ExampleTooLong(index, tokens.length, max_seq_len)
        ids, trained = tokens.sequence(tokenizer.eos_token_id)
        encoded.append(EncodedExample(input_ids=ids,
                                      labels=[t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]))
    return encoded


def _check_example(index: int, example) -> None:
    if not isinstance(example, dict):
        raise InvalidExample(index, "expected an object with prompt and completion, or messages, got"
                                    f" {type(example).__name__}")
    if is_chat(example):
        messages = example["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"] for m in messages):
            raise InvalidExample(index, "messages must be a list of {role, content} with non-empty string contents")
        try:
            check_conversation(messages)
        except InvalidConversation as exc:
            raise InvalidExample(index, f"messages: {exc}") from None
        return
    prompt, completion = example.get("prompt"), example.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InvalidExample(index, "prompt and completion must both be strings")
    if not completion:
        raise InvalidExample(index, "completion is empty: there would be nothing to learn from it")


def collate(batch: list[EncodedExample]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch (not to max_seq_len: short examples stay cheap)."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device`; non-tensor entries (e.g. `logits_to_keep`) pass through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def only_labelled_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ask the model for logits only from the position before the first trained token on: prompts are
    most of each sequence and the vocabulary projection (49k x 576 for SmolLM2) is a fifth of the
    forward pass, so skipping it for prompt positions is free speed with an identical loss. Computed on
    the host from the CPU labels, so it costs no device sync. Labels are cut to the same window, which is
    what HF causal-LM losses expect alongside `logits_to_keep`."""
    labelled = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
    if len(labelled) == 0:
        return batch
    start = max(int(labelled[0]) - 1, 0)
    keep = batch["labels"].shape[1] - start
    return {**batch, "labels": batch["labels"][:, start:], "logits_to_keep": keep}


def iterate_batches(
    encoded: list[EncodedExample], batch_size: int, steps: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches drawn from seeded permutations, one epoch after another; a batch may straddle two
    epochs, so every example is seen equally often. Batches are never larger than the data set."""
    if not encoded:
        raise ValueError("no examples to train on")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(encoded))
    order: list[int] = []
    for _ in range(steps):
        while len(order) < size:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        chosen, order = order[:size], order[size:]
        yield collate([encoded[i] for i in chosen])


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mean_loss(model, encoded: list[EncodedExample], batch_size: int) -> float:
    """Mean next-token loss over all trained (answer + EOS) tokens, each token weighted equally."""
    if not encoded:
        raise ValueError("no examples to evaluate")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        tokens = 0
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            batch = to_device(only_labelled_logits(collate(chunk)), device)
            # HF averages over the shifted, non-ignored labels; multiply back to a sum to weight by tokens.
            count = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in chunk)
            # no_grad: the LoRA weights require grad, and an evaluation must not keep a graph alive.
            with torch.no_grad(), autocast_for(device):
                loss = model(**batch).loss
            total += loss.double() * count
            tokens += count
        return (total / tokens).item()
    finally:
        model.train(was_training)
