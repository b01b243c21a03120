"""All benchmarks, one command, CPU only (target: under 45 minutes on the 2-core dev box):

    python -m benchmarks.run_all --out results/bench          # to become `make bench`

Starts the real stack once (`metalora serve` via tests/conftest.py:start_stack, embedded SQLite store) on free
ports with 64 registered random-weight adapters, then runs, each against a baseline measured in the same run
in interleaved rounds:
  1. gateway overhead: the same load straight to vLLM and through the gateway;
  2. many adapters: requests spread over 0 (base), 1, 4, 16, 64 adapters;
  3. adaptation latency: POST /adapt -> first completion, broken down, vs Trainer + peft + runtime LoRA load;
  8. examples to first adapted token, broken down, and the first request to a new version cold vs warm
     (benchmarks/first_token.py);
then stops the stack and runs
  5. meta-training cost: one first-order outer step vs one plain LoRA step (time, peak memory);
  4. steps to quality: read from the evaluation's JSON if present, else "not run";
  6. the GPU inner-loop script's JSON, if it was run on a GPU (benchmarks/gpu_inner_loop.py);
  7. vLLM-CPU serving speed with vLLM's own client (`vllm bench serve`), base vs 1 vs 16 adapters, directly and
     through the gateway, with the engine defaults before issue 21 and now, interleaved in one run, then the
     engine knobs and a merged copy of one adapter against the new defaults (benchmarks/cpu_serving.py), and
     vLLM-CPU's LoRA kernels against the base projections, prefill and decode (benchmarks/lora_cpu_ops.py).
     Written to <out>/cpu_serving.{json,md}, or <out>/cpu_serving_knobs.{json,md} by a knob-only run
     (`--cpu-configs ''`), which leaves the main phase's files alone.
Writes <out>/results.json, <out>/summary.md and <out>/*.png, with the command line and the git commit
(trainer.provenance).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from adapters.base_model import base_model_path
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.settings import Settings
from benchmarks import cpu_serving
from benchmarks.common import REPO, log, machine_info, write_json
from benchmarks.first_token import first_token
from benchmarks.meta_cost import meta_training_cost, steps_to_quality
from benchmarks.report import write_plots, write_summary
from trainer.provenance import git_commit
from trainer.worker import shared_init_path

N_ADAPTERS = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--parts", default="1,2,3,4,5,6,7,8", help="comma-separated subset of 1..8")
    p.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not for reporting")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds for parts 1 and 2")
    p.add_argument("--adapt-repeats", type=int, default=3, help="part 3 repetitions of each side (a median needs 3)")
    p.add_argument("--eval-json", default=None, help="part 4: the evaluation's results JSON")
    p.add_argument("--merge", action="store_true",
                   help="update <out>/results.json in place: replace only the parts run now (both commands are recorded)")
    p.add_argument("--gpu-json", default=None, help="part 6: gpu_inner_loop.py's JSON from a GPU run")
    p.add_argument("--cpu-configs", default="old,new",
                   help="part 7: the configurations compared at every target and load (benchmarks/cpu_serving.py)")
    p.add_argument("--cpu-knobs", default=",".join(cpu_serving.DEFAULT_KNOBS),
                   help="part 7: knob variants measured against 'new', directly, at their loads; any of "
                   + ",".join(n for n in cpu_serving.CONFIGS if n not in ("old", "new"))
                   + f" ('{cpu_serving.MERGED}': the first adapter merged into the base weights, served without LoRA)")
    p.add_argument("--cpu-targets", default="direct,gateway", help="part 7: direct, gateway or both")
    p.add_argument("--cpu-loads", default="base,1,16", help="part 7: base, 1 and/or 16 adapters")
    p.add_argument("--cpu-rounds", type=int, default=2, help="part 7: interleaved rounds (every other reversed)")
    p.add_argument("--cpu-prompts", type=int, default=48, help="part 7: prompts per cell, over all rounds")
    p.add_argument("--cpu-knob-prompts", type=int, default=32, help="part 7: prompts per knob cell")
    p.add_argument("--cpu-knob-batch", type=int, default=1,
                   help="part 7: knob engines up at once beside 'new' (each takes ~4 GB with its KV cache; at most"
                   f" {cpu_serving.MAX_ENGINES} engines in all)")
    p.add_argument("--cpu-lora-ops", action=argparse.BooleanOptionalAction, default=True,
                   help="part 7: also time vLLM-CPU's LoRA kernels (benchmarks/lora_cpu_ops.py)")
    return p.parse_args(argv)


def run_stack_parts(args, parts: set[int], results: dict) -> None:
    # The stack harness (pytest's conftest) and the benchmarks that load transformers + peft: only parts 1-3 need
    # them, so `--parts 4,5,6` runs without.
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import start_stack, stop_stack

    from benchmarks import adaptation, serving

    # 4 rounds of 4 x concurrency requests per side and condition: about a minute per condition where vLLM-CPU
    # serves ~1 req/s, which keeps the whole run inside its 45-minute target.
    rounds = args.rounds or (2 if args.quick else 4)
    tmp = Path(tempfile.mkdtemp(prefix="metalora-bench-"))
    data_dir = tmp / "bench-data"
    names = [f"bench-a{i:02d}" for i in range(N_ADAPTERS)]
    t0 = time.perf_counter()
    serving.register_random_adapters(data_dir, names)
    log(f"registered {len(names)} random adapters in {time.perf_counter() - t0:.1f}s ({data_dir})")
    settings = Settings(data_dir=data_dir)
    t0 = time.perf_counter()
    stack = start_stack(tmp, {"METALORA_DATA_DIR": str(data_dir)})
    results["stack"] = {"start_s": time.perf_counter() - t0, "store": "sqlite (embedded default)",
                        "max_loras": settings.vllm_max_loras, "max_cpu_loras": settings.vllm_max_cpu_loras}
    vllm_url = stack.env["METALORA_VLLM_URLS"].split(",")[0]
    log(f"stack up in {results['stack']['start_s']:.0f}s: gateway {stack.url}, vLLM {vllm_url}")
    try:
        if 1 in parts:
            results["gateway_overhead"] = _guard(lambda: serving.gateway_overhead(
                stack.url, vllm_url, stack.base_model, names[0], vllm_name(DEFAULT_TENANT, names[0], 1),
                rounds=rounds, concurrency=args.concurrency, requests_per_round=args.concurrency * 4,
                max_tokens=args.max_tokens))
        if 2 in parts:
            counts = [0, 1, 4, 16, 64]
            results["many_adapters"] = _guard(lambda: serving.many_adapters(
                stack.url, stack.base_model, names, counts, rounds=max(2, rounds - 2),
                concurrency=args.concurrency * 2, requests_per_round=args.concurrency * 2 * 4,
                max_tokens=args.max_tokens, max_loras=settings.vllm_max_loras,
                max_cpu_loras=settings.vllm_max_cpu_loras))
        if 3 in parts:
            results["adaptation"] = _guard(lambda: run_adaptation(args, stack, vllm_url, data_dir, tmp))
        if 8 in parts:  # examples -> first adapted token, cold vs warm first request (benchmarks/first_token.py)
            results["first_token"] = _guard(lambda: first_token(stack.url, vllm_url, data_dir, stack.base_model,
                                                                1 if args.quick else args.adapt_repeats))
    finally:
        stop_stack(stack)
        results["stack"]["logs_tail"] = stack.logs()[-3000:] if any("error" in str(v) for v in results.values()) else ""


def run_adaptation(args, stack, vllm_url: str, data_dir: Path, tmp: Path) -> dict:
    from benchmarks import adaptation  # transformers + peft, as in run_stack_parts
    from trainer.engine import AdaptEngine

    model_dir = base_model_path(Settings(data_dir=data_dir))
    repeats = 1 if args.quick else args.adapt_repeats
    ours_stack, ours_proc, baseline = [], [], []
    # The worker's engine class with the worker's init, so all three sides run the procedure a job gets
    # (a shipped init sets K and the learning rate).
    engine = AdaptEngine(model_dir, shared_init_path(Settings(data_dir=data_dir), model_dir), device="cpu")
    for r in range(repeats):
        order = ["stack", "trainer", "proc"] if r % 2 == 0 else ["proc", "trainer", "stack"]
        for side in order:
            if side == "stack":
                ours_stack.append(adaptation.ours_via_stack(stack.url, data_dir, stack.base_model, f"adapt-{r}"))
                row = ours_stack[-1]
                log(f"part 3 ours (stack) {r + 1}: total {row['total_s']:.1f}s, K steps {row['k_steps_s'] or 0:.1f}s,"
                    f" overhead {row.get('overhead_over_k_steps', float('nan')):.2f}x of K steps")
            elif side == "trainer":
                baseline.append(adaptation.trainer_baseline(model_dir, vllm_url, f"trainer-{r}", tmp, engine.default_config))
                row = baseline[-1]
                log(f"part 3 Trainer baseline {r + 1}: total {row['total_s']:.1f}s, K steps {row['k_steps_s']:.1f}s")
            else:
                ours_proc.append(adaptation.ours_in_process(engine, f"proc-{r}"))
                log(f"part 3 ours (in process) {r + 1}: K steps {ours_proc[-1]['k_steps_s']:.1f}s")
    return {"ours_stack": ours_stack, "ours_in_process": ours_proc, "trainer_baseline": baseline,
            "summary": adaptation.summarize(ours_stack, ours_proc, baseline),
            "config": {"examples": 100, "held_out": "10% (the worker's default), so 90 train",
                       "adapt_config": engine.default_config.to_dict(),
                       "init": "standard (no shared init is shipped for this base model yet)"
                       if engine.shared is None else "shared"}}


def cpu_serving_part(args, on_config) -> dict:
    # vllm's client, peft-format adapters and vLLM's LoRA kernels, as in run_stack_parts
    from benchmarks import lora_cpu_ops, serving

    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    t0 = time.perf_counter()
    result = cpu_serving.cpu_serving(
        split(args.cpu_configs), split(args.cpu_knobs), split(args.cpu_targets), split(args.cpu_loads),
        serving.register_random_adapters, rounds=args.cpu_rounds, prompts=args.cpu_prompts,
        knob_prompts=args.cpu_knob_prompts, knob_batch=args.cpu_knob_batch, on_result=on_config)
    if args.cpu_lora_ops:
        result["lora_ops"] = _guard(lambda: lora_cpu_ops.main(["--repeats", "5"]))
    return {**result, "wall_s": time.perf_counter() - t0, "precision": "bfloat16 (vLLM-CPU's default dtype here)"}


def cpu_serving_stem(args) -> str:
    """A run without the main phase measures knobs only: its files sit beside the main phase's, not over them."""
    return "cpu_serving" if [c for c in args.cpu_configs.split(",") if c] else "cpu_serving_knobs"


