"""trainer/scoring.py: the shared-prompt-cache option score equals scoring each full sequence on its own, under
every rule, with and without LoRA weights; no EOS is scored."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_inner_loop import save_tiny_model
from trainer.config import AdaptConfig
from trainer.precision import autocast_for
from trainer.scoring import SCORING_RULES, answer_items, encode_shared_prefix, option_scores

OPTIONS = [" yes", " no, never", " maybe so"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-scoring"))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory), AdaptConfig().lora_config())
    with torch.no_grad():  # B != 0, so the LoRA path is part of what the cached and plain scores must agree on
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def full_sequence_scores(model, tokenizer, prompt, options, rule):
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    scores = []
    for option in options:
        ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), autocast_for(torch.device("cpu")):  # the precision option_scores runs in
            logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        total = sum(logp[len(prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(ids))
        scores.append(total / {"sum": 1, "per_token": len(ids), "per_char": len(option)}[rule])
    return scores


@pytest.mark.parametrize("rule", SCORING_RULES)
def test_cached_prompt_scores_equal_full_sequence_scores(model_and_tokenizer, rule):
    model, tokenizer = model_and_tokenizer
    prompt = "Question: is the sky blue?\nAnswer:"
    got = option_scores(model, tokenizer, prompt, OPTIONS, rule)
    want = full_sequence_scores(model, tokenizer, prompt, OPTIONS, rule)
    assert got == pytest.approx(want, rel=2e-3)  # bf16 autocast rounds differently per shape


def test_rules_differ_where_lengths_differ(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    by_rule = {r: option_scores(model, tokenizer, "Q?", OPTIONS, r) for r in SCORING_RULES}
    assert by_rule["sum"] != pytest.approx(by_rule["per_token"])
    with pytest.raises(ValueError, match="scoring rule"):
        option_scores(model, tokenizer, "Q?", OPTIONS, "eos")


def test_answer_items_records_prediction_and_restores_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    items = [{"prompt": "Q?", "options": OPTIONS, "answer": a} for a in range(3)]
    answers = answer_items(model, tokenizer, items, has_options=True)
    assert model.training
    preds = {a.pred for a in answers}
    assert len(preds) == 1  # same prompt, same options: the same pick, right for exactly one of the three golds
    (pred,) = preds
    assert [a.correct for a in answers] == [int(gold == pred) for gold in range(3)]


DEMOS = "Question: is fire cold?\nAnswer: no\n\nQuestion: is ice cold?\nAnswer: yes\n\n"


@pytest.mark.parametrize("prompt", [
    "Question: is the sky blue?\nAnswer:",
    "\n\nQuestion: a prompt whose first characters merge with the prefix's last ones\nAnswer:",
])
def test_shared_prefix_cache_scores_as_the_whole_prompt(model_and_tokenizer, prompt):
    model, tokenizer = model_and_tokenizer
    shared = encode_shared_prefix(model, tokenizer, DEMOS)
    got = option_scores(model, tokenizer, DEMOS + prompt, OPTIONS, "sum", shared=shared)
    want = full_sequence_scores(model, tokenizer, DEMOS + prompt, OPTIONS, "sum")
    assert got == pytest.approx(want, rel=2e-3)
    # The cache is copied per item, never extended in place: a second item sees the demos only.
    again = option_scores(model, tokenizer, DEMOS + prompt, OPTIONS, "sum", shared=shared)
    assert again == pytest.approx(got, rel=1e-6)


def test_shared_prefix_that_does_not_match_is_not_used(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    shared = encode_shared_prefix(model, tokenizer, "Some other text entirely. " * 3)
    prompt = DEMOS + "Question: is the sky blue?\nAnswer:"
    got = option_scores(model, tokenizer, prompt, OPTIONS, "sum", shared=shared)
    assert got == pytest.approx(full_sequence_scores(model, tokenizer, prompt, OPTIONS, "sum"), rel=2e-3)


def test_answer_items_with_a_prefix_answer_as_without_the_cache(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    items = [{"prompt": f"Question: is {w} hot?\nAnswer:", "options": OPTIONS, "answer": i % 3}
             for i, w in enumerate(["tea", "snow", "lava", "rain"])]
    cached = answer_items(model, tokenizer, items, has_options=True, prefix=DEMOS)
    for ex, answer in zip(items, cached):
        scores = full_sequence_scores(model, tokenizer, DEMOS + ex["prompt"], OPTIONS, "sum")
        assert answer.pred == max(range(3), key=scores.__getitem__)
