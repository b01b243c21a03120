"""Content-level leakage check: no prompt of the meta-training pool may be a prompt of a held-out task's test split.

    python -m trainer.tasks.leakage [--pool DIR] [--heldout DIR] [--out results/meta-train/leakage-check.json]

A prompt is compared by the sha1 of its normalised text (unicode NFKC, casefold, whitespace collapsed, punctuation
stripped at both ends), so a copy that differs only in case or spacing is still caught. Every pool task is read,
every split: a test item seen in meta-training, even only in a validation split, has informed the init. A name
filter also reports any pool task named like a held-out task (tokens compared without separators, so `SST-2`,
`glue__sst2` and `sst_2` all match `sst2`). Exits 1 on any leak.

A hash only catches a prompt copied whole, and BIG-bench and OLMES render the same question differently. So the
report also lists, without failing, each pool prompt that shares a run of OVERLAP_WORDS words with a held-out test
prompt (GPT-3's contamination measure): a shared passage or question under another template shows up there.

The report holds hashes, indices and task names only: BIG-bench text carries a canary and none of the task text
may enter the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.tasks.format import SPLITS, Task, find_tasks, load_task

HELDOUT_SPLIT = "test"
OVERLAP_WORDS = 13
_TOKEN = re.compile(r"[^\W_]+")  # letters and digits; "_" and every other separator split


def normalise(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(normalise(prompt).encode("utf-8")).hexdigest()


def name_tokens(name: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", name).casefold())


def names_match(pool_name: str, heldout_name: str) -> bool:
    """True when some run of consecutive tokens of pool_name, joined, spells heldout_name's tokens joined."""
    tokens, target = name_tokens(pool_name), "".join(name_tokens(heldout_name))
    return bool(target) and any("".join(tokens[i:j]) == target
                                for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1))


@dataclass(frozen=True)
class Leak:
    kind: str  # "prompt": a pool prompt equals a held-out test prompt; "name": a pool task named like a held-out one
    pool_task: str
    heldout_task: str
    pool_split: str | None = None
    pool_index: int | None = None  # line of the pool split, 0-based
    prompt_sha1: str | None = None


def heldout_hashes(heldout_tasks: list[Task]) -> dict[str, list[str]]:
    """sha1 of each normalised held-out test prompt -> the held-out tasks holding it."""
    hashes: dict[str, list[str]] = {}
    for task in heldout_tasks:
        for example in task.split(HELDOUT_SPLIT):
            owners = hashes.setdefault(prompt_hash(example["prompt"]), [])
            if task.name not in owners:
                owners.append(task.name)
    return hashes


def find_name_leaks(pool_names: list[str], heldout_names: list[str]) -> list[Leak]:
    return [Leak("name", pool, held) for pool in pool_names for held in heldout_names if names_match(pool, held)]


def find_leaks(pool_tasks: list[Task], heldout_tasks: list[Task]) -> list[Leak]:
    leaks = find_name_leaks([t.name for t in pool_tasks], [t.name for t in heldout_tasks])
    hashes = heldout_hashes(heldout_tasks)
    for task in pool_tasks:
        for split in SPLITS:
            for index, example in enumerate(task.split(split)):
                digest = prompt_hash(example["prompt"])
                leaks += [Leak("prompt", task.name, held, split, index, digest) for held in hashes.get(digest, ())]
    return leaks


@dataclass(frozen=True)
class Overlap:
    pool_task: str
    pool_split: str
    pool_index: int
    heldout_task: str
    heldout_index: int  # line of the held-out test split, 0-based
    shared_runs: int  # distinct OVERLAP_WORDS-word runs the two prompts share
    heldout_runs: int  # of the held-out prompt's


def word_runs(text: str, n: int = OVERLAP_WORDS) -> set[str]:
    words = name_tokens(text)
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def find_overlaps(pool_tasks: list[Task], heldout_tasks: list[Task], n: int = OVERLAP_WORDS) -> list[Overlap]:
    held_runs = {(t.name, i): word_runs(e["prompt"], n)
                 for t in heldout_tasks for i, e in enumerate(t.split(HELDOUT_SPLIT))}
    owners: dict[str, list[tuple[str, int]]] = {}
    for key, runs in held_runs.items():
        for run in runs:
            owners.setdefault(run, []).append(key)
    overlaps = []
    for task in pool_tasks:
        for split in SPLITS:
            for index, example in enumerate(task.split(split)):
                shared = Counter(key for run in word_runs(example["prompt"], n) for key in owners.get(run, ()))
                overlaps += [Overlap(task.name, split, index, held, held_index, count, len(held_runs[held, held_index]))
                             for (held, held_index), count in sorted(shared.items())]
    return overlaps


