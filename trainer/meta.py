"""Meta-learning the shared LoRA init (MeTA-LoRA, arXiv 2510.11598) and a multitask baseline.

θ (the shared init) lives in `MetaLearner.theta`, a list of nn.Parameters aligned with the model's LoRA
parameters; a stock optimizer (`outer_optimizer`: AdamW or SGD) updates it. Every method only writes a
(pseudo-)gradient into θ.grad:
- "fomaml" (MeTA-LoRA stage 2, first-order): for each task, set the model's LoRA to θ, run THE inner loop
  `adapt()` on the support set (stage 1), then the gradient of the loss on the task's disjoint query set at
  the adapted weights; θ.grad = mean over tasks.
- "reptile": same stage 1; θ.grad = mean over tasks of (θ − θ_i), so a step moves θ towards the adapted
  weights.
- "average": Reptile with β = 1 (SGD, lr 1, no clip): θ ← mean θ_i, the seed's parameter averaging, named so
  that runs and reports say which it was.
- "multitask": plain joint LoRA training on the same tasks for the same compute: (K + 1) optimizer steps
  per outer step, each on the mean gradient of one batch per task (a meta step costs T·(K + 1) forward/
  backward passes; so does this).
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import torch

from trainer.config import AdaptConfig
from trainer.data import EncodedExample, collate, model_device, to_device
from trainer.inner_loop import adapt, get_state, lora_parameters, set_state
from trainer.precision import autocast_for

META_METHODS = ("fomaml", "reptile", "average", "multitask")
# The outer step's defaults depend on the method, since the pseudo-gradients differ in kind: Reptile's is a weight
# difference, which SGD with β = 0.5 moves halfway along (the paper's θ ← θ + β·mean(θ_i − θ)) and `average` moves
# all the way (β = 1: θ ← mean θ_i); fomaml's and multitask's are loss gradients, which take AdamW's bounded
# per-coordinate step. train-meta's --outer_optimizer (adamw | sgd), --outer_lr and --outer_grad_clip (0 = off)
# override them.
OUTER_DEFAULTS = {
    "reptile": {"outer_optimizer": "sgd", "outer_lr": 0.5, "outer_grad_clip": 0.0},  # the shipped init
    "average": {"outer_optimizer": "sgd", "outer_lr": 1.0, "outer_grad_clip": 0.0},  # the only step MetaConfig allows
    "fomaml": {"outer_optimizer": "adamw", "outer_lr": 1e-3, "outer_grad_clip": 1.0},
    "multitask": {"outer_optimizer": "adamw", "outer_lr": 2e-3, "outer_grad_clip": 1.0},  # the baseline init
}
# adamw: normalises the pseudo-gradient per coordinate, so noise moves θ as far as signal does;
# sgd: θ ← θ − lr·g, which for Reptile with lr β is the paper's θ ← θ + β·mean(θ_i − θ).
OUTER_OPTIMIZERS = ("adamw", "sgd")
# all: θ is every LoRA weight. lora_A: only the A matrices are learned and B stays at peft's zero init, so the init
# leaves the base model's outputs untouched (an init that moves them learns the meta-train tasks' answer habits,
# which held-out tasks pay for) and shapes only the subspace the K steps move B in.
META_PARAMS = ("all", "lora_A")


@dataclass
class MetaConfig:
    method: str = "fomaml"
    outer_steps: int = 200
    meta_batch_tasks: int = 4  # T tasks per outer step
    support_size: int = 16  # examples the inner loop adapts on (the serving path sees ~100)
    query_size: int = 16  # disjoint examples the adapted weights are judged on
    outer_optimizer: str = "adamw"
    outer_lr: float = 1e-3
    outer_weight_decay: float = 0.0  # decay would pull θ to zero, i.e. back to "no init"
    outer_grad_clip: float = 1.0  # 0 = off
    meta_params: str = "all"
    seed: int = 0
    inner: AdaptConfig = field(default_factory=lambda: AdaptConfig(steps=5, batch_size=8, holdout_fraction=0.0))

    def __post_init__(self):
        if isinstance(self.inner, dict):
            self.inner = AdaptConfig.from_dict(self.inner)
        if not isinstance(self.inner, AdaptConfig):
            raise ValueError(f"inner must be an AdaptConfig, got {type(self.inner).__name__}")
        if self.method not in META_METHODS:
            raise ValueError(f"method must be one of {META_METHODS}, got {self.method!r}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {self.outer_optimizer!r}")
        if self.meta_params not in META_PARAMS:
            raise ValueError(f"meta_params must be one of {META_PARAMS}, got {self.meta_params!r}")
        if self.meta_params != "all" and self.method == "multitask":
            # With B held at zero, joint training gives A no gradient at all.
            raise ValueError("meta_params='lora_A' needs an inner loop: use method fomaml or reptile")
        for name in ("outer_steps", "meta_batch_tasks", "support_size", "query_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        # AdamW steps ~lr per coordinate, so lr stays below 1; SGD Reptile's β interpolates towards the mean adapted
        # weights (1 = onto them); an SGD gradient step is in the gradient's units, so it is only bounded loosely.
        sgd = self.outer_optimizer == "sgd"
        high = 1e3 if sgd and self.method not in ("reptile", "average") else 1.0
        lr_ok = (isinstance(self.outer_lr, (int, float)) and not isinstance(self.outer_lr, bool)
                 and 0 < self.outer_lr <= high and (sgd or self.outer_lr < high))
        if not lr_ok:
            raise ValueError(f"outer_lr must be in (0, {high:g}{']' if sgd else ')'} for {self.method} with "
                             f"{self.outer_optimizer}, got {self.outer_lr!r}")
        if not isinstance(self.outer_weight_decay, (int, float)) or self.outer_weight_decay < 0:
            raise ValueError(f"outer_weight_decay must be >= 0, got {self.outer_weight_decay!r}")
        if not isinstance(self.outer_grad_clip, (int, float)) or self.outer_grad_clip < 0:
            raise ValueError(f"outer_grad_clip must be >= 0, got {self.outer_grad_clip!r}")
        if self.method == "average" and (self.outer_optimizer, self.outer_lr, self.outer_grad_clip,
                                         self.outer_weight_decay) != ("sgd", 1, 0, 0):
            # Any other outer step lands somewhere else than the mean: that is Reptile, and should say so.
            raise ValueError("average is θ ← mean θ_i: outer_optimizer='sgd', outer_lr=1, outer_grad_clip=0 and "
                             "outer_weight_decay=0 (for another step use method 'reptile')")
        self.outer_lr, self.outer_weight_decay = float(self.outer_lr), float(self.outer_weight_decay)
        self.outer_grad_clip = float(self.outer_grad_clip)

    @property
    def examples_per_task(self) -> int:
        return self.support_size + self.query_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inner"] = self.inner.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MetaConfig option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class Episode:
    task: str
    support: list[EncodedExample]
    query: list[EncodedExample]


def sample_episode(task: str, encoded: list[EncodedExample], config: MetaConfig, rng: random.Random) -> Episode:
    """Disjoint support/query drawn from one task's train split."""
    need = config.examples_per_task
    if len(encoded) < need:
        raise ValueError(f"task {task} has {len(encoded)} train examples; an episode needs {need}")
    chosen = rng.sample(range(len(encoded)), need)
    return Episode(task, [encoded[i] for i in chosen[:config.support_size]],
                   [encoded[i] for i in chosen[config.support_size:]])


