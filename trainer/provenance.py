"""What produced a result: the code's commit and the machine, recorded the same way by every report
(train-meta's export, the evaluation, the benchmarks)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch

from trainer.precision import cpu_features, precision_for

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    """stdout of a git command in this checkout; raises OSError / CalledProcessError where git cannot answer."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def git_commit() -> str:
    """HEAD's sha, with "-dirty" appended when ANY tracked file of the repository differs from HEAD (staged or
    not, anywhere in the tree: a change to the tests or the benchmarks can change a figure too). Untracked files
    do not count: results, caches and run folders land in the tree. "unknown" where this code is not run from a
    git checkout (an installed wheel), rather than the commit of some enclosing repository."""
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != REPO:
            return "unknown"
        sha = _git("rev-parse", "HEAD")
        # No optional locks: a status taken for a record must not hold up a concurrent git command.
        dirty = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def machine_record(device: torch.device) -> dict:
    """The machine a figure was measured on, without the host's name: CPU model and core count, torch version,
    the device, and the precision `autocast_for(device)` computes in ("bf16 autocast" | "fp32")."""
    return {"cpu_model": cpu_features()["model"], "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": str(device), "precision": precision_for(device)}


def examples_digest(examples: list[dict]) -> str:
    """sha256 of a list of examples (order counts), to show that two runs trained on the same draw without storing
    the data (task data is not ours to redistribute)."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of weights as loaded (names, shapes and fp32 values, in name order), whatever file format held them: two
    reports scored from the same init record the same digest, so a merge can tell a retrained init from the same one."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
