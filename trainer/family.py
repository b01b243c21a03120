"""Init families: a tenant's own tasks (about 100 examples each) meta-learn a shared LoRA, MeTA-LoRA's own setting.

The worker runs `train_family` for a job of kind INIT (POST /v1/inits) on its resident engine, with the
meta-learning code every other meta-training uses (trainer/meta.py's `MetaLearner`, whose inner loop is THE
inner loop `adapt()`). The result is written as a shared-init folder (adapters/layout.py), which adapt jobs with
`"init"` start from exactly as they would from the shipped init.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

from adapters.adapt_options import FAMILY_DEFAULTS, FAMILY_OPTIONS
from trainer.config import AdaptConfig
from trainer.data import EncodedExample, encode_examples, mean_loss
from trainer.engine import split_holdout
from trainer.inner_loop import lora_parameters
from trainer.meta import OUTER_DEFAULTS, Episode, MetaConfig, MetaLearner
from trainer.provenance import examples_digest

# fomaml: MeTA-LoRA's stage 2 (first-order: the query gradient at the adapted weights), the paper's method and
# meta.py's default. Reptile moves θ towards the adapted weights instead, which needs many more outer steps to
# carry signal, and a CPU family has only a handful. The others are the aggregation ablation of the multi-task
# setting (trainer/multitask.py --family-method), not a job option.
FAMILY_METHOD = "fomaml"
FAMILY_AGGREGATIONS = ("fomaml", "reptile", "average")
# "all": the family's tasks are the very tasks its adapters serve, so the init should carry what they share
# (answer formats included). meta.py's "lora_A" guards unseen tasks against inheriting those habits; a family
# wants them.
FAMILY_META_PARAMS = "all"


@dataclass(frozen=True)
class FamilyConfig:
    """A family job's options (adapters/adapt_options.py FAMILY_OPTIONS, bounded there; the gateway sets
    max_seq_len as for /adapt)."""

    outer_steps: int = FAMILY_DEFAULTS["outer_steps"]
    steps: int = FAMILY_DEFAULTS["steps"]
    outer_lr: float = FAMILY_DEFAULTS["outer_lr"]
    support_size: int = FAMILY_DEFAULTS["support_size"]
    query_size: int = FAMILY_DEFAULTS["query_size"]
    learning_rate: float = FAMILY_DEFAULTS["learning_rate"]
    batch_size: int = FAMILY_DEFAULTS["batch_size"]
    rank: int = FAMILY_DEFAULTS["rank"]
    alpha: int = FAMILY_DEFAULTS["alpha"]
    seed: int = FAMILY_DEFAULTS["seed"]
    holdout_fraction: float = FAMILY_DEFAULTS["holdout_fraction"]
    max_seq_len: int = FAMILY_DEFAULTS["max_seq_len"]
    method: str = FAMILY_METHOD

    def __post_init__(self):
        for name, spec in FAMILY_OPTIONS.items():
            object.__setattr__(self, name, spec.check(getattr(self, name)))
        if self.method not in FAMILY_AGGREGATIONS:
            raise ValueError(f"method must be one of {FAMILY_AGGREGATIONS}, got {self.method!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "FamilyConfig":
        """The job's options; `register_task_adapters` is the worker's, not training's."""
        known = set(FAMILY_OPTIONS)
        unknown = set(options) - known - {"register_task_adapters"}
        if unknown:
            raise ValueError(f"unknown init family option(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in options.items() if k in known})

    def adapt_config(self) -> AdaptConfig:
        """The procedure the init is learned for: the inner loop's K, learning rate, batch and LoRA shape. Recorded
        in the init (metalora_meta.json), it is the default of every adapt job that starts from it."""
        return AdaptConfig(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size,
                           rank=self.rank, alpha=self.alpha, max_seq_len=self.max_seq_len, seed=self.seed)

    def meta_config(self, num_tasks: int) -> MetaConfig:
        # Every task in every outer step (meta_batch = all tasks): a family has few tasks and few steps.
        inner = AdaptConfig(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size,
                            rank=self.rank, alpha=self.alpha, max_seq_len=self.max_seq_len, seed=self.seed,
                            holdout_fraction=0.0)
        # outer_lr is the fomaml step's (an AdamW learning rate); the other aggregations take their own outer step
        # (Reptile's β, the average's 1), as train-meta does.
        outer = {**OUTER_DEFAULTS[self.method]}
        if self.method == FAMILY_METHOD:
            outer["outer_lr"] = self.outer_lr
        return MetaConfig(method=self.method, outer_steps=self.outer_steps, meta_batch_tasks=num_tasks,
                          support_size=self.support_size, query_size=self.query_size, **outer,
                          meta_params=FAMILY_META_PARAMS, seed=self.seed, inner=inner)


@dataclass
class FamilyTask:
    name: str
    train: list[EncodedExample]
    validation: list[EncodedExample]  # the held-back slice progress reports (empty when too few examples)


def prepare_tasks(tokenizer, tasks: list[dict], config: FamilyConfig) -> list[FamilyTask]:
    """Encode each task's examples and hold back its validation slice (the /adapt job's holdout rule). A task that
    brings `validation` examples of its own (the multi-task setting: the task's validation split) is reported on
    those and trains on all of its examples."""
    split = AdaptConfig(holdout_fraction=config.holdout_fraction, seed=config.seed)
    prepared = []
    for task in tasks:
        encoded = encode_examples(tokenizer, task["examples"], config.max_seq_len)
        if "validation" in task:
            train, validation = encoded, encode_examples(tokenizer, task["validation"], config.max_seq_len)
        else:
            train, validation = split_holdout(encoded, split)
        prepared.append(FamilyTask(task["name"], train, validation))
    return prepared


def sample_episode(task: FamilyTask, config: FamilyConfig, rng: random.Random) -> Episode:
    """Disjoint support and query from the task's train part, each as large as the config asks and the task allows
    (a task of one example judges on its support: no query exists)."""
    n = len(task.train)
    support = min(config.support_size, max(1, n // 2))
    query = min(config.query_size, n - support)
    chosen = rng.sample(range(n), support + query)
    support_set = [task.train[i] for i in chosen[:support]]
    return Episode(task.name, support_set, [task.train[i] for i in chosen[support:]] or support_set)


@dataclass
class OuterStep:
    """What a family job reports after outer step `step` of `total` (step 0: before the first)."""

    step: int
    total: int
    method: str
    query_loss: float | None  # mean over tasks of the query loss after K steps (None at step 0)
    validation_loss: dict[str, float | None]  # per task, at the current init (K = 0), on its held-back slice

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validation_losses(model, tasks: list[FamilyTask], batch_size: int) -> dict[str, float | None]:
    return {t.name: mean_loss(model, t.validation, batch_size) if t.validation else None for t in tasks}


def train_family(engine, tasks: list[dict], config: FamilyConfig,
                 on_outer_step: Callable[[OuterStep], None] | None = None) -> dict[str, Any]:
    """Meta-train a shared LoRA on `tasks` ([{"name", "examples"}]) from the standard LoRA init; on return the
    engine's model holds it (write it with trainer.engine.save_shared_init). `on_outer_step` may raise to abort.
    Returns the metrics recorded with the init."""
    with engine.lock:
        meta = config.meta_config(len(tasks))
        engine.reset_lora(meta.inner, shared=None)
        metrics = meta_train_tasks(engine.model, engine.tokenizer, tasks, config, meta, on_outer_step)
        return {**metrics, "meta_params": FAMILY_META_PARAMS, "device": engine.device.type}


def meta_train_tasks(model, tokenizer, tasks: list[dict], config: FamilyConfig, meta: MetaConfig,
                     on_outer_step: Callable[[OuterStep], None] | None = None,
                     select: Callable[[Any], dict] = lora_parameters) -> dict[str, Any]:
    """The family's outer loop on the weights `select` names (the LoRA ones; every weight for the full-model
    baseline, trainer/full_model.py): the same episodes for the same config and tasks, whatever is learned."""
    prepared = prepare_tasks(tokenizer, tasks, config)
    learner = MetaLearner(model, meta, select)
    rng = random.Random(config.seed)
    report = OuterStep(0, meta.outer_steps, meta.method, None, validation_losses(model, prepared, config.batch_size))
    history = [report.to_dict()]
    if on_outer_step:
        on_outer_step(report)
    for step in range(1, meta.outer_steps + 1):
        stats = learner.meta_step([sample_episode(t, config, rng) for t in prepared])
        report = OuterStep(step, meta.outer_steps, meta.method, stats.get("query_loss"),
                           validation_losses(model, prepared, config.batch_size))
        history.append(report.to_dict())
        if on_outer_step:
            on_outer_step(report)
    return {
        "method": meta.method,
        "meta_config": meta.to_dict(),
        # The digest shows which examples a task trained on without storing them (trainer/provenance.py).
        "tasks": [{"name": t.name, "num_train": len(t.train), "num_validation": len(t.validation),
                   "examples_sha256": examples_digest(task["examples"])} for t, task in zip(prepared, tasks)],
        "outer_steps": history,
        "validation_loss_before": history[0]["validation_loss"],
        "validation_loss_after": history[-1]["validation_loss"],
    }
