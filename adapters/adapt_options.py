"""The options of an adaptation job: names, types, bounds and defaults, once.

The gateway's wire model (`server/protocol.py`, what a client may ask) and the trainer's `AdaptConfig`
(`trainer/config.py`, what the inner loop accepts) are both built from `OPTIONS`, so they accept exactly the
same values. The gateway bounds `rank` and `max_seq_len` further by what the serving engine was started with
(settings), which is a deployment limit, not a property of the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidOption(ValueError):
    """A value outside its option's type or bounds. A ValueError, so a job holding one fails as bad input."""

    def __init__(self, name: str, value: object, expected: str):
        super().__init__(f"{name} must be {expected}, got {value!r}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: type  # int or float
    default: int | float
    min: int | float
    max: int | float
    doc: str
    min_exclusive: bool = False
    max_exclusive: bool = False
    words: tuple[str, ...] = ()  # values the option takes besides numbers (steps: "auto")

    def describe(self) -> str:
        kind = "an integer" if self.type is int else "a number"
        low, high = "(" if self.min_exclusive else "[", ")" if self.max_exclusive else "]"
        return f"{kind} in {low}{self.min}, {self.max}{high}" + "".join(f" or {w!r}" for w in self.words)

    def check(self, value: object) -> int | float | str:
        """`value` as this option's type, or InvalidOption. Booleans are not numbers here, NaN is no float."""
        if isinstance(value, str) and value in self.words:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.type is float else int):
            raise InvalidOption(self.name, value, self.describe())
        if self.type is float:
            value = float(value)
            if math.isnan(value):
                raise InvalidOption(self.name, value, self.describe())
        above = value > self.min if self.min_exclusive else value >= self.min
        below = value < self.max if self.max_exclusive else value <= self.max
        if not (above and below):
            raise InvalidOption(self.name, value, self.describe())
        return value


STEPS_AUTO = "auto"


@dataclass(frozen=True)
class AutoKRule:
    """`"steps": "auto"`: up to `max_steps`, the held-out loss measured every `eval_every` steps (and at step 0),
    stopping after `patience` measurements without improvement; the best measured weights are kept."""
    max_steps: int = 60
    eval_every: int = 5
    patience: int = 3


AUTO_K = AutoKRule()

OPTIONS: dict[str, OptionSpec] = {spec.name: spec for spec in (
    # A job brings ~100 examples: 2,000 steps of batch 8 are 160 epochs of them, far past any use; more would
    # only hold a worker until the job timeout.
    # "auto": the worker measures the held-out slice every few steps and keeps the best adapter, up to a step
    # budget (trainer/selection.py), so it needs holdout_fraction > 0.
    OptionSpec("steps", int, 30, 1, 2000, "K: optimizer steps of the inner loop, or 'auto' (chosen on the held-out "
               "slice)", words=(STEPS_AUTO,)),
    OptionSpec("learning_rate", float, 2e-3, 0.0, 1.0, "AdamW learning rate of the LoRA weights",
               min_exclusive=True, max_exclusive=True),
    OptionSpec("batch_size", int, 8, 1, 64, "examples per step (fewer when the job has fewer)"),
    # vLLM is started with --max-lora-rank (8 by default, adapters/lora_limits.py); 64 is the most its LoRA kernels
    # we ship take.
    OptionSpec("rank", int, 8, 1, 64, "LoRA rank r"),
    OptionSpec("alpha", int, 16, 1, 1024, "LoRA alpha (the update is scaled by alpha / rank)"),
    OptionSpec("dropout", float, 0.0, 0.0, 1.0, "LoRA dropout", max_exclusive=True),
    OptionSpec("max_seq_len", int, 256, 8, 32768,
               "tokens of prompt + completion + EOS an example may take; longer ones are rejected"),
    # 2**31 - 1: a signed 32-bit integer, which every client and RNG can hold.
    OptionSpec("seed", int, 0, 0, 2**31 - 1, "seeds LoRA init, dropout, batch order and holdout split"),
    OptionSpec("holdout_fraction", float, 0.1, 0.0, 0.5,
               "share of the examples held out to measure loss before and after", max_exclusive=True),
)}

DEFAULTS: dict[str, int | float] = {name: spec.default for name, spec in OPTIONS.items()}


def check_together(options: dict) -> None:
    """Rules between options (each option alone is checked by its spec). `options` may omit any option."""
    if options.get("steps") == STEPS_AUTO and options.get("holdout_fraction", DEFAULTS["holdout_fraction"]) == 0:
        raise InvalidOption("holdout_fraction", 0, "> 0 with steps='auto', which chooses K on the held-out slice")


# --- init families (POST /v1/inits): a tenant meta-learns a shared LoRA from its own tasks (trainer/family.py) ---
# Each task's examples obey exactly the limits of one /adapt job (Settings.min_examples / max_examples, the example
# bytes quota, max_seq_len); these bound only what is new: how many tasks, and the meta-training's own knobs.
MIN_FAMILY_TASKS = 2  # one task has nothing to share: that is an /adapt job
MAX_FAMILY_TASKS = 64

# Sized so a family of 4 tasks x 100 examples trains in minutes on a CPU worker: every task in every outer step
# (meta_batch = all tasks), few outer steps, a small K. A GPU worker runs the same defaults, only faster.
FAMILY_OPTIONS: dict[str, OptionSpec] = {spec.name: spec for spec in (
    OptionSpec("outer_steps", int, 4, 1, 1000, "N: meta-training outer steps (each adapts on every task)"),
    OptionSpec("steps", int, 5, 1, 200, "K: inner-loop steps per task in meta-training; also the K of adapt jobs that "
               "start from the init, and of the task adapters"),
    OptionSpec("outer_lr", float, 1e-3, 0.0, 1.0, "AdamW learning rate of the outer (meta) update",
               min_exclusive=True, max_exclusive=True),
    OptionSpec("support_size", int, 16, 1, 256, "examples of a task the inner loop adapts on per outer step"),
    OptionSpec("query_size", int, 16, 1, 256, "disjoint examples of a task the adapted weights are judged on"),
    *(OPTIONS[name] for name in ("learning_rate", "batch_size", "rank", "alpha", "max_seq_len", "seed",
                                 "holdout_fraction")),
)}

FAMILY_DEFAULTS: dict[str, int | float] = {name: spec.default for name, spec in FAMILY_OPTIONS.items()}
