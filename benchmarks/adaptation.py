"""Part 3: adaptation latency, from `POST /adapt` with 100 examples to the first completion with the new
adapter, broken down, side by side with what a user would otherwise write: HF transformers `Trainer` + peft
on the same examples, steps, rank and batch size, `save_pretrained`, then `/v1/load_lora_adapter` into the
same vLLM server (runtime LoRA updating is on there) and a first completion.

Where the breakdown comes from (nothing here changes the worker):
- queue wait = job.started_at - job.created_at (store timestamps, written by the gateway and the worker);
- the K steps: the worker writes progress (step, updated_at) at step 1 and then every 0.5 s; this
  benchmark reads the job record from the store every 50 ms, and the per-step time is the slope between the
  first and the last progress write; K steps = slope x K;
- `metrics.seconds` (the worker's `engine.train` call) minus the K steps = encoding, LoRA reset and the two
  held-out loss evaluations (before and after);
- worker time outside `engine.train` = (finished_at - started_at) - metrics.seconds: reading the examples,
  progress writes, the PEFT save into the adapter store and marking the version ready (registration);
- notice = when the client's poll saw `succeeded`, minus finished_at (50 ms poll);
- first completion: its latency through the gateway; resolve/load = that minus a warm completion's.
The K steps are also timed in this process (our `adapt` vs `Trainer`, interleaved, same thread count), which
is the cleaner comparison for the "1.5x faster" target.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)

from adapters.backend import open_backend
from adapters.settings import Settings
from benchmarks.common import median
from tests.stack_data import examples as stack_examples
from trainer.data import encode_examples
from trainer.engine import split_holdout
from trainer.inner_loop import adapt


def examples(n: int = 100) -> list[dict]:
    return stack_examples("square", n)


PROMPT = "Word: teapot\nAnswer:"
JOB_TIMEOUT_S = 900.0


async def _complete(client: httpx.AsyncClient, url: str, model: str, adapter: str | None = None) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    if adapter:
        body["adapter"] = adapter
    t0 = time.perf_counter()
    response = await client.post(url + "/v1/completions", json=body)
    elapsed = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"completion with {adapter or model} failed: {response.status_code} {response.text[:300]}")
    return elapsed


# ---------------------------------------------------------------- ours, through the stack
async def _ours_once(gateway_url: str, data_dir: Path, base_model: str, name: str) -> dict:
    backend = open_backend(Settings(data_dir=data_dir))
    try:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=600) as client:
            exs = examples()
            t_submit = time.time()
            response = await client.post("/adapt", json={"adapter": name, "examples": exs})
            t_accepted = time.time()
            if response.status_code != 202:
                raise RuntimeError(f"/adapt: {response.status_code} {response.text[:300]}")
            job_id = response.json()["id"]
            progress: list[tuple[int, float]] = []
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} not finished after {JOB_TIMEOUT_S:.0f}s (step {job.step if progress else 0},"
                                       f" status {job.status.value if progress else 'unknown'})")
                job = await backend.store.get_job(job_id)
                if job.step and (not progress or progress[-1][0] != job.step):
                    progress.append((job.step, job.updated_at))
                if job.status.finished:
                    t_seen = time.time()
                    break
                await asyncio.sleep(0.05)
            if job.status.value != "succeeded":
                raise RuntimeError(f"job {job_id} failed: {job.error}")
            t0 = time.time()
            first = await _complete(client, gateway_url, base_model, name)
            t_first_done = t0 + first
            warm = median([await _complete(client, gateway_url, base_model, name) for _ in range(3)])
            base = median([await _complete(client, gateway_url, base_model) for _ in range(3)])
    finally:
        await backend.close()
    m = job.metrics
    k = m["steps"]
    # progress writes before the final one (which comes after engine.train returned)
    during = [(s, t) for s, t in progress if s < k] or progress
    if len(during) >= 2 and during[-1][0] > during[0][0]:
        per_step = (during[-1][1] - during[0][1]) / (during[-1][0] - during[0][0])
        per_step_source = f"progress writes at steps {during[0][0]}..{during[-1][0]}"
    else:
        per_step = None
        per_step_source = "too few progress writes to estimate"
    worker_s = job.finished_at - job.started_at
    k_steps = per_step * k if per_step else None
    out = {
        "job_id": job_id, "steps": k, "num_train": m.get("num_train"), "init": m.get("init"),
        "loss_before": m.get("loss_before"), "loss_after": m.get("loss_after"),
        "submit_s": t_accepted - t_submit,
        "queue_wait_s": job.started_at - job.created_at,
        "k_steps_s": k_steps, "per_step_s": per_step, "per_step_source": per_step_source,
        "train_call_s": m["seconds"],
        "train_call_other_s": (m["seconds"] - k_steps) if k_steps else None,
        "worker_outside_train_s": worker_s - m["seconds"],
        "notice_s": t_seen - job.finished_at,
        "first_completion_s": first, "warm_completion_s": warm, "base_completion_s": base,
        "resolve_load_s": first - warm,
        "total_s": t_first_done - t_submit,
    }
    if k_steps:
        out["everything_but_k_steps_s"] = out["total_s"] - k_steps
        out["overhead_over_k_steps"] = out["everything_but_k_steps_s"] / k_steps
    return out


def ours_via_stack(gateway_url: str, data_dir: Path, base_model: str, name: str) -> dict:
    return asyncio.run(_ours_once(gateway_url, data_dir, base_model, name))


# ---------------------------------------------------------------- the baseline: Trainer + peft + runtime load
def _train_set(tokenizer, config):
    encoded = encode_examples(tokenizer, examples(), config.max_seq_len)
    train, _ = split_holdout(encoded, config)  # the same 90 examples the worker trains on
    return train


def trainer_baseline(model_dir: Path, vllm_url: str, name: str, workdir: Path, config) -> dict:
    """What a user would write with transformers + peft: defaults wherever `config` (the AdaptConfig a job
    gets) does not say."""
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    t_loaded = time.perf_counter()
    model = get_peft_model(model, config.lora_config())
    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in _train_set(tokenizer, config)]

    class StepClock(TrainerCallback):
        first = last = None

        def on_step_begin(self, args, state, control, **kw):
            if StepClock.first is None:
                StepClock.first = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            StepClock.last = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(workdir / "trainer-out"), per_device_train_batch_size=config.batch_size,
        max_steps=config.steps, learning_rate=config.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch", seed=config.seed, use_cpu=True,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10_000,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    t_setup = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[StepClock()])
    t_train0 = time.perf_counter()
    trainer.train()
    t_train1 = time.perf_counter()
    out_dir = workdir / name
    model.save_pretrained(str(out_dir))
    t_saved = time.perf_counter()
    with httpx.Client(base_url=vllm_url, timeout=600) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(out_dir)})
        t_registered = time.perf_counter()
        if r.status_code != 200:
            raise RuntimeError(f"/v1/load_lora_adapter: {r.status_code} {r.text[:300]}")
        body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        t_first = time.perf_counter()
        if r.status_code != 200:
            raise RuntimeError(f"baseline completion failed: {r.status_code} {r.text[:300]}")
        warm = []
        for _ in range(3):
            t = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            warm.append(time.perf_counter() - t)
        client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    k_steps = StepClock.last - StepClock.first
    total = t_first - t_loaded  # model load excluded: our worker keeps the base model resident
    return {
        "steps": config.steps, "num_train": len(train), "max_grad_norm": args.max_grad_norm,
        "model_load_s_excluded": t_loaded - t0,
        "setup_s": t_train0 - t_loaded, "trainer_train_s": t_train1 - t_train0, "k_steps_s": k_steps,
        "per_step_s": k_steps / config.steps, "save_s": t_saved - t_train1,
        "load_lora_adapter_s": t_registered - t_saved, "first_completion_s": t_first - t_registered,
        "warm_completion_s": median(warm), "resolve_load_s": (t_first - t_registered) - median(warm),
        "total_s": total, "everything_but_k_steps_s": total - k_steps,
        "overhead_over_k_steps": (total - k_steps) / k_steps,
        "final_train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
    }


# ---------------------------------------------------------------- K steps in this process: ours vs Trainer
def ours_in_process(engine, name: str) -> dict:
    """Our inner loop on the worker's own engine class, same examples/config, timed around `adapt`."""
    config = engine.default_config
    train = _train_set(engine.tokenizer, config)
    engine.reset_lora(config)
    t0 = time.perf_counter()
    losses = adapt(engine.model, train, config)
    k_steps = time.perf_counter() - t0
    t1 = time.perf_counter()
    outcome = engine.train(examples(), config)
    train_call = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as tmp:
        t2 = time.perf_counter()
        engine.save(Path(tmp) / name, str(engine.base_model_dir))
        save_s = time.perf_counter() - t2
    return {"k_steps_s": k_steps, "per_step_s": k_steps / config.steps, "final_train_loss": losses[-1],
            "train_call_s": train_call,
            # encode + LoRA reset + held-out loss before/after: engine.train minus a separately timed adapt
            "train_call_other_s": outcome.metrics["seconds"] - k_steps, "save_s": save_s}


