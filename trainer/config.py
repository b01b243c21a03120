"""`AdaptConfig`: every knob of the inner loop, validated on construction and saved with every artifact
(`metalora_adapt.json` beside an adapter, inside `metalora_meta.json` of a shared init), so an adapter can
always be traced back to the exact procedure that produced it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# vLLM is started with --max-lora-rank (16 by default, 64 at most for the kernels we ship).
MAX_RANK = 64


@dataclass
class AdaptConfig:
    steps: int = 30  # K inner steps
    learning_rate: float = 2e-3
    batch_size: int = 8
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_seq_len: int = 256
    seed: int = 0
    # Held-out slice of the job's examples: loss before/after on it is the worker's quality signal.
    holdout_fraction: float = 0.1

    def __post_init__(self):
        # JSON round-trips and client options give lists; a tuple keeps the config hashable and comparable.
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        for name in ("steps", "batch_size", "rank", "alpha", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.steps > 10_000:
            raise ValueError(f"steps must be at most 10000, got {self.steps}")
        if self.rank > MAX_RANK:
            raise ValueError(f"rank must be at most {MAX_RANK}, got {self.rank}")
        if self.max_seq_len > 32_768:
            raise ValueError(f"max_seq_len must be at most 32768, got {self.max_seq_len}")
        if not _is_real(self.learning_rate) or not 0.0 < self.learning_rate < 1.0:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_real(self.holdout_fraction) or not 0.0 <= self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        self.learning_rate = float(self.learning_rate)
        self.dropout = float(self.dropout)
        self.holdout_fraction = float(self.holdout_fraction)

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

    def lora_structure(self) -> tuple:
        """What a set of LoRA weights is shaped and scaled for; weights transfer only between equal ones."""
        return (self.rank, self.alpha, tuple(sorted(self.target_modules)))

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
