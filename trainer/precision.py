"""Where a training or scoring step runs and in which precision: the device, and bf16 autocast or fp32.

CUDA always computes under bf16 autocast. On a CPU, bf16 pays off only where the CPU computes it natively
(emulated bf16 is many times slower than fp32) and, even then, not at every shape, so it is decided once per
process by measurement. `METALORA_CPU_BF16` (adapters.settings.Settings.cpu_bf16) overrides the decision.
"""
from __future__ import annotations

import time
import typing
from pathlib import Path

import torch
from pydantic import ValidationError

from adapters.settings import Settings

# The values METALORA_CPU_BF16 takes, as the settings class declares them.
CPU_BF16_MODES: tuple[str, ...] = typing.get_args(Settings.model_fields["cpu_bf16"].annotation)
_cpu_bf16: bool | None = None  # decided once per process


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_features() -> dict:
    """The CPU's model name and flags from /proc/cpuinfo (empty where there is none), for the bf16 decision
    here and the machine records of reports and benchmarks."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)  # noqa: E731
    return {"model": first("model name"), "flags": frozenset((first("flags") or "").split())}


def _cpu_has_bf16() -> bool:
    return bool(cpu_features()["flags"] & {"avx512_bf16", "amx_bf16"})


def bf16_speedup(rows: int = 256, d_in: int = 576, d_out: int = 1536, reps: int = 5) -> float:
    """fp32 time / bf16-autocast time of a forward+backward through one SmolLM2-sized linear layer (about
    8 sequences x 32 tokens), each after a warm-up call (kernel choice, weight reorders)."""
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(rows, d_in, requires_grad=True)
    timings = {}
    # The first autocast_for() can come from scoring code under no_grad; the timing needs its backward.
    with torch.enable_grad():
        for enabled in (False, True):
            for i in range(reps + 1):
                if i == 1:
                    t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                    out = layer(x)
                out.float().sum().backward()
            timings[enabled] = time.perf_counter() - t0
    return timings[False] / timings[True]


def cpu_bf16_mode() -> str:
    """METALORA_CPU_BF16 through the settings class; an invalid value raises a ValueError naming the variable."""
    try:
        return Settings().cpu_bf16
    except ValidationError as exc:
        bad = next((e for e in exc.errors() if e["loc"] == ("cpu_bf16",)), None)
        if bad is None:
            raise  # another METALORA_* variable is invalid: pydantic's message names it
        raise ValueError(f"METALORA_CPU_BF16 must be one of {CPU_BF16_MODES}, got {bad['input']!r}") from None


def cpu_bf16() -> bool:
    """Whether CPU steps run under bf16 autocast: only where the CPU computes bf16 natively AND one timed layer
    measures it faster here (native bf16 can still lose to fp32 at these small shapes); the timing costs about
    0.1 s where bf16 is native. METALORA_CPU_BF16=off forces fp32 (e.g. to compare with figures measured in fp32
    elsewhere), on forces bf16 where native, auto (the default) measures."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        mode = cpu_bf16_mode()
        _cpu_bf16 = mode != "off" and _cpu_has_bf16() and (mode == "on" or bf16_speedup() >= 1.2)
    return _cpu_bf16


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16())


def precision_for(device: torch.device) -> str:
    """What `autocast_for(device)` computes in, for reports: cells measured in bf16 and in fp32 can differ by an
    item, so a table says which it was."""
    return "bf16 autocast" if device.type == "cuda" or cpu_bf16() else "fp32"
