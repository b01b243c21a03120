"""How a model answers a test item: option tasks by the likelihood of each option, open tasks by greedy generation.

One rule for every method (zero-shot, in-context, any adapted LoRA), so that no method is scored in a format the
others are not: an option's score is the log-probability of its own tokens after the prompt, with no EOS appended.
(EOS would favour the adapted models, which were trained to stop after the completion, over in-context ones, whose
demos end in a blank line.) `SCORING_RULES` names how the token log-probabilities are combined; every report records
the rule it used.

The prompt is run once per item and its KV cache shared by the options, so an item costs about one forward of the
prompt whatever the number of options (the prompt is most of each sequence). A prefix every item starts with (the
in-context demos, most of those prompts) is run once per task: each item copies its cache and runs only its own
tokens.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from trainer.data import model_device
from trainer.precision import autocast_for

# sum: total log-probability of the option's tokens (favours short options where lengths differ);
# per_token: its mean over the option's tokens; per_char: the sum divided by the option's length in characters
# (tokenizer-independent length normalisation, as lm-eval-harness's acc_norm).
SCORING_RULES = ("sum", "per_token", "per_char")
DEFAULT_SCORING = "sum"
GEN_MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Answer:
    """One scored item: the option the model picked (or None for an open task) and whether it was right."""
    pred: int | None
    correct: int


@dataclass
class SharedPrefix:
    """The KV cache of text that every prompt of a run starts with, and the tokens it holds."""
    ids: list[int]
    cache: object


@torch.no_grad()
def encode_shared_prefix(model, tokenizer, prefix: str) -> SharedPrefix:
    device = model_device(model)
    ids = _prompt_ids(tokenizer, prefix, 10**6)
    with autocast_for(device):
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    return SharedPrefix(ids, out.past_key_values)


def _reusable_tokens(shared: SharedPrefix | None, prompt_ids: list[int]) -> int:
    """How many leading tokens of `prompt_ids` the shared cache holds. Compared token by token, not assumed: the
    prompt is encoded whole (so a merge across the seam, or a left cut, is seen), and at least its last token is
    run so that there are logits to read."""
    if shared is None:
        return 0
    n = 0
    for a, b in zip(shared.ids, prompt_ids[:-1]):
        if a != b:
            break
        n += 1
    return n


def _prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    # Encoded alone, with special tokens, exactly as the training data and vLLM encode a prompt. Cut from the left
    # (an in-context prefix loses its oldest demos, never the question).
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids


@torch.no_grad()
def option_scores(model, tokenizer, prompt: str, options: list[str], rule: str = DEFAULT_SCORING,
                  max_prompt_tokens: int = 10**6, shared: SharedPrefix | None = None) -> list[float]:
    if rule not in SCORING_RULES:
        raise ValueError(f"scoring rule must be one of {SCORING_RULES}, got {rule!r}")
    device = model_device(model)
    prompt_ids = _prompt_ids(tokenizer, prompt, max_prompt_tokens)
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    if any(not ids for ids in option_ids):
        raise ValueError("an option encodes to no tokens")
    width = max(len(ids) for ids in option_ids)
    n = len(options)
    batch = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, ids in enumerate(option_ids):
        batch[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    p = len(prompt_ids)
    reuse = _reusable_tokens(shared, prompt_ids)
    past = None
    if reuse:
        past = copy.deepcopy(shared.cache)
        if reuse < len(shared.ids):
            past.crop(reuse - len(shared.ids))  # a negative length drops that many tokens from the end
    with autocast_for(device):
        out = model(input_ids=torch.tensor([prompt_ids[reuse:]], device=device), past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).expand(n, -1)
        attention = torch.cat([torch.ones((n, p), dtype=torch.long), mask], dim=1).to(device)
        rest = model(input_ids=batch.to(device), attention_mask=attention, past_key_values=cache,
                     use_cache=True).logits.float()
    # Token t of an option is predicted by the prompt's last position (t = 0) or by option token t - 1.
    logp = torch.cat([first.unsqueeze(1), torch.log_softmax(rest[:, :-1], dim=-1)], dim=1)
    picked = logp.gather(-1, batch.to(device).unsqueeze(-1)).squeeze(-1) * mask.to(device)
    totals = picked.sum(-1)
    if rule == "per_token":
        totals = totals / mask.sum(-1).to(device)
    elif rule == "per_char":
        totals = totals / torch.tensor([max(1, len(o)) for o in options], device=device)
    return totals.tolist()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_prompt_tokens: int = 10**6) -> str:
    ids = torch.tensor([_prompt_ids(tokenizer, prompt, max_prompt_tokens)], device=model_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_MAX_NEW_TOKENS,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def answer_items(model, tokenizer, items: list[dict], *, has_options: bool, rule: str = DEFAULT_SCORING,
                 prefix: str = "", max_prompt_tokens: int = 10**6) -> list[Answer]:
    """Every item answered by the model in eval mode (restored afterwards). Kept per item, with the prediction,
    so that methods scoring the same items are compared item by item and binary tasks get balanced accuracy."""
    was_training = model.training
    model.eval()
    try:
        answers = []
        shared = encode_shared_prefix(model, tokenizer, prefix) if prefix and has_options else None
        for ex in items:
            if has_options:
                scores = option_scores(model, tokenizer, prefix + ex["prompt"], ex["options"], rule, max_prompt_tokens,
                                       shared)
                pred = max(range(len(scores)), key=scores.__getitem__)
                answers.append(Answer(pred, int(pred == ex["answer"])))
            else:
                text = generate(model, tokenizer, prefix + ex["prompt"], max_prompt_tokens)
                answers.append(Answer(None, int(text.strip().split("\n")[0].strip() == ex["completion"].strip())))
        return answers
    finally:
        model.train(was_training)