def summarize(ours_stack: list[dict], ours_proc: list[dict], baseline: list[dict]) -> dict:
    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return median(vals)

    ours_k_proc, base_k = med(ours_proc, "k_steps_s"), med(baseline, "k_steps_s")
    ours_k_stack = med(ours_stack, "k_steps_s")
    # Paired: the i-th Trainer run against the i-th in-process run of ours (run back to back), and best-of-N,
    # which is the estimate least affected by other load on a shared box.
    pairs = [b["k_steps_s"] / o["k_steps_s"] for b, o in zip(baseline, ours_proc)]
    best_ours = min((r["k_steps_s"] for r in ours_proc), default=None)
    best_base = min((r["k_steps_s"] for r in baseline), default=None)
    summary = {
        "k_steps_speedup_in_process": base_k / ours_k_proc if ours_k_proc else None,
        "k_steps_speedup_paired": pairs, "k_steps_speedup_paired_median": median(pairs),
        "k_steps_speedup_best_of_n": best_base / best_ours if best_ours else None,
        "k_steps_speedup_stack_worker": base_k / ours_k_stack if ours_k_stack else None,
        "ours_overhead_over_k_steps": med(ours_stack, "overhead_over_k_steps"),
        # Per round too: one contended round moves a median of few rounds, and the reader should see it.
        "ours_overhead_per_round": [r.get("overhead_over_k_steps") for r in ours_stack],
        "baseline_overhead_over_k_steps": med(baseline, "overhead_over_k_steps"),
        "ours_total_s": med(ours_stack, "total_s"), "baseline_total_s": med(baseline, "total_s"),
        "end_to_end_speedup": (med(baseline, "total_s") / med(ours_stack, "total_s")) if ours_stack else None,
        "breakdown_ours_median_s": {k: med(ours_stack, k) for k in (
            "submit_s", "queue_wait_s", "train_call_other_s", "k_steps_s", "worker_outside_train_s", "notice_s",
            "resolve_load_s", "warm_completion_s")},
        "breakdown_baseline_median_s": {k: med(baseline, k) for k in (
            "setup_s", "k_steps_s", "save_s", "load_lora_adapter_s", "resolve_load_s", "warm_completion_s")},
    }
    # Second split of the stack's worker time: the encode + evaluations share measured in process (engine.train
    # minus a separately timed adapt), which counts step 1's warm-up as a step, unlike the progress-write slope.
    other = med(ours_proc, "train_call_other_s")
    if other is not None and ours_stack:
        alt = [(r["total_s"] - (r["train_call_s"] - other)) / (r["train_call_s"] - other) for r in ours_stack]
        summary["ours_overhead_over_k_steps_engine_split"] = median(alt)
    summary["targets"] = {"overhead_over_k_steps_max": 0.10, "k_steps_speedup_min": 1.5}
    return summary
