"""Choosing K on a held-out slice (trainer/selection.py) and `"steps": "auto"` in the engine and the job options,
on the tiny model."""
from __future__ import annotations

import pytest

from adapters.adapt_options import AUTO_K, InvalidOption, check_together
from test_inner_loop import EXAMPLES, engine, tiny_dir  # noqa: F401 (fixtures)
from trainer.config import AdaptConfig
from trainer.data import encode_examples, mean_loss
from trainer.selection import adapt_selecting_k


def test_keeps_the_best_measured_weights_and_stops_after_patience(engine):
    model, tok = engine.model, engine.tokenizer
    engine.reset_lora(AdaptConfig())
    enc = encode_examples(tok, EXAMPLES, 64)
    # A learning rate this high makes the held-out loss blow up after a few steps: the early stop must fire and
    # the weights kept must be the best measured, not the last.
    config = AdaptConfig(learning_rate=0.5, batch_size=4, seed=3)
    seen = []
    chosen = adapt_selecting_k(model, enc[:6], enc[6:], config, max_steps=60, eval_every=2, patience=2,
                               on_eval=lambda step, loss: seen.append((step, loss)))
    assert chosen.curve == seen and seen[0][0] == 0
    assert chosen.loss == min(loss for _, loss in seen)
    assert chosen.k == min(seen, key=lambda sl: sl[1])[0]
    assert chosen.steps_run < 60 and chosen.steps_run == seen[-1][0]
    assert mean_loss(model, enc[6:], 4) == pytest.approx(chosen.loss, rel=1e-4)


def test_engine_steps_auto_reports_the_chosen_k(engine):
    examples = EXAMPLES * 3  # 24 examples: a 0.25 holdout keeps 6
    outcome = engine.train(examples, AdaptConfig(steps="auto", holdout_fraction=0.25, learning_rate=1e-2, batch_size=4))
    m = outcome.metrics
    assert m["auto_k"]["chosen_k"] == m["steps"] <= m["steps_run"] <= AUTO_K.max_steps
    assert m["loss_after"] <= m["loss_before"]  # step 0 is a candidate, so the kept adapter is never worse
    assert m["auto_k"]["holdout_curve"][0] == [0, m["loss_before"]] or m["auto_k"]["holdout_curve"][0] == (0, m["loss_before"])


def test_engine_refuses_auto_without_a_held_out_example(engine):
    with pytest.raises(ValueError, match="hold none out"):
        engine.train(EXAMPLES[:4], AdaptConfig(steps="auto", holdout_fraction=0.2))


def test_auto_needs_a_holdout_on_both_sides():
    with pytest.raises(InvalidOption, match="holdout_fraction"):
        check_together({"steps": "auto", "holdout_fraction": 0.0})
    with pytest.raises(ValueError, match="holdout_fraction"):
        AdaptConfig(steps="auto", holdout_fraction=0.0)
    check_together({"steps": "auto"})  # the default holdout is > 0
    assert AdaptConfig(steps="auto").step_budget == AUTO_K.max_steps and AdaptConfig(steps=7).step_budget == 7
