"""Time the inner loop (LoRA fine-tuning steps) on a GPU, self-contained: torch, transformers and peft only,
no vLLM, no metalora imports, nothing downloaded (random weights, random tokens).

    python benchmarks/gpu_inner_loop.py                 # ~1B Llama-shaped model, bf16, on CUDA (< 5 min on an H200)
    python benchmarks/gpu_inner_loop.py --tiny          # CPU smoke check: a tiny model, fp32, a few steps
    python benchmarks/gpu_inner_loop.py --out results/bench/gpu_inner_loop.json

The step is the one metalora's inner loop runs: bf16 autocast, LoRA r=8 on every linear layer of the
decoder (q,k,v,o,gate,up,down), AdamW (fused on CUDA) on the LoRA parameters only, no host sync per step.
Variants, each timed after its own warm-up:
  ours          no per-step host sync (the loss is kept on the device)
  sync_per_step loss.item() every step (what a progress callback or a logging Trainer costs)
  fp32          no autocast, fp32 base weights (the CPU default), for reference
Prints steps/s and tokens/s per variant and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def build(args, device, dtype):
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)  # LoRA weights stay fp32 (autocast_adapter_dtype)
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_base, n_lora


def time_variant(model, args, device, *, autocast: bool, sync: bool, steps: int, warmup: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(4)]
    batches = [b.to(device) for b in batches]
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else (
        lambda: torch.autocast(device.type, enabled=False))
    model.train()

    def one(i):
        ids = batches[i % len(batches)]
        with ctx():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sync:
            loss.item()
        return loss.detach()

    for i in range(warmup):
        one(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(one(i))
    final = torch.stack(losses).float().mean().item()  # the one host sync of the timed region
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed,
           "tokens_per_s": steps * args.batch * args.seq / elapsed, "mean_loss": final}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, fp32 allowed: a smoke check")
    parser.add_argument("--device", default=None, help="default: cuda if available (required unless --tiny)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="ours,sync_per_step,fp32")
    parser.add_argument("--out", default="gpu_inner_loop.json")
    args = parser.parse_args()

    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.vocab, args.batch, args.seq, args.steps, args.warmup = 256, 2, 32, 5, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for a CPU smoke check")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    started = time.perf_counter()
    results = {}
    model = None
    for variant in variants:
        fp32 = variant == "fp32" or device.type != "cuda"
        dtype = torch.float32 if fp32 else torch.bfloat16
        if model is None or getattr(model, "_bench_dtype", None) != dtype:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model, n_base, n_lora = build(args, device, dtype)
            model._bench_dtype = dtype
        res = time_variant(model, args, device, autocast=variant != "fp32" and device.type == "cuda",
                           sync=variant == "sync_per_step", steps=args.steps, warmup=args.warmup)
        results[variant] = res
        print(f"{variant:>14}: {res['steps_per_s']:8.2f} steps/s {res['tokens_per_s']:12.0f} tokens/s"
              + (f"  peak {res['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in res else ""), flush=True)
    out = {
        "benchmark": "gpu_inner_loop", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "tiny": args.tiny,
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab,
                  "base_params": n_base, "lora_params": n_lora},
        "batch": args.batch, "seq": args.seq, "lora_rank": 8, "variants": results,
        "wall_s": time.perf_counter() - started,
    }
    if "ours" in results and "sync_per_step" in results:
        out["sync_per_step_slowdown"] = results["ours"]["steps_per_s"] / results["sync_per_step"]["steps_per_s"]
    if "ours" in results and "fp32" in results and device.type == "cuda":
        out["bf16_speedup_over_fp32"] = results["ours"]["steps_per_s"] / results["fp32"]["steps_per_s"]
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