def _guard(fn):
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def gpu_part(path: str | None, out: Path) -> dict:
    """The GPU result if one was produced on a GPU box; here, only the script's --tiny CPU smoke check."""
    smoke = out / "gpu_inner_loop_tiny.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_inner_loop.py"), "--tiny", "--out", str(smoke)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    smoke_status = "ok" if proc.returncode == 0 else f"failed: {proc.stderr[-500:]}"
    result = _gpu_json(path)
    result["tiny_cpu_smoke"] = smoke_status
    return result


def _gpu_json(path: str | None) -> dict:
    candidates = [Path(path)] if path else [REPO / "results/bench/gpu_inner_loop.json"]
    for c in candidates:
        if c.is_file():
            data = json.loads(c.read_text())
            if data.get("tiny"):
                return {"status": "smoke only (--tiny on CPU)", "path": str(c), "results": data}
            return {"status": "read", "path": str(c), "results": data}
    return {"status": "not run here (no GPU)",
            "command": "python benchmarks/gpu_inner_loop.py --out results/bench/gpu_inner_loop.json"}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    command = "python -m benchmarks.run_all " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    previous = json.loads((out / "results.json").read_text()) if args.merge and (out / "results.json").is_file() else {}
    results: dict = {**previous,
        "command": command, "git_commit": git_commit(), "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
    }
    if previous:
        results["merged_from"] = previous.get("merged_from", []) + [
            {k: previous[k] for k in ("command", "git_commit", "git", "started_at", "wall_s") if k in previous}]
        for stale in ("wall_s", "partial", "git"):  # "git": the earlier run's commit, in the older format
            results.pop(stale, None)
    def checkpoint() -> None:  # a run cut short still leaves what it measured
        write_json(out / "results.json", {**results, "partial": True})

    if parts & {1, 2, 3, 8}:
        run_stack_parts(args, parts, results)
        checkpoint()
    if 5 in parts:
        results["meta_training_cost"] = _guard(lambda: meta_training_cost(rounds=1 if args.quick else 2))
        checkpoint()
    if 4 in parts:
        results["steps_to_quality"] = steps_to_quality(args.eval_json)
    if 6 in parts:
        results["gpu_inner_loop"] = _guard(lambda: gpu_part(args.gpu_json, out))
    if 7 in parts:
        stem = cpu_serving_stem(args)  # also its key in results.json

        def partial(cpu_result: dict) -> None:
            results[stem] = cpu_result
            checkpoint()

        results[stem] = _guard(lambda: cpu_serving_part(args, partial))
        checkpoint()
        header = {"command": command, "commit": results["git_commit"], "started_at": results["started_at"],
                  "precision": results[stem].get("precision"), "machine": results["machine"],
                  "wall time": f"{results[stem].get('wall_s', 0) / 60:.1f} min"}
        write_json(out / f"{stem}.json", {**header, **results[stem]})
        _guard(lambda: cpu_serving.write_markdown(results[stem], out / f"{stem}.md", header))
    results["wall_s"] = time.time() - started
    write_json(out / "results.json", results)
    plots = _guard(lambda: write_plots(results, out))
    write_summary(results, out, plots if isinstance(plots, list) else [])
    log(f"done in {results['wall_s'] / 60:.1f} min: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
