"""Whether the in-context cells of results parts were measured with as many demos as today's rule gives
(trainer/evaluate.py `icl_prefix`): recomputes each (task, seed)'s demo count from the protocol's draw and test
items (tokenization only, no model) and compares it with the `n_demos` each part recorded.

    python -m benchmarks.icl_demo_counts results/eval/parts/*.json --out results/eval/icl-demo-counts.md

A rule change that keeps every recorded count leaves the measured cells valid under it; a differing count names the
cell to rerun. Exits 1 when any recorded count differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from adapters.settings import Settings
from trainer.evaluate import ICL_MAX_TOKENS, PROTOCOLS, icl_prefix, protocol_task_dirs, training_draw
from trainer.model_prep import ensure_base_model
from trainer.provenance import git_commit
from trainer.tasks.fetch import default_cache_dir
from trainer.tasks.format import load_task


def recorded_counts(parts: list[Path], protocol: str) -> dict[tuple[str, int], set[int]]:
    """(task, seed) -> the demo counts in_context rows recorded, over the parts: evaluate parts of `protocol`, with
    its draw, test items and today's budget (anything else would be recomputed for other demos or items)."""
    proto = PROTOCOLS[protocol]
    want = {"protocol": protocol, "n_train": proto.n_train, "max_test": proto.max_test, "draw": "random",
            "icl_max_tokens": ICL_MAX_TOKENS}
    counts: dict[tuple[str, int], set[int]] = {}
    for path in parts:
        part = json.loads(path.read_text())
        have = {key: part.get(key, "random" if key == "draw" else None) for key in want}
        if have != want:
            raise SystemExit(f"{path}: not a part of this protocol with today's budget (has {have}, wants {want})")
        for row in part["rows"]:
            if row["method"] == "in_context":
                counts.setdefault((row["task"], row["seed"]), set()).add(row["n_demos"])
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", type=Path, help="results.json parts of the protocol")
    p.add_argument("--protocol", default="heldout", choices=sorted(PROTOCOLS))
    p.add_argument("--seeds", default="0,1,2", help="seeds to recompute (recorded or not)")
    p.add_argument("--tasks-root", type=Path, default=default_cache_dir() / "olmo")
    p.add_argument("--out", type=Path, help="markdown table to write (default: print only)")
    a = p.parse_args(argv)
    proto = PROTOCOLS[a.protocol]
    tokenizer = AutoTokenizer.from_pretrained(ensure_base_model(Settings()))
    recorded = recorded_counts(a.parts, a.protocol)
    lines = [f"# In-context demo counts: recorded vs `icl_prefix` at {git_commit()}", "",
             f"Command: `python -m benchmarks.icl_demo_counts {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"Budget {ICL_MAX_TOKENS} tokens; protocol `{a.protocol}` ({proto.n_train} examples, <= {proto.max_test} "
             "test items). Tokenization only: no model runs, no answer is read.", "",
             "| task | seed | recorded | today's rule | |", "|---|---|---|---|---|"]
    differing = 0
    for task_dir in protocol_task_dirs(a.protocol, a.tasks_root):
        task = load_task(task_dir)
        test = task.test[:proto.max_test]
        for seed in (int(s) for s in a.seeds.split(",")):
            n = icl_prefix(tokenizer, training_draw(task, seed, proto.n_train), test, ICL_MAX_TOKENS)[1]
            was = recorded.get((task.name, seed))
            status = "not recorded" if was is None else ("same" if was == {n} else "DIFFERS: rerun")
            differing += status.startswith("DIFFERS")
            shown = ", ".join(map(str, sorted(was))) if was else "-"
            lines.append(f"| {task.name} | {seed} | {shown} | {n} | {status} |")
    lines += ["", f"{differing} recorded cell(s) differ."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
