"""Which n of a task's train examples a seed adapts on: drawn at random (the protocol's rule, evaluate's
`training_draw`) or diversity-aware, MeTA-LoRA's data question.

kcenter: the greedy k-center rule over the base model's mean-pooled last hidden states of each example (prompt and
completion): start from the seed's first candidate, then repeatedly take the candidate farthest from every one taken
so far, so that the n examples cover the task's inputs instead of its most common kind. Candidates are a seeded
random pool of at most KCENTER_POOL train examples (embedding all 5,000 of a large task costs ~10 min on 2 cores).
The embeddings run in the harness's precision, so a k-center draw is (rule, seed, precision); the digest of every
draw is recorded with the results and a merge refuses parts that drew differently.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from trainer.data import model_device
from trainer.precision import autocast_for

DRAWS = ("random", "kcenter")
KCENTER_POOL = 1000
EMBED_BATCH = 16


def random_draw(examples: list[dict], seed: int, n: int) -> list[dict]:
    return random.Random(seed).sample(examples, min(n, len(examples)))


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    """[len(texts), hidden] mean of the last hidden states over each text's tokens, from the base model (a peft
    model's adapters are switched off for it)."""
    device = model_device(model)
    disable = getattr(model, "disable_adapter", None)
    context = disable() if disable is not None else torch.no_grad()
    out = []
    was_training = model.training
    model.eval()
    try:
        with context, autocast_for(device):
            for i in range(0, len(texts), EMBED_BATCH):
                ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] or [0]
                       for t in texts[i:i + EMBED_BATCH]]
                width = max(len(x) for x in ids)
                batch = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
                hidden = model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                weights = mask.unsqueeze(-1).float()
                out.append((hidden.float() * weights).sum(1) / weights.sum(1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def kcenter(points: torch.Tensor, n: int) -> list[int]:
    """Greedy k-center from row 0: indices of n rows, each the farthest (Euclidean) from the rows taken before it."""
    n = min(n, len(points))
    chosen = [0]
    nearest = torch.cdist(points, points[:1]).squeeze(1)
    while len(chosen) < n:
        nearest[chosen] = -1.0  # a taken row is never taken again, even among duplicates
        nxt = int(torch.argmax(nearest))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, torch.cdist(points, points[nxt:nxt + 1]).squeeze(1))
    return chosen


def kcenter_draw(model, tokenizer, candidates: list[dict], n: int, max_tokens: int) -> list[dict]:
    """n of `candidates` by greedy k-center, starting from the first. The caller draws the candidates (a seeded
    random pool of at most KCENTER_POOL) and leaves out those it cannot train on: k-center favours outliers, and
    an outlier dropped after the choice would leave fewer than n examples."""
    if len(candidates) <= n:
        return list(candidates)
    emb = F.normalize(mean_pooled(model, tokenizer, [c["prompt"] + c["completion"] for c in candidates],
                                  max_tokens), dim=-1)
    return [candidates[i] for i in kcenter(emb, n)]
