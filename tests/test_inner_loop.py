"""The inner loop, data encoding and the engine's adapter files, on a tiny randomly initialised Llama
(same architecture and LoRA targets as SmolLM2, small enough for CPU tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import precision
from trainer.config import AdaptConfig
from trainer.data import IGNORE_INDEX, ExampleTooLong, encode_examples, iterate_batches, mean_loss
from trainer.engine import AdaptEngine, load_shared_init, save_shared_init
from trainer.inner_loop import adapt, get_lora_state, lora_parameters, set_lora_state

EXAMPLES = [{"prompt": f"Q{i}: color of {c}?", "completion": f" {c} is {v}."}
            for i, (c, v) in enumerate([("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
                                         ("blood", "red"), ("sun", "yellow"), ("sea", "blue"), ("leaf", "green")])]


def save_tiny_model(directory: Path) -> Path:
    """A byte-level BPE tokenizer with no merges (any text encodes offline, one token per byte) and a
    2-layer Llama over it, saved as an HF folder like the converted SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(tiny_dir) -> AdaptEngine:
    return AdaptEngine(tiny_dir, shared_init=None, device="cpu")


def config(**overrides) -> AdaptConfig:
    return AdaptConfig(**{"steps": 6, "batch_size": 4, "learning_rate": 1e-2, "holdout_fraction": 0.0,
                          "max_seq_len": 64, **overrides})


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_config_validates_and_round_trips():
    cfg = AdaptConfig(steps=5, target_modules=["q_proj", "v_proj"])
    assert AdaptConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"steps": 0}, {"learning_rate": 1.5}, {"rank": 65}, {"holdout_fraction": 0.5},
                {"batch_size": 2.5}, {"target_modules": "q_proj"}, {"dropout": -0.1}):
        with pytest.raises(ValueError):
            AdaptConfig(**bad)
    with pytest.raises(ValueError, match="stepz"):
        cfg.merged({"stepz": 3})
    assert cfg.merged({"steps": 9}).steps == 9
    lora = cfg.lora_config()
    assert lora.r == 8 and set(lora.target_modules) == {"q_proj", "v_proj"}


def test_cpu_bf16_autocast_only_where_native_and_measured_faster(monkeypatch):
    # The measurement itself: a real forward/backward in both precisions, a finite ratio.
    assert 0.0 < precision.bf16_speedup(rows=16, d_in=32, d_out=64, reps=2) < float("inf")
    # The first decision may come from scoring code under no_grad (it crashed there on an AVX512-BF16 box).
    with torch.no_grad():
        assert 0.0 < precision.bf16_speedup(rows=16, d_in=32, d_out=64, reps=2) < float("inf")

    def decide(native: bool, speedup: float) -> bool:
        monkeypatch.setattr(precision, "_cpu_bf16", None)  # decided once per process: start over
        monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: native)
        monkeypatch.setattr(precision, "bf16_speedup", lambda: speedup)
        return precision.cpu_bf16()

    monkeypatch.setenv("METALORA_CPU_BF16", "off")
    assert decide(True, 1.8) is False  # fp32 forced, e.g. to compare with figures from an fp32 box
    monkeypatch.setenv("METALORA_CPU_BF16", "on")
    assert decide(True, 0.9) is True and decide(False, 1.8) is False  # forced only where native
    monkeypatch.setenv("METALORA_CPU_BF16", "fast")
    with pytest.raises(ValueError, match="METALORA_CPU_BF16"):
        decide(True, 1.8)
    monkeypatch.delenv("METALORA_CPU_BF16")
    assert decide(True, 1.8) is True
    assert decide(True, 0.9) is False  # native bf16 that measures slower than fp32 (small shapes on AMX)
    assert decide(False, 1.8) is False  # emulated bf16: never, whatever a short timing says
    with precision.autocast_for(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(precision, "_cpu_bf16", True)
    with precision.autocast_for(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_encode_masks_prompt_and_trains_completion_and_eos(engine):
    tok = engine.tokenizer
    [encoded] = encode_examples(tok, [{"prompt": "ab", "completion": "cd"}], max_seq_len=16)
    prompt_len = len(tok("ab", add_special_tokens=True)["input_ids"])
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.input_ids[prompt_len:]
    assert tok.decode(encoded.input_ids[prompt_len:-1]) == "cd"
    assert encoded.input_ids[-1] == tok.eos_token_id


def test_encode_raises_example_too_long_with_index(engine):
    examples = [{"prompt": "hi", "completion": "ok"}] * 3 + [{"prompt": "x" * 100, "completion": "y"}]
    with pytest.raises(ExampleTooLong) as info:
        encode_examples(engine.tokenizer, examples, max_seq_len=32)
    assert info.value.index == 3 and info.value.limit == 32 and info.value.length > 32
    with pytest.raises(ValueError, match="example 1"):
        encode_examples(engine.tokenizer, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}], max_seq_len=32)


