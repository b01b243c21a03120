"""Meta-learning on a tiny random Llama (byte tokenizer, see test_inner_loop.save_tiny_model): only LoRA
weights move, one meta step lowers the query loss it was computed on, checkpoints round-trip."""
from __future__ import annotations

import random

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_inner_loop import save_tiny_model
from trainer.config import AdaptConfig
from trainer.data import encode_examples
from trainer.inner_loop import get_lora_state, lora_parameters
from trainer.meta import MetaConfig, MetaLearner, load_checkpoint, sample_episode, save_checkpoint

WORDS = ["red", "blue", "green", "black", "white", "gold", "pink", "gray"]


def make_task(shift: int) -> list[dict]:
    # A family of tasks sharing structure (copy a word, with a task-specific rotation): what meta-learning exploits.
    return [{"prompt": f"w{i}: {w} ->", "completion": f" {WORDS[(j + shift) % len(WORDS)]}"}
            for i, (j, w) in enumerate((j, WORDS[j]) for j in list(range(len(WORDS))) * 3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inner = AdaptConfig(steps=3, batch_size=4, learning_rate=1e-2, max_seq_len=64, holdout_fraction=0.0)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory), inner.lora_config())
    tasks = {f"t{s}": encode_examples(tokenizer, make_task(s), 64) for s in range(3)}
    return model, tasks, inner


def learner_for(setup, method: str, outer_lr: float = 1e-3) -> MetaLearner:
    model, _, inner = setup
    return MetaLearner(model, MetaConfig(method=method, meta_batch_tasks=2, support_size=8, query_size=8,
                                         outer_lr=outer_lr, outer_steps=3, inner=inner))


def episodes(setup, seed=0):
    _, tasks, inner = setup
    rng = random.Random(seed)
    cfg = MetaConfig(support_size=8, query_size=8, inner=inner)
    return [sample_episode(name, enc, cfg, rng) for name, enc in list(tasks.items())[:2]]


def test_meta_config_validates_and_round_trips():
    cfg = MetaConfig(method="reptile", outer_steps=7)
    assert MetaConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"method": "maml2"}, {"outer_steps": 0}, {"outer_lr": 0.0}, {"support_size": -1},
                {"outer_grad_clip": -1.0}, {"inner": "x"}):
        with pytest.raises(ValueError):
            MetaConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        MetaConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_episode_support_and_query_are_disjoint(setup):
    for ep in episodes(setup):
        ids = lambda xs: {id(x) for x in xs}  # noqa: E731
        assert len(ep.support) == 8 and len(ep.query) == 8 and not ids(ep.support) & ids(ep.query)


@pytest.mark.parametrize("method", ["fomaml", "reptile", "multitask"])
def test_meta_step_changes_only_lora_and_moves_theta(setup, method):
    model = setup[0]
    learner = learner_for(setup, method)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    theta_before = {n: t.clone() for n, t in learner.theta_state().items()}
    stats = learner.meta_step(episodes(setup))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"{method} changed non-LoRA weight {n}"
    moved = sum(not torch.equal(theta_before[n], t) for n, t in learner.theta_state().items())
    assert moved > 0
    # The model is left holding the new θ (not the last task's adapted weights).
    for n, t in get_lora_state(model).items():
        assert torch.equal(t, learner.theta_state()[n])


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_meta_step_lowers_the_query_loss_it_was_computed_on(setup, method):
    learner = learner_for(setup, method, outer_lr=3e-3)
    eps = episodes(setup, seed=1)
    step = learner.step
    before = [learner.adapted_query_loss(ep, i) for i, ep in enumerate(eps)]
    learner.meta_step(eps)
    learner.step = step  # same inner seeds as the step itself used
    after = [learner.adapted_query_loss(ep, i) for i, ep in enumerate(eps)]
    assert sum(after) < sum(before), (before, after)


def test_checkpoint_round_trips(setup, tmp_path):
    learner = learner_for(setup, "fomaml")
    learner.meta_step(episodes(setup))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, learner, {"best_val": 1.5})
    fresh = learner_for(setup, "fomaml")
    with torch.no_grad():
        for p in fresh.theta:
            p.zero_()
    ckpt = load_checkpoint(path)
    fresh.load_state_dict(ckpt)
    assert MetaConfig.from_dict(ckpt["meta_config"]) == learner.config and ckpt["best_val"] == 1.5
    assert fresh.step == learner.step == 1
    for a, b in zip(fresh.theta, learner.theta):
        assert torch.equal(a, b)
    sa, sb = fresh.optimizer.state_dict()["state"], learner.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    # Resumed training continues identically to uninterrupted training.
    eps = episodes(setup, seed=2)
    learner.meta_step(eps)
    fresh.meta_step(eps)
    for a, b in zip(fresh.theta, learner.theta):
        assert torch.allclose(a, b, atol=1e-6)
    assert set(lora_parameters(setup[0])) == set(learner.names)
