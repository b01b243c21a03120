"""The meta-training pool and its fixed validation split, in one place.

`train_meta.py` holds `n_val_tasks` pool tasks out of meta-training for its periodic validation. Those tasks are
also the selection data for anything that decides what ships (tests/test_shared_init.py): selection never reads a
held-out (OLMo) test item, so it needs the same list, computed by the same rule.
"""
from __future__ import annotations

import random
from pathlib import Path

from trainer.tasks.format import Task, find_tasks, load_task

POOLS = ("all", "multiple_choice")
SPLIT_SEED = 1234  # a fixed split, independent of any run's seed


def in_pool(task: Task, pool: str) -> bool:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return pool == "all" or task.has_options


def split_names(names: list[str], n_val_tasks: int) -> tuple[list[str], list[str]]:
    """(train_names, val_names), each sorted. `names` in find_tasks order: the shuffle is applied to that order."""
    shuffled = list(names)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return sorted(shuffled[n_val_tasks:]), sorted(shuffled[:n_val_tasks])


def load_pool(tasks_root: Path | str, pool: str = "multiple_choice") -> dict[str, Task]:
    """Every task of the pool under tasks_root, by name, in find_tasks order."""
    return {t.name: t for t in map(load_task, find_tasks(Path(tasks_root).expanduser())) if in_pool(t, pool)}


def meta_pool(tasks_root: Path | str, pool: str = "multiple_choice", n_val_tasks: int = 8
              ) -> tuple[list[str], list[str]]:
    """(train_names, val_names) exactly as `python -m trainer.train_meta --pool=<pool> --n_val_tasks=<n>` splits."""
    return split_names(list(load_pool(tasks_root, pool)), n_val_tasks)