def batch_loss(model, examples: list[EncodedExample]) -> torch.Tensor:
    """Differentiable token-mean loss over `examples` in one batch (query sets are small)."""
    device = model_device(model)
    batch = to_device(collate(examples), device)
    with autocast_for(device):
        return model(**batch).loss


class MetaLearner:
    """θ and its outer step. `select` names the weights θ holds and the inner loop adapts: the LoRA ones, or every
    weight of a plain model for the full-model FOMAML baseline (trainer/full_model.py)."""

    def __init__(self, model, config: MetaConfig, select: Callable[[Any], dict] = lora_parameters):
        self.model, self.config, self.select = model, config, select
        self.names = list(select(model))
        if not self.names:
            raise ValueError("the model has no trainable parameters to meta-learn")
        state = get_state(select(model))
        self.theta = [torch.nn.Parameter(state[n].detach().clone().float()) for n in self.names]
        # The part of θ the outer step updates; the rest keeps its standard init.
        self.learned = [p for n, p in zip(self.names, self.theta) if config.meta_params == "all" or "lora_A" in n]
        if not self.learned:
            raise ValueError(f"no LoRA parameter matches meta_params={config.meta_params!r}")
        device = model_device(model)
        if config.outer_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.learned, lr=config.outer_lr, weight_decay=config.outer_weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.learned, lr=config.outer_lr,
                                               weight_decay=config.outer_weight_decay, fused=device.type == "cuda")
        self.step = 0

    def theta_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.theta)}

    def load_theta_into_model(self) -> None:
        set_state(self.select(self.model), self.theta_state())

    def _inner_config(self, episode_index: int) -> AdaptConfig:
        # A distinct, reproducible batch order per (outer step, task slot).
        return replace(self.config.inner, seed=self.config.seed * 1_000_003 + self.step * 101 + episode_index)

    def adapted_query_loss(self, episode: Episode, episode_index: int = 0, *, theta: dict | None = None) -> float:
        """Query loss after adapting from θ (or `theta`) on the support set; the model is left adapted."""
        set_state(self.select(self.model), theta if theta is not None else self.theta_state())
        adapt(self.model, episode.support, self._inner_config(episode_index), params=self.select(self.model))
        with torch.no_grad():
            return batch_loss(self.model, episode.query).item()

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        """One outer update from `episodes` (one per task). Returns logging stats."""
        method = self.config.method
        if method == "multitask":
            stats = self._multitask_step(episodes)
        else:
            grads = [torch.zeros_like(p) for p in self.theta]
            support_first, support_last, query = [], [], []
            params = self.select(self.model)
            for i, episode in enumerate(episodes):
                set_state(params, self.theta_state())
                losses = adapt(self.model, episode.support, self._inner_config(i), params=params)
                support_first.append(losses[0])
                support_last.append(losses[-1])
                if method == "fomaml":
                    loss = batch_loss(self.model, episode.query)
                    grad = torch.autograd.grad(loss, [params[n] for n in self.names])
                    for acc, g in zip(grads, grad):
                        acc.add_(g.float(), alpha=1.0 / len(episodes))
                    query.append(loss.item())
                else:  # reptile, average
                    with torch.no_grad():
                        for acc, p, n in zip(grads, self.theta, self.names):
                            acc.add_(p.detach() - params[n].detach().float(), alpha=1.0 / len(episodes))
            stats = {"support_loss_first": sum(support_first) / len(episodes),
                     "support_loss_last": sum(support_last) / len(episodes)}
            if query:
                stats["query_loss"] = sum(query) / len(query)
            stats["grad_norm"] = self._apply(grads)
        self.step += 1
        # Keep the model holding θ between steps, so evaluation/export see the current init.
        self.load_theta_into_model()
        return stats

    def _apply(self, grads: list[torch.Tensor]) -> float:
        for p, g in zip(self.theta, grads):
            p.grad = g
        norm = torch.nn.utils.clip_grad_norm_(self.learned, self.config.outer_grad_clip or float("inf"))
        self.optimizer.step()
        for p in self.theta:  # the optimizer clears only the learned part
            p.grad = None
        return float(norm)

    def _multitask_step(self, episodes: list[Episode]) -> dict[str, float]:
        cfg = self.config.inner
        params = self.select(self.model)
        rng = random.Random(self.config.seed * 1_000_003 + self.step)
        losses, norms = [], []
        self.model.train()
        for _ in range(cfg.steps + 1):
            self.load_theta_into_model()
            grads = [torch.zeros_like(p) for p in self.theta]
            for episode in episodes:
                pool = episode.support + episode.query
                loss = batch_loss(self.model, rng.sample(pool, min(cfg.batch_size, len(pool))))
                grad = torch.autograd.grad(loss, [params[n] for n in self.names])
                for acc, g in zip(grads, grad):
                    acc.add_(g.float(), alpha=1.0 / len(episodes))
                losses.append(loss.item())
            norms.append(self._apply(grads))
        return {"train_loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms)}

    # --- checkpoints: config + θ + optimizer + step + RNG, nanoGPT style ---
    def state_dict(self) -> dict[str, Any]:
        return {"meta_config": self.config.to_dict(), "theta": self.theta_state(), "names": self.names,
                "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = MetaConfig.from_dict(state["meta_config"])
        if saved.inner.lora_structure() != self.config.inner.lora_structure():
            raise ValueError("checkpoint LoRA structure differs from this model's")
        if state["names"] != self.names:
            raise ValueError("checkpoint LoRA parameter names differ from this model's")
        with torch.no_grad():
            for p, n in zip(self.theta, self.names):
                p.copy_(state["theta"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.load_theta_into_model()


def save_checkpoint(path, learner: MetaLearner, rng: random.Random, extra: dict[str, Any] | None = None) -> None:
    """`rng` is the run's task sampler: its state, not the global `random` module's, decides the next episodes."""
    state = {**learner.state_dict(), "rng": {"python": rng.getstate(), "torch": torch.get_rng_state()},
             **(extra or {})}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint behind


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    # weights_only=False: the checkpoint holds python RNG state; only load checkpoints you wrote.
    return torch.load(path, map_location=map_location, weights_only=False)

