"""adapters/lora_limits.py: the one LoRA rank limit the vLLM command line and every gateway check read."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.adapt_options import OPTIONS
from adapters.lora_limits import (DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, VLLM_MAX_LORA_RANKS, max_lora_rank,
                                  rank_problem)
from adapters.settings import Settings
from metalora.vllm_command import vllm_command


def test_the_default_limit_is_the_trainers_rank_and_reaches_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("METALORA_VLLM_MAX_LORA_RANK", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert max_lora_rank(settings) == DEFAULT_MAX_LORA_RANK == OPTIONS["rank"].default == 8
    argv = vllm_command(settings)
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert rank_problem(8, settings) is None
    assert "max LoRA rank 8" in rank_problem(16, settings) and "METALORA_VLLM_MAX_LORA_RANK" in rank_problem(16, settings)


def test_an_operator_can_raise_it_to_a_value_vllm_takes(tmp_path, monkeypatch):
    monkeypatch.setenv("METALORA_VLLM_MAX_LORA_RANK", "16")
    assert rank_problem(16, Settings(data_dir=tmp_path)) is None
    monkeypatch.setenv("METALORA_VLLM_MAX_LORA_RANK", "12")
    assert 12 not in VLLM_MAX_LORA_RANKS
    with pytest.raises(ValueError, match="METALORA_VLLM_MAX_LORA_RANK=12"):
        max_lora_rank(Settings(data_dir=tmp_path))


def test_the_default_max_loras_reaches_vllm_compose_and_the_env_example(tmp_path, monkeypatch):
    monkeypatch.delenv("METALORA_VLLM_MAX_LORAS", raising=False)
    argv = vllm_command(Settings(data_dir=tmp_path))
    assert argv[argv.index("--max-loras") + 1] == str(DEFAULT_MAX_LORAS) == "16"
    docker = Path(__file__).resolve().parent.parent / "docker"
    compose = (docker / "compose.yaml").read_text()
    # the gateway/worker env and the GPU service's command line both default to it
    assert compose.count("${METALORA_VLLM_MAX_LORAS:-16}") == 2 == compose.count("${METALORA_VLLM_MAX_LORAS:-")
    assert "METALORA_VLLM_MAX_LORAS=16\n" in (docker / ".env.example").read_text()
