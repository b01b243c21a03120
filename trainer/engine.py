"""`AdaptEngine`: the base model and one LoRA wrapper kept resident; per job: reset the LoRA weights to
the shared init, run `adapt`, write a PEFT adapter folder vLLM can serve.

A shared init is a folder in PEFT format (`adapter_config.json`, `adapter_model.safetensors`) plus
`metalora_meta.json` = {"adapt_config": AdaptConfig.to_dict(), ...anything meta-training records}; the
AdaptConfig in it is the procedure the init was meta-learned for, so that procedure (K, learning rate, batch,
LoRA shape) is also the default for jobs; limits that only bound the data (max_seq_len, holdout) stay the
service's own.
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.adapt_options import AUTO_K
from adapters.layout import (ADAPT_RECORD, ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHARED_INIT_FILES, SHARED_INIT_META,
                             read_init_meta)
from trainer.config import AdaptConfig, NonFiniteLoss
from trainer.data import EncodedExample, encode_examples, mean_loss
from trainer.inner_loop import adapt
from trainer.precision import resolve_device
from trainer.selection import adapt_selecting_k

_ADAPTER = "default"  # peft's adapter name inside the wrapper; one adapter is ever active
# What a shared init dictates to the jobs that start from it: the procedure it was meta-learned for.
PROCEDURE_FIELDS = ("steps", "learning_rate", "batch_size", "rank", "alpha", "dropout", "target_modules")


@dataclass
class SharedInit:
    path: Path
    state: dict[str, torch.Tensor]  # keys as peft saves them (adapter name stripped)
    adapt_config: AdaptConfig
    meta: dict[str, Any]


def load_shared_init(path: Path | str) -> SharedInit:
    path = Path(path)
    for name in SHARED_INIT_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"shared init {path} is incomplete: {name} is missing")
    meta = read_init_meta(path)
    if "adapt_config" not in meta:
        raise ValueError(f"{path / SHARED_INIT_META} has no adapt_config: cannot tell what it was trained for")
    config = AdaptConfig.from_dict(meta["adapt_config"])
    peft_config = json.loads((path / ADAPTER_CONFIG).read_text())
    if peft_config.get("r") != config.rank or sorted(peft_config.get("target_modules") or []) != sorted(config.target_modules):
        raise ValueError(f"shared init {path}: {ADAPTER_CONFIG} disagrees with the adapt_config in {SHARED_INIT_META}")
    return SharedInit(path=path, state=load_file(str(path / ADAPTER_WEIGHTS)), adapt_config=config, meta=meta)


def job_defaults(shared: SharedInit | None) -> AdaptConfig:
    """A job's config before its own options: the service defaults, with a shared init's procedure on top
    (meta-training may use short sequences and no holdout for speed; serving keeps its own limits)."""
    if shared is None:
        return AdaptConfig()
    return AdaptConfig().merged({f: getattr(shared.adapt_config, f) for f in PROCEDURE_FIELDS})


def write_adapter(model, out_dir: Path | str, base_model_name_or_path: str, extra: dict[str, dict]) -> None:
    """Write the active LoRA of a peft `model` as a PEFT adapter folder, plus JSON files `extra`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER, save_embedding_layers=False)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS))
    config = copy.deepcopy(model.peft_config[_ADAPTER])
    # vLLM's filesystem resolver serves an adapter only if this equals its --model exactly.
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(out_dir))
    for name, content in extra.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True))


def save_shared_init(model, out_dir: Path | str, config: AdaptConfig, base_model_name_or_path: str,
                     meta: dict[str, Any] | None = None) -> None:
    """The format `load_shared_init` reads; meta-training writes its result with this."""
    write_adapter(model, out_dir, base_model_name_or_path,
                  {SHARED_INIT_META: {**(meta or {}), "adapt_config": config.to_dict()}})


@dataclass
class AdaptOutcome:
    config: AdaptConfig
    metrics: dict[str, Any] = field(default_factory=dict)


