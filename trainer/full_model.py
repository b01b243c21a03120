"""The seed's meta-learning baseline for the multi-task setting (issue 17): first-order MAML on every weight of the
base model, no LoRA. Not a product path: the multi-task experiment (trainer/multitask.py) trains it beside the LoRA
family and evaluate scores it as `family_full_fomaml` (K full-model steps per task from the learned weights).

It is the LoRA family's meta-training with other weights: the same outer loop (trainer/family.py
`meta_train_tasks`), episodes, K, batch, outer steps and seed, and THE inner loop `adapt()` over `all_parameters`.
Only the two learning rates differ, since a step that suits a zero-initialised LoRA B would wreck pretrained
weights: full fine-tuning of a model this size takes AdamW steps of ~1e-5 to 1e-4."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM

from adapters.layout import SHARED_INIT_META, read_init_meta
from trainer.config import AdaptConfig
from trainer.family import FamilyConfig, OuterStep, meta_train_tasks
from trainer.inner_loop import all_parameters, get_state

FULL_MODEL_METHOD = "family_full_fomaml"  # evaluate's method and the multi-task table's column


@dataclass(frozen=True)
class FullModelConfig:
    """`family`: the LoRA family's recipe, whose episodes, K, batch and outer steps this run shares (its LoRA shape
    and learning rates are unused). The learning rates were fixed before any run, at the usual AdamW range for full
    fine-tuning of a ~100M model, the outer one below the inner one as in MAML; they are not swept."""

    family: FamilyConfig
    inner_lr: float = 3e-5
    outer_lr: float = 1e-5

    def __post_init__(self):
        if isinstance(self.family, dict):
            object.__setattr__(self, "family", FamilyConfig(**self.family))
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e-3:
                raise ValueError(f"{name} must be in (0, 0.001) for full-model steps, got {value!r}")

    def adapt_config(self) -> AdaptConfig:
        """The procedure the weights are learned for, and that evaluation adapts them with (K swept there)."""
        return replace(self.family.adapt_config(), learning_rate=self.inner_lr)

    def meta_config(self, num_tasks: int):
        meta = self.family.meta_config(num_tasks)  # fomaml, every task in every outer step, clip 1
        return replace(meta, outer_lr=self.outer_lr, inner=replace(meta.inner, learning_rate=self.inner_lr))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_trainable(model_dir: Path | str, device: torch.device):
    """A plain causal LM in fp32 (autocast supplies bf16 where it is on), every weight trainable."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.requires_grad_(True)
    return model


def train_full_fomaml(model, tokenizer, tasks: list[dict], config: FullModelConfig,
                      on_outer_step: Callable[[OuterStep], None] | None = None) -> dict[str, Any]:
    """Meta-train every weight of `model` on `tasks` (as `train_family` takes them); on return `model` holds θ."""
    if config.family.method != "fomaml":
        raise ValueError("the full-model baseline is first-order MAML: family.method must be 'fomaml'")
    meta = config.meta_config(len(tasks))
    metrics = meta_train_tasks(model, tokenizer, tasks, config.family, meta, on_outer_step, select=all_parameters)
    return {**metrics, "meta_params": "full_model", "full_model_config": config.to_dict()}


def save_full_model_init(model, tokenizer, out: Path, config: FullModelConfig, meta: dict[str, Any]) -> None:
    """An HF model folder plus metalora_meta.json (the procedure it was learned for, as a shared init records it)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {**meta, "kind": "full_model", "adapt_config": config.adapt_config().to_dict()}
    (out / SHARED_INIT_META).write_text(json.dumps(record, indent=1))


@dataclass
class FullModelInit:
    """Learned full weights for evaluation: the model, a copy of θ to reset to before each task, and the procedure."""

    model: Any
    theta: dict[str, torch.Tensor]
    procedure: AdaptConfig

    @classmethod
    def load(cls, path: Path | str, device: torch.device) -> "FullModelInit":
        meta = read_init_meta(path) or {}
        if meta.get("kind") != "full_model":
            raise ValueError(f"{path} is not a full-model init (no metalora_meta.json of kind full_model)")
        model = load_trainable(path, device)
        return cls(model, get_state(all_parameters(model)), AdaptConfig.from_dict(meta["adapt_config"]))
