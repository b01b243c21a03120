"""The serving engine's LoRA rank limit, once: the vLLM command line (metalora/vllm_command.py) starts vLLM with
`max_lora_rank(settings)`, and every rank the gateway accepts (adapt options, uploaded adapters) is checked with
`rank_problem`, so a version the gateway accepted is one vLLM can load."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Settings takes its default from here
    from adapters.settings import Settings

# vLLM's LoRAConfig accepts only these values for --max-lora-rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The default limit (METALORA_VLLM_MAX_LORA_RANK) is the rank the trainer produces, not more: vLLM pads every
# loaded adapter to the limit and vLLM-CPU copies each token's padded weights, so a higher limit slows every
# adapter request (docs/cpu-serving-profile.md). Serving adapters of a higher rank means raising it.
DEFAULT_MAX_LORA_RANK = 8

# The default number of adapters one engine batch may mix (METALORA_VLLM_MAX_LORAS, vLLM's --max-loras): with
# fewer slots than adapters in flight the other adapters' requests wait for a slot. 16 served 16 concurrent
# adapters at 1.74x the throughput of 4 slots, with 0.41x the median TTFT, and base and one-adapter requests as
# fast (docs/cpu-serving-profile.md). A slot holds one adapter's stacked weights at the rank limit: about 5 MB
# for the default model, more on a GPU-sized one.
DEFAULT_MAX_LORAS = 16


def max_lora_rank(settings: Settings) -> int:
    rank = settings.vllm_max_lora_rank
    if rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"METALORA_VLLM_MAX_LORA_RANK={rank}: vLLM accepts only {VLLM_MAX_LORA_RANKS}")
    return rank


def rank_problem(rank: int, settings: Settings) -> str | None:
    """Why an adapter of this rank cannot be served, or None when it can."""
    limit = max_lora_rank(settings)
    if rank > limit:
        return f"rank {rank} exceeds the serving engine's max LoRA rank {limit} (METALORA_VLLM_MAX_LORA_RANK)"
    return None