def test_batches_are_seeded_cover_every_example_and_right_pad(engine):
    encoded = encode_examples(engine.tokenizer, EXAMPLES, 64)
    batches = list(iterate_batches(encoded, batch_size=4, steps=4, seed=3))
    again = list(iterate_batches(encoded, batch_size=4, steps=4, seed=3))
    other = list(iterate_batches(encoded, batch_size=4, steps=4, seed=4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    # Two epochs of 8 examples in 4 batches of 4: every example exactly twice.
    seen = [tuple(row[mask.bool()].tolist()) for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert sorted(seen) == sorted([tuple(e.input_ids) for e in encoded] * 2)
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        for row, n in enumerate(lengths.tolist()):
            assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
            assert (b["labels"][row, n:] == IGNORE_INDEX).all()


def test_adapt_changes_only_lora_and_lowers_training_loss(engine):
    model = engine.model
    engine.reset_lora(config())
    encoded = encode_examples(engine.tokenizer, EXAMPLES, 64)
    before_base, before_lora = base_weights(model), get_lora_state(model)
    loss_before = mean_loss(model, encoded, 4)
    steps_seen = []
    losses = adapt(model, encoded, config(steps=20), on_step=lambda i, loss: steps_seen.append((i, loss)))
    assert [i for i, _ in steps_seen] == list(range(1, 21))
    assert [l for _, l in steps_seen] == pytest.approx(losses)
    after_base = base_weights(model)
    assert after_base.keys() == before_base.keys()
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base), "base weights must stay bit-identical"
    after_lora = get_lora_state(model)
    assert any(not torch.equal(before_lora[n], after_lora[n]) for n in before_lora)
    assert mean_loss(model, encoded, 4) < loss_before - 0.5


def test_adapt_is_deterministic_under_seed(engine):
    encoded = encode_examples(engine.tokenizer, EXAMPLES, 64)

    def run(seed):
        engine.reset_lora(config(seed=0))  # same start for all runs: only the adapt seed varies
        losses = adapt(engine.model, encoded, config(seed=seed, dropout=0.0))
        return losses, get_lora_state(engine.model)

    losses_a, state_a = run(0)
    losses_b, state_b = run(0)
    losses_c, state_c = run(1)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert losses_a != losses_c
    assert any(not torch.equal(state_a[n], state_c[n]) for n in state_a)


def test_lora_state_round_trip(engine):
    engine.reset_lora(config())
    saved = get_lora_state(engine.model)
    assert saved and all("lora_" in n for n in saved)
    assert saved.keys() == lora_parameters(engine.model).keys()
    adapt(engine.model, encode_examples(engine.tokenizer, EXAMPLES, 64), config(steps=3))
    assert any(not torch.equal(saved[n], p) for n, p in lora_parameters(engine.model).items())
    set_lora_state(engine.model, saved)
    assert all(torch.equal(saved[n], p) for n, p in lora_parameters(engine.model).items())
    with pytest.raises(KeyError):
        set_lora_state(engine.model, dict(list(saved.items())[1:]))


def test_engine_train_reports_metrics_and_is_reproducible(engine):
    examples = EXAMPLES * 2
    cfg = config(steps=8, holdout_fraction=0.25)
    first = engine.train(examples, cfg)
    second = engine.train(examples, cfg)
    m = first.metrics
    assert m["init"] == "standard" and m["eval_on"] == "holdout"
    assert (m["num_train"], m["num_holdout"], m["steps"], len(m["train_losses"])) == (12, 4, 8, 8)
    assert m["loss_after"] < m["loss_before"]
    assert second.metrics["train_losses"] == m["train_losses"], "each job must start from the same init"


def test_engine_save_loads_back_in_peft(engine, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.train(EXAMPLES, config(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    served_name = "/models/SmolLM2-135M-Instruct"
    engine.save(tmp_path / "adapter", served_name)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "metalora_adapt.json"}
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == served_name
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    record = json.loads((tmp_path / "adapter" / "metalora_adapt.json").read_text())
    assert AdaptConfig.from_dict(record["adapt_config"]).rank == 4 and "loss_after" in record["metrics"]

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
    ours = get_lora_state(engine.model)
    theirs = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_shared_init_is_the_start_of_every_job_and_mismatch_falls_back(tiny_dir, tmp_path):
    trainer_engine = AdaptEngine(tiny_dir, shared_init=None, device="cpu")
    init_cfg = config(rank=4, alpha=8, steps=5)
    trainer_engine.train(EXAMPLES, init_cfg)
    save_shared_init(trainer_engine.model, tmp_path / "init", init_cfg, str(tiny_dir), meta={"note": "test"})
    assert load_shared_init(tmp_path / "init").adapt_config == init_cfg

    engine = AdaptEngine(tiny_dir, shared_init=tmp_path / "init", device="cpu")
    # The init's procedure (K, lr, LoRA shape) is the jobs' default; the service keeps its data limits.
    assert engine.default_config.lora_structure() == init_cfg.lora_structure()
    assert (engine.default_config.steps, engine.default_config.learning_rate) == (init_cfg.steps, init_cfg.learning_rate)
    assert engine.default_config.max_seq_len == AdaptConfig().max_seq_len
    init_state = load_file(str(tmp_path / "init" / "adapter_model.safetensors"))
    first = engine.train(EXAMPLES, None)
    assert first.metrics["init"] == "shared"
    second = engine.train(EXAMPLES, None)
    assert second.metrics["train_losses"] == first.metrics["train_losses"]
    # The reset really loaded the init: its saved weights equal what the trainer engine had.
    from peft import get_peft_model_state_dict

    engine.reset_lora(engine.default_config)
    now = get_peft_model_state_dict(engine.model)
    assert all(torch.equal(now[k], init_state[k]) for k in init_state)

    other = engine.train(EXAMPLES, init_cfg.merged({"rank": 8}))
    assert other.metrics["init"] == "standard" and "rank 4" in other.metrics["init_note"]
    back = engine.train(EXAMPLES, None)
    assert back.metrics["init"] == "shared" and back.metrics["train_losses"] == first.metrics["train_losses"]
