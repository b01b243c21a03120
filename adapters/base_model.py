"""Where the base model lives and the name it is served under. No torch here: the gateway imports it.

The absolute, resolved path string matters: vLLM's filesystem resolver only loads an adapter whose
adapter_config.json `base_model_name_or_path` equals vLLM's `--model` string exactly, and the worker
(writing the config) and the supervisor (starting vLLM) both compute it with `base_model_path`.
"""
from __future__ import annotations

from pathlib import Path

from adapters.settings import Settings

DEFAULT_BASE_MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def base_model_path(settings: Settings) -> Path:
    if settings.base_model == "default":
        return (Path(settings.model_cache_dir).expanduser() / DEFAULT_BASE_MODEL_DIRNAME).resolve()
    return Path(settings.base_model).expanduser().resolve()


def served_model_name(settings: Settings) -> str:
    return settings.served_model_name or base_model_path(settings).name
