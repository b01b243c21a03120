"""Any local HF causal-LM folder works by configuration alone: the worker's engine trains and saves a
PEFT adapter for Llama-, Qwen2- and Mistral-family models with the same default LoRA targets. Tiny
random models stand in for the real ones (same module names, no download)."""
from __future__ import annotations

import json

import pytest
import torch

from test_inner_loop import EXAMPLES, config, save_tiny_model
from trainer.engine import AdaptEngine

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_trains_and_saves_for_each_family(family, tmp_path):
    import transformers
    from peft import PeftModel

    model_dir = save_tiny_model(tmp_path / "model")  # writes the byte-level tokenizer (and a Llama)
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model_cls(config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(model_dir)

    engine = AdaptEngine(model_dir, shared_init=None, device="cpu")
    assert type(engine.model.get_base_model()).__name__ == model_cls.__name__
    outcome = engine.train(EXAMPLES, config(steps=8))
    assert outcome.metrics["loss_after"] < outcome.metrics["loss_before"]
    engine.save(tmp_path / "adapter", str(model_dir))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(outcome.config.target_modules)
    loaded = PeftModel.from_pretrained(model_cls.from_pretrained(model_dir), tmp_path / "adapter")
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 2 * 7  # 2 layers x 7 projections
