"""Grouped LoRA kernels for vLLM-CPU, loaded into every vLLM process as a general plugin (pyproject's
`vllm.general_plugins` entry point).

vLLM-CPU's LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py) gather one copy of the adapter matrix per token
(`lora_weights[token_indices]`) and do one mat-vec per token: a prefill of 1,024 tokens copies every A and B 1,024
times, which is most of a LoRA request's time on CPU (docs/cpu-serving-profile.md section 2). The functions here
compute the same thing as one matmul per distinct adapter over that adapter's rows; the indices, the `-1` slot and the
output writes keep vLLM's semantics exactly, and any call shaped other than they expect goes to vLLM's own op.

`METALORA_CPU_LORA_KERNELS=vllm` keeps vLLM's ops (the plugin then patches nothing); the plugin never patches on a
non-CPU platform.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, get_args

if TYPE_CHECKING:
    import torch

# The Settings field cpu_lora_kernels (adapters/settings.py: its choices and default) is this variable;
# metalora/vllm_command.py sets it in the engine's environment and names the plugin (pyproject's entry point) in
# VLLM_PLUGINS. No torch at import: the supervisor imports these names.
ENV = "METALORA_CPU_LORA_KERNELS"
PLUGIN = "metalora_cpu_lora_kernels"
SETTING = "cpu_lora_kernels"
# Below this many rows per adapter (a decode step of many adapters: a row or two each) one small matmul per adapter
# costs more than vLLM's per-row copies, so those calls keep vLLM's op; one adapter is always one matmul.
MIN_ROWS_PER_ADAPTER = 16


def _lora_rows(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor | None:
    """`einsum("bi,boi->bo", inputs, weights[indices])` as one matmul per distinct index, or None where vLLM's op
    should run: a call not of the per-row shape this handles, or too few rows per adapter."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    if weights.dim() != 3 or indices.dim() != 1 or indices.shape[0] != inputs.shape[0]:
        return None
    distinct = torch.unique(indices)
    if distinct.numel() > 1 and indices.shape[0] < MIN_ROWS_PER_ADAPTER * distinct.numel():
        return None
    inputs = inputs.to(dtype=dtype)
    if distinct.numel() == 1:
        return inputs @ weights[distinct[0]].to(dtype=dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for index in distinct.tolist():
        rows = (indices == index).nonzero().squeeze(1)
        out[rows] = inputs[rows] @ weights[index].to(dtype=dtype).T
    return out


def make_ops(vllm_ops) -> dict:
    """Drop-in replacements for the six ops of `vllm_ops` (vllm.lora.ops.torch_ops)."""
    import torch

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        outputs = _lora_rows(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return vllm_ops.bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        output_tensor[:, : outputs.shape[1]] = scaling * outputs

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return vllm_ops.bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        limit = output_tensor.shape[0]
        if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        common = min(outputs.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common] += outputs[:limit, :common]
        else:
            output_tensor[:, :common] = outputs[:limit, :common]

    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                          add_inputs=True):
        outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return vllm_ops.bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                              slice_offset, slice_size, add_inputs)
        if add_inputs:
            output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
        else:
            output_tensor[:, slice_offset: slice_offset + slice_size] = outputs

    def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, scaling):
        bgmv_shrink(inputs, lora_a_weights, output_tensor,
                    torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), scaling)

    def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, add_inputs=False):
        bgmv_expand(inputs, lora_b_weights, output_tensor,
                    torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), add_inputs)

    def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                          lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                          add_inputs=False):
        bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                          torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                          add_inputs)

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
            "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice}


def chosen() -> str:
    """The choice in this process's environment, checked against the Settings field (unset: its default)."""
    from adapters.settings import Settings

    field = Settings.model_fields[SETTING]
    choices = get_args(field.annotation)
    value = os.environ.get(ENV, field.default).strip().lower()
    if value not in choices:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(choices)}")
    return value


def register() -> None:
    """vLLM general-plugin entry: swap the CPU punica wrapper's ops, on CPU only, unless told not to."""
    if chosen() != "grouped":
        return
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu
    for name, op in make_ops(torch_ops).items():
        setattr(punica_cpu, name, op)  # the wrapper looks its ops up in its module at every call
    # One line per vLLM process, so an engine's log shows which LoRA ops it runs.
    print(f"metalora: grouped CPU LoRA kernels in pid {os.getpid()} ({ENV}=grouped)", file=sys.stderr, flush=True)