def split_holdout(encoded: list[EncodedExample], config: AdaptConfig) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """(train, holdout): a seeded random `holdout_fraction` slice, empty when it would be under one
    example or would leave nothing to train on."""
    n_holdout = int(len(encoded) * config.holdout_fraction)
    if n_holdout < 1 or n_holdout >= len(encoded):
        return list(encoded), []
    # Its own stream, so changing the holdout does not change the batch order seed's meaning.
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(config.seed + 7919)).tolist()
    held = set(order[:n_holdout])
    return [e for i, e in enumerate(encoded) if i not in held], [e for i, e in enumerate(encoded) if i in held]


class AdaptEngine:
    def __init__(self, base_model_dir: Path, shared_init: Path | None, device: str = "auto"):
        self.base_model_dir = Path(base_model_dir)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_model_dir))
        # bf16 weights on CUDA (compute is autocast bf16 there anyway); fp32 on CPU.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(self.base_model_dir), dtype=dtype).to(self.device)
        base.requires_grad_(False)
        self.shared = load_shared_init(shared_init) if shared_init is not None else None
        self.default_config = job_defaults(self.shared)
        # peft keeps LoRA weights fp32 over a bf16 base (autocast_adapter_dtype), which AdamW needs.
        self.model = get_peft_model(base, self.default_config.lora_config())
        self._structure = self._structure_of(self.default_config)
        self._last: AdaptOutcome | None = None
        self._last_shared: SharedInit | None = None  # the init the last `train` started from, for `save`
        # One job at a time on the resident model; reentrant, since `train` calls the public `reset_lora`.
        self._lock = threading.RLock()

    @staticmethod
    def _structure_of(config: AdaptConfig) -> tuple:
        return (config.lora_structure(), config.dropout)

    @property
    def lock(self) -> threading.RLock:
        """Held for anything that uses the resident model (meta-training a family holds it for the whole job)."""
        return self._lock

    def load_init(self, path: Path | str) -> SharedInit:
        """A tenant's init (an init family's folder), for `train(..., shared=)` and `defaults_for`."""
        return load_shared_init(path)

    def defaults_for(self, shared: SharedInit | None) -> AdaptConfig:
        """A job's config before its options when it starts from `shared` (None: the engine's own default)."""
        return self.default_config if shared is None else job_defaults(shared)

    def reset_lora(self, config: AdaptConfig, shared: SharedInit | None | str = "engine") -> tuple[str, str | None]:
        """Put LoRA modules of `config`'s shape in place, at their init (the shared init where it fits, else
        peft's standard init under `config.seed`): what `train` does before the K steps. `shared`: the engine's
        shared init ("engine"), another (a tenant's init), or None for the standard init. Returns (init kind, note)."""
        shared = self.shared if isinstance(shared, str) else shared
        with self._lock:
            if self._structure_of(config) != self._structure:
                base = self.model.unload()
                base.requires_grad_(False)
                self.model = get_peft_model(base, config.lora_config())
                self._structure = self._structure_of(config)
            if shared is not None and config.lora_structure() == shared.adapt_config.lora_structure():
                result = set_peft_model_state_dict(self.model, shared.state, adapter_name=_ADAPTER)
                missing = [k for k in result.missing_keys if "lora_" in k]
                if missing or result.unexpected_keys:
                    raise ValueError(f"shared init {shared.path} does not fit the base model: missing {missing[:3]},"
                                     f" unexpected {list(result.unexpected_keys)[:3]}")
                return "shared", None
            # peft's standard init (A kaiming-uniform, B zero), reproducible under the job's seed.
            torch.manual_seed(config.seed)
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.reset_lora_parameters(_ADAPTER, True)
            if shared is None:
                return "standard", None
            s = shared.adapt_config
            return "standard", (f"the shared init is for rank {s.rank}, alpha {s.alpha}, targets {list(s.target_modules)};"
                                f" this job asked for rank {config.rank}, alpha {config.alpha},"
                                f" targets {list(config.target_modules)}, so it started from the standard LoRA init")

    def train(self, examples: list[dict], config: AdaptConfig | None = None,
              on_step: Callable[[int, float], None] | None = None,
              shared: SharedInit | None | str = "engine") -> AdaptOutcome:
        """`shared`: as in reset_lora; a tenant's init goes with `defaults_for(it)` as the config's base."""
        config = config or self.default_config
        shared = self.shared if isinstance(shared, str) else shared
        with self._lock:
            started = time.perf_counter()
            encoded = encode_examples(self.tokenizer, examples, config.max_seq_len)
            train_set, holdout = split_holdout(encoded, config)
            timings = {"encode_s": time.perf_counter() - started}
            init, note = self.reset_lora(config, shared)
            timings["reset_s"] = time.perf_counter() - started - timings["encode_s"]
            eval_set = holdout or train_set
            auto: dict[str, Any] = {}
            if config.auto_steps:
                if not holdout:
                    raise ValueError(f"steps='auto' chooses K on the held-out slice, and {len(encoded)} examples at "
                                     f"holdout_fraction={config.holdout_fraction} hold none out: send more examples")
                chosen = adapt_selecting_k(self.model, train_set, holdout, config, on_step=on_step)
                loss_before, loss_after, train_losses = chosen.curve[0][1], chosen.loss, chosen.train_losses
                steps, steps_run = chosen.k, chosen.steps_run
                auto = {"auto_k": {"chosen_k": chosen.k, "steps_run": chosen.steps_run, "holdout_curve": chosen.curve,
                                   "rule": asdict(AUTO_K)}}
            else:
                t0 = time.perf_counter()
                loss_before = mean_loss(self.model, eval_set, config.batch_size)
                t1 = time.perf_counter()
                train_losses = adapt(self.model, train_set, config, on_step=on_step)
                t2 = time.perf_counter()
                loss_after = mean_loss(self.model, eval_set, config.batch_size)
                timings.update(eval_s=t1 - t0 + time.perf_counter() - t2, steps_s=t2 - t1)
                steps, steps_run = config.steps, config.steps
            # The training losses are checked in `adapt`; these catch a broken start or a last step's bad update.
            for what, value in (("loss before training", loss_before), ("loss after training", loss_after)):
                if not math.isfinite(value):
                    raise NonFiniteLoss(what, value)
            metrics: dict[str, Any] = {
                "loss_before": loss_before,
                "loss_after": loss_after,
                "eval_on": "holdout" if holdout else "train",
                "train_losses": train_losses,
                "steps": steps,  # K of the adapter written
                "steps_run": steps_run,
                **auto,
                "num_train": len(train_set),
                "num_holdout": len(holdout),
                "seconds": time.perf_counter() - started,
                # Where `seconds` went: encoding, LoRA reset, held-out loss before + after, the K steps.
                "timings": timings,
                "init": init,
                "device": self.device.type,
            }
            if note:
                metrics["init_note"] = note
            self._last = AdaptOutcome(config=config, metrics=metrics)
            self._last_shared = shared if init == "shared" else None
            return self._last

    def save_init(self, out_dir: Path, config: AdaptConfig, base_model_name_or_path: str, meta: dict[str, Any]) -> None:
        """Write the LoRA the model holds now (a family's meta-trained init) as a shared-init folder for `config`'s
        procedure."""
        with self._lock:
            save_shared_init(self.model, out_dir, config, base_model_name_or_path, meta)

    def save(self, out_dir: Path, base_model_name_or_path: str) -> None:
        """Write the adapter from the last `train` (PEFT files + metalora_adapt.json)."""
        with self._lock:
            if self._last is None:
                raise RuntimeError("nothing trained yet")
            record = {
                "adapt_config": self._last.config.to_dict(),
                "metrics": self._last.metrics,
                "base_model": base_model_name_or_path,
                "shared_init": str(self._last_shared.path) if self._last_shared is not None else None,
            }
            write_adapter(self.model, out_dir, base_model_name_or_path, {ADAPT_RECORD: record})
