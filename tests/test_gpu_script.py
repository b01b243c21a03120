"""scripts/gpu_meta_compare.sh, the GPU comparison, checked on the CPU with --smoke on a tiny model and tiny task
folders: every output the GPU run writes is there and carries its provenance; the budget stops runs still going."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks.meta_compare import BUNDLE, Job, main as meta_compare, run_parallel
from tests.test_inner_loop import save_tiny_model
from tests.test_meta import make_task
from trainer.tasks.format import write_task

REPO = Path(__file__).resolve().parent.parent
TINY = ["--meta_batch_tasks=2", "--support_size=8", "--query_size=8", "--inner_steps=2", "--inner_batch_size=4",
        "--max_seq_len=64"]


def test_smoke_run_writes_logs_provenance_summary_plot_and_bundle(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    for shift in range(4):  # option tasks in two families; --smoke holds 2 out for validation
        rows = [{**ex, "options": [ex["completion"], " none"], "answer": 0} for ex in make_task(shift)]
        write_task(tmp_path / "tasks" / f"fam_{'ab'[shift % 2]}__{shift}",
                   {"train": rows, "validation": rows[:4], "test": rows[:4]})
    out = tmp_path / "out"
    env = {**os.environ, "MODEL_DIR": str(model_dir), "TASKS_DIR": str(tmp_path / "tasks"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_meta_compare.sh", "--smoke", f"--out={out}", "--device=cpu", "--",
                           *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = out / "fomaml-s0"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "tasks" in r] == [1, 2]
    assert [r["step"] for r in log if "val_loss_adapted" in r] == [0, 1, 2]
    meta = json.loads((run / "shared_init" / "metalora_meta.json").read_text())
    assert meta["method"] == "fomaml" and meta["steps_done"] == 2 and len(meta["data"]["val_tasks"]) == 2
    prov = json.loads((run / "provenance.json").read_text())
    assert "trainer.train_meta" in prov["command"] and "--method=fomaml" in prov["command"]
    assert prov["git_commit"] and prov["gpu"] is None and prov["device"] == "cpu"
    assert prov["precision"] in ("fp32", "bf16 autocast") and prov["wall_s"] > 0 and prov["exit_code"] == 0
    assert not prov["cut_short"] and prov["steps_done"] == prov["steps_logged"] == 2 and prov["exported"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["common_step"] == 2 and list(summary["runs"]) == ["fomaml-s0"]
    assert "| fomaml-s0 | 2 |" in (out / "summary.md").read_text()
    assert summary["plot"] == ((out / "meta_compare.png").is_file() and (out / "meta_compare.png").stat().st_size > 0)
    with tarfile.open(out / BUNDLE) as tar:
        names = set(tar.getnames())
    assert {"out/summary.json", "out/fomaml-s0/log.jsonl", "out/fomaml-s0/provenance.json",
            "out/fomaml-s0/shared_init/metalora_meta.json"} <= names
    assert not any(n.endswith(("ckpt.pt", ".safetensors")) for n in names)  # no weights travel back

    # --collect summarizes runs made elsewhere (one by one on a CPU) without running anything: a second run of the
    # seed that skipped its step-0 validation borrows the seed's baseline, and each run keeps its measured wall time.
    twin = out / "reptile-s0"
    shutil.copytree(run, twin)
    (twin / "log.jsonl").write_text("".join(line + "\n" for line in (run / "log.jsonl").read_text().splitlines()
                                            if json.loads(line)["step"] != 0 or "tasks" in json.loads(line)))
    (twin / "wall_s").write_text("123.4")
    shutil.copytree(run, out / "fomaml-lr0.003-s0")  # a swept rate's run, named as the sweep names it
    (out / "average-s0").mkdir()  # begun, never exported: left out
    collected = meta_compare([f"--out={out}", "--collect", "--methods=fomaml,reptile,average", "--seeds=0",
                              "--device=cpu"])
    assert set(collected["runs"]) == {"fomaml-s0", "fomaml-lr0.003-s0", "reptile-s0"}
    assert collected["common_step"] == 2 and collected["runs"]["fomaml-lr0.003-s0"]["outer_lr"] == 0.003
    assert collected["chosen_outer_lr"]["fomaml"]["outer_lr"] == 0.003
    assert collected["git_commit"] == meta["git_commit"]  # the runs' commit, not the collecting checkout's
    twin_run = collected["runs"]["reptile-s0"]
    assert twin_run["wall_s"] == 123.4 and twin_run["validations"][0]["borrowed_from"] == "fomaml-s0"
    assert "--method=fomaml" in twin_run["command"]  # read back from the export, as it ran


def test_budget_stops_runs_still_going(tmp_path):
    jobs = [Job(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")
            for name, code in (("quick", "pass"), ("slow", "import time; time.sleep(60)"), ("queued", "pass"))]
    t0 = time.monotonic()
    run_parallel(jobs, t0 + 5, parallel=1)
    quick, slow, queued = jobs
    assert quick.exit_code == 0 and not quick.cut_short
    assert slow.cut_short and slow.exit_code != 0 and time.monotonic() - t0 < 20
    assert queued.cut_short and queued.exit_code is None  # never started: one at a time, and the budget was spent


def test_an_outer_lr_sweep_runs_every_rate_per_seed_and_chooses_on_validation_at_the_common_step(tmp_path):
    from benchmarks.meta_compare import choose_outer_lr, parse_args, parse_run_name, run_name

    args, _ = parse_args(["--methods=fomaml,reptile,average", "--outer_lrs", "fomaml=3e-4,1e-3",
                          "--outer_lrs", "reptile=0.25,0.5"])
    assert args.sweep == {"fomaml": [3e-4, 1e-3], "reptile": [0.25, 0.5]}
    assert (run_name("fomaml", 1, 3e-4), run_name("average", 0, None)) == ("fomaml-lr0.0003-s1", "average-s0")
    for method, seed, lr in (("fomaml", 1, 3e-4), ("reptile", 12, 1e-5), ("average", 0, None)):
        assert parse_run_name(run_name(method, seed, lr)) == (method, seed, lr)
    assert parse_run_name("shared_init") is None and parse_run_name("fomaml-lrfast-s0") is None
    for bad in ("average=0.5", "fomaml", "sgd=1e-3", "fomaml=fast"):
        with pytest.raises(SystemExit):
            parse_args(["--methods=fomaml,reptile,average", "--outer_lrs", bad])

    def run(method, lr, seed, losses):  # validation loss after K steps at steps 0, 10, 20
        return {"method": method, "outer_lr": lr, "seed": seed,
                "validations": [{"step": s, "val_loss_adapted": x} for s, x in zip((0, 10, 20), losses)]}

    runs = {"a": run("fomaml", 3e-4, 0, (1.0, 0.80, 0.70)), "b": run("fomaml", 3e-4, 1, (1.0, 0.90, 0.80)),
            "c": run("fomaml", 1e-3, 0, (1.0, 0.70, 0.74)), "d": run("fomaml", 1e-3, 1, (1.0, 0.75, 0.78)),
            "e": run("reptile", 0.5, 0, (1.0, 0.9, 0.9)), "f": {**run("average", None, 0, (1.0, 0.5, 0.4))}}
    chosen = choose_outer_lr(runs, 20)
    # At step 20 the mean over seeds favours 3e-4 (0.75 vs 0.76), though 1e-3 led at step 10: the common step decides.
    assert chosen["fomaml"]["outer_lr"] == 3e-4 and chosen["fomaml"]["mean_val_loss_by_lr"] == {"0.0003": 0.75,
                                                                                                "0.001": 0.76}
    assert choose_outer_lr(runs, 10)["fomaml"]["outer_lr"] == 1e-3
    assert chosen["reptile"]["outer_lr"] == 0.5 and "average" not in chosen  # a method run at one fixed step


def test_the_comparison_sweeps_each_methods_outer_rate_by_default_and_smoke_does_not():
    from benchmarks.meta_compare import parse_args

    assert parse_args([])[0].sweep == {"fomaml": [3e-4, 1e-3, 3e-3], "reptile": [0.25, 0.5]}
    assert parse_args(["--methods=fomaml"])[0].sweep == {"fomaml": [3e-4, 1e-3, 3e-3]}
    assert parse_args(["--no_sweep"])[0].sweep == {} and parse_args(["--smoke"])[0].sweep == {}
