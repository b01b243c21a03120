"""Choosing K by held-out loss: run THE inner loop (`adapt`) and, every few steps, measure the loss on a held-out
slice; keep the LoRA weights of the best measurement and stop once it has not improved for `patience` checks.

Used for automatic K in the worker (`"steps": "auto"`, on the job's own held-out slice) and for the full-data
reference in the evaluation (trained until its validation loss stops improving, not for a fixed step count).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from adapters.adapt_options import AUTO_K
from trainer.config import AdaptConfig
from trainer.data import EncodedExample, mean_loss
from trainer.inner_loop import adapt, get_lora_state, set_lora_state


@dataclass
class SelectedK:
    k: int  # steps of the kept weights (0: the start was best)
    loss: float  # their held-out loss
    steps_run: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), step 0 first
    train_losses: list[float] = field(default_factory=list)


class _Stop(Exception):
    pass


def adapt_selecting_k(model, train: list[EncodedExample], held: list[EncodedExample], config: AdaptConfig, *,
                      max_steps: int = AUTO_K.max_steps, eval_every: int = AUTO_K.eval_every,
                      patience: int = AUTO_K.patience,
                      on_step: Callable[[int, float], None] | None = None,
                      on_eval: Callable[[int, float], None] | None = None) -> SelectedK:
    """Leaves the model holding the best weights seen (the start counts). `on_step` is passed to `adapt` (it may
    raise to abort, as in the worker); `on_eval(step, held_loss)` reports each measurement."""
    if not held:
        raise ValueError("choosing K needs held-out examples")
    if eval_every < 1 or patience < 1 or max_steps < 1:
        raise ValueError("max_steps, eval_every and patience must be >= 1")
    batch = config.batch_size

    def measure(step: int) -> float:
        loss = mean_loss(model, held, batch)
        curve.append((step, loss))
        if on_eval is not None:
            on_eval(step, loss)
        return loss

    curve: list[tuple[int, float]] = []
    best = {"k": 0, "loss": measure(0), "state": get_lora_state(model)}
    since_best = 0
    train_losses: list[float] = []

    def step_hook(step: int, loss: float) -> None:
        nonlocal since_best
        train_losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
        if step % eval_every and step != max_steps:
            return
        held_loss = measure(step)
        if held_loss < best["loss"]:
            best.update(k=step, loss=held_loss, state=get_lora_state(model))
            since_best = 0
        else:
            since_best += 1
            if since_best >= patience:
                raise _Stop

    try:
        adapt(model, train, replace(config, steps=max_steps), on_step=step_hook)
    except _Stop:
        pass
    set_lora_state(model, best["state"])
    return SelectedK(k=best["k"], loss=best["loss"], steps_run=len(train_losses), curve=curve,
                     train_losses=train_losses)