def report(pool_tasks: list[Task], heldout_tasks: list[Task], leaks: list[Leak], overlaps: list[Overlap]) -> dict:
    """Counts and leaks, hashes and task names only (never task text)."""
    by_kind = Counter(leak.kind for leak in leaks)
    return {
        "normalisation": "NFKC, casefold, whitespace collapsed, punctuation and whitespace stripped at both ends; sha1",
        "heldout_split": HELDOUT_SPLIT,
        "pool_tasks": len(pool_tasks),
        "pool_prompts": sum(len(t.split(s)) for t in pool_tasks for s in SPLITS),
        "pool_unique_hashes": len({prompt_hash(e["prompt"]) for t in pool_tasks for s in SPLITS for e in t.split(s)}),
        "heldout_tasks": sorted(t.name for t in heldout_tasks),
        "heldout_test_prompts": sum(len(t.split(HELDOUT_SPLIT)) for t in heldout_tasks),
        "heldout_unique_hashes": len(heldout_hashes(heldout_tasks)),
        "leaks": {"total": len(leaks), "prompt": by_kind["prompt"], "name": by_kind["name"]},
        "leaked_pool_tasks": sorted({leak.pool_task for leak in leaks}),
        "leak_list": [asdict(leak) for leak in leaks],
        "overlap": {"words": OVERLAP_WORDS, "counts_as_leak": False,
                    "pool_prompts": len({(o.pool_task, o.pool_split, o.pool_index) for o in overlaps}),
                    "heldout_test_prompts": len({(o.heldout_task, o.heldout_index) for o in overlaps}),
                    "pairs": [asdict(o) for o in overlaps]},
    }


def main(argv: list[str] | None = None) -> int:
    from trainer.tasks.fetch import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=default_cache_dir() / "bigbench", help="meta-training task root")
    parser.add_argument("--heldout", type=Path, default=default_cache_dir() / "olmo", help="held-out task root")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pool = [load_task(p) for p in find_tasks(args.pool.expanduser())]
    heldout = [load_task(p) for p in find_tasks(args.heldout.expanduser())]
    if not pool or not heldout:
        raise SystemExit(f"no task folders under {args.pool if not pool else args.heldout}; "
                         "run `python -m trainer.tasks.fetch` first")
    leaks = find_leaks(pool, heldout)
    result = report(pool, heldout, leaks, find_overlaps(pool, heldout))
    print(f"{result['pool_tasks']} pool tasks ({result['pool_prompts']} prompts, all splits) against "
          f"{len(heldout)} held-out tasks ({result['heldout_test_prompts']} test prompts): "
          f"{result['leaks']['prompt']} prompt leak(s), {result['leaks']['name']} name leak(s)")
    for leak in leaks:
        where = f" {leak.pool_split}[{leak.pool_index}] sha1 {leak.prompt_sha1}" if leak.kind == "prompt" else ""
        print(f"  {leak.kind}: {leak.pool_task}{where} ~ {leak.heldout_task}")
    overlap = result["overlap"]
    print(f"not counted as leaks, listed for judgement: {overlap['pool_prompts']} pool prompt(s) share a run of "
          f"{OVERLAP_WORDS} words with {overlap['heldout_test_prompts']} held-out test prompt(s)")
    for o in overlap["pairs"]:
        print(f"  overlap: {o['pool_task']} {o['pool_split']}[{o['pool_index']}] ~ {o['heldout_task']} "
              f"test[{o['heldout_index']}]: {o['shared_runs']} of its {o['heldout_runs']} runs")
    if args.out:
        from trainer.provenance import git_commit

        command = " ".join([Path(sys.executable).name, "-m", "trainer.tasks.leakage",
                            *(sys.argv[1:] if argv is None else argv)])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "git_commit": git_commit(), **result}, indent=2) + "\n")
        print(f"written to {args.out}")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
