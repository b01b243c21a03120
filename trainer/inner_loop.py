"""THE inner loop. The worker, meta-training and evaluation all call `adapt`, so the shared init is learned
for exactly the procedure that serves adapters: change it here and the shared init must be retrained."""
from __future__ import annotations

import math
from typing import Callable

import torch

from trainer.config import AdaptConfig, NonFiniteLoss
from trainer.data import EncodedExample, iterate_batches, model_device, only_labelled_logits, to_device
from trainer.precision import autocast_for


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters of the active adapter, by their name in `model`."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}


def all_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every trainable weight of `model`: what the full-model baseline (trainer/full_model.py) adapts and learns."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def get_state(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def set_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    if params.keys() != state.keys():
        missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
        raise KeyError(f"state does not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    for name, param in params.items():
        param.copy_(state[name])


def get_lora_state(model) -> dict[str, torch.Tensor]:
    return get_state(lora_parameters(model))


def set_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    set_state(lora_parameters(model), state)


def adapt(
    model,
    encoded: list[EncodedExample],
    config: AdaptConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    params: dict[str, torch.nn.Parameter] | None = None,
) -> list[float]:
    """K = config.steps AdamW steps on `params` (default: the LoRA parameters), in place, from their current values.

    A fresh optimizer per call (no state leaks between jobs) and a reseeded RNG (LoRA dropout, batch
    order) make the result a function of (init, examples, config) alone. `on_step(step, loss)` is called
    after each step with step counting from 1; it may raise to abort (the worker's timeout and shutdown).
    Returns the per-step training losses; raises NonFiniteLoss if one is NaN or inf (at that step when someone
    listens, else at the end), so a diverged adapter is never returned as trained.
    """
    params = lora_parameters(model) if params is None else params
    if not params:
        raise ValueError("the model has no trainable LoRA parameters")
    torch.manual_seed(config.seed)
    device = model_device(model)
    # No weight decay: it would pull every adapter towards zero instead of towards the learned init.
    # fused on CUDA; elsewhere foreach, since hundreds of small LoRA tensors make the per-tensor loop slow.
    optimizer = torch.optim.AdamW(
        params.values(), lr=config.learning_rate, weight_decay=0.0,
        fused=device.type == "cuda", foreach=device.type != "cuda",
    )
    was_training = model.training
    model.train()
    losses: list[torch.Tensor] = []
    try:
        for step, batch in enumerate(iterate_batches(encoded, config.batch_size, config.steps, config.seed), 1):
            batch = to_device(only_labelled_logits(batch), device)
            with autocast_for(device):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if on_step is not None:
                value = loss.item()  # the one host sync per step, only when someone listens
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"training loss at step {step}", value)
                on_step(step, value)
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    values = torch.stack(losses).float().tolist()
    for step, value in enumerate(values, 1):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"training loss at step {step}", value)
    return values
