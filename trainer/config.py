"""`AdaptConfig`: every knob of the inner loop, validated on construction and saved with every artifact
(`metalora_adapt.json` beside an adapter, inside `metalora_meta.json` of a shared init), so an adapter can
always be traced back to the exact procedure that produced it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from adapters.adapt_options import AUTO_K, DEFAULTS, OPTIONS, STEPS_AUTO, check_together
from adapters.records import JobErrorCode

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class NonFiniteLoss(ValueError):
    """Training diverged: a loss became NaN or inf, so the weights are garbage and nothing may be written.
    A ValueError because the job's options or data caused it (retrying the same job diverges again)."""

    code = JobErrorCode.NON_FINITE_LOSS.value

    def __init__(self, what: str, value: float):
        super().__init__(f"training diverged: the {what} is not finite ({value}); lower learning_rate or alpha")
        self.what = what
        self.value = value


@dataclass
class AdaptConfig:
    """The job options of adapters/adapt_options.py (defaults and bounds from there), plus the LoRA targets."""

    steps: int | str = DEFAULTS["steps"]  # K inner steps, or "auto" (chosen on the held-out slice)
    learning_rate: float = DEFAULTS["learning_rate"]
    batch_size: int = DEFAULTS["batch_size"]
    rank: int = DEFAULTS["rank"]
    alpha: int = DEFAULTS["alpha"]
    dropout: float = DEFAULTS["dropout"]
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_seq_len: int = DEFAULTS["max_seq_len"]
    seed: int = DEFAULTS["seed"]
    # Held-out slice of the job's examples: loss before/after on it is the worker's quality signal.
    holdout_fraction: float = DEFAULTS["holdout_fraction"]

    def __post_init__(self):
        # JSON round-trips and client options give lists; a tuple keeps the config hashable and comparable.
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        for name, spec in OPTIONS.items():
            setattr(self, name, spec.check(getattr(self, name)))
        check_together({name: getattr(self, name) for name in OPTIONS})

    @property
    def auto_steps(self) -> bool:
        return self.steps == STEPS_AUTO

    @property
    def step_budget(self) -> int:
        """The most steps this config can run: K, or the auto rule's budget."""
        return AUTO_K.max_steps if self.auto_steps else self.steps

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            # A typo in a job option must not silently train with the default.
            raise ValueError(f"unknown AdaptConfig option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def merged(self, options: dict[str, Any]) -> AdaptConfig:
        """This config with `options` (e.g. a job's) on top, validated again."""
        unknown = set(options) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return replace(self, **options)

    def at_rank(self, rank: int) -> AdaptConfig:
        """This procedure at another LoRA rank, alpha / rank (LoRA's scale) kept, so that a rank ablation changes the
        rank and not the step size."""
        return replace(self, rank=rank, alpha=max(1, rank * self.alpha // self.rank))

    def lora_structure(self) -> tuple:
        """What a set of LoRA weights is shaped and scaled for; weights transfer only between equal ones."""
        return (self.rank, self.alpha, tuple(sorted(self.target_modules)))

    def lora_config(self):
        from peft import LoraConfig  # here: peft imports torch, and the config alone must not need it

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )

