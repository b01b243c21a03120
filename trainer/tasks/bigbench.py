"""BIG-bench JSON tasks -> task folders (the meta-training pool).

Reads `bigbench/benchmark_tasks/**/task.json` straight out of the `bigbench==1.0.0` sdist (no extraction,
no import of the bigbench package). Every JSON task with examples is a candidate; subtasks are separate
tasks named by their path (`parent__subtask`). Rules (docs/tasks.md):
- multiple choice (`target_scores`): options = the scored strings, gold = the unique highest score; an
  example with a tied best score (several correct answers) is dropped. A task with any `target_scores`
  example is a multiple-choice task.
- generative (`target`): completion = the target (the first if a list): exact-match tasks.
- short items only, so a LoRA step stays cheap on CPU: prompt <= MAX_PROMPT_CHARS, every option/target
  <= MAX_ANSWER_CHARS, <= MAX_OPTIONS options. A task needs >= MIN_EXAMPLES usable examples.
BIG-bench text carries a canary GUID and must never enter a training corpus by accident: the converted
folders live in the user's cache, never in this repository.
"""
from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from trainer.tasks.format import write_task

MAX_PROMPT_CHARS = 600  # ~150 SmolLM2 tokens: keeps a batch-8 LoRA step cheap on a CPU
MAX_ANSWER_CHARS = 100
MAX_OPTIONS = 10  # option scoring costs one sequence per option
MIN_EXAMPLES = 60  # enough for disjoint support/query sets plus held-out validation/test
MAX_EXAMPLES = 600  # more is never used by 100-example adaptation and only bloats the cache
SPLIT_SEED = 0
# The held-out evaluation tasks (trainer/tasks/olmo.py) must never be meta-trained on, not even as a
# BIG-bench re-packaging: any BIG-bench task whose name mentions one is skipped.
EVAL_OVERLAP = ("sst", "rte", "boolq", "arc_easy", "ai2_arc", "piqa", "copa", "openbookqa", "commonsense_qa",
                "commonsenseqa", "csqa")


class BigBenchFormatError(ValueError):
    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclass
class ConvertSummary:
    converted: dict[str, dict] = field(default_factory=dict)  # task -> {"kind", "n", "dropped"}
    skipped: dict[str, str] = field(default_factory=dict)  # task path -> reason
    malformed: dict[str, str] = field(default_factory=dict)  # task path -> error

    def to_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            key = reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {"converted": len(self.converted), "skipped": reasons, "malformed": self.malformed,
                "tasks": self.converted}


def _line_of(text: str, needle: str, start: int = 0) -> int | None:
    pos = text.find(needle, start)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def parse_task_json(text: str, path: str) -> dict:
    """Parses and structurally validates one task.json; raises BigBenchFormatError naming path:line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BigBenchFormatError(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise BigBenchFormatError(path, 1, "top level must be an object")
    examples = data.get("examples")
    if examples is None:
        return data  # a container of subtasks (or a programmatic task): not an error, nothing to convert
    if not isinstance(examples, list):
        raise BigBenchFormatError(path, _line_of(text, '"examples"'), "'examples' must be a list")
    for key in ("task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix"):
        if key in data and not isinstance(data[key], str):
            raise BigBenchFormatError(path, _line_of(text, f'"{key}"'), f"'{key}' must be a string")
    # Examples are located by their "input" key in order, counting newlines incrementally (tasks reach
    # tens of MB): good enough to point a human at the spot.
    cursor = max(text.find('"examples"'), 0)
    line = text.count("\n", 0, cursor) + 1
    for i, ex in enumerate(examples):
        pos = text.find('"input"', cursor)
        if pos >= 0:
            line += text.count("\n", cursor, pos)
            cursor = pos + 1
        if not isinstance(ex, dict):
            raise BigBenchFormatError(path, line, f"example {i} must be an object")
        if not isinstance(ex.get("input"), str):
            raise BigBenchFormatError(path, line, f"example {i}: 'input' must be a string")
        if "target_scores" not in ex and "target" not in ex:
            raise BigBenchFormatError(path, line, f"example {i}: needs 'target' or 'target_scores'")
        scores = ex.get("target_scores")
        if scores is not None and (not isinstance(scores, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in scores.items())):
            raise BigBenchFormatError(path, line, f"example {i}: 'target_scores' must map strings to numbers")
        target = ex.get("target")
        if target is not None and not (isinstance(target, str) or (
                isinstance(target, list) and all(isinstance(t, str) for t in target))):
            raise BigBenchFormatError(path, line, f"example {i}: 'target' must be a string or list of strings")
    return data


def _split_trailing_space(prefix: str) -> tuple[str, str]:
    # data.py tokenizes prompt and completion separately: the space before an answer belongs to the answer's
    # first token (" Paris"), as the model saw it in pretraining, so it moves from the prompt to the completion.
    # Newlines stay in the prompt ("...\nYes" tokenizes the answer as a line start either way).
    stripped = prefix.rstrip(" ")
    return stripped, prefix[len(stripped):]


def render_examples(data: dict) -> tuple[str, list[dict], int]:
    """-> (kind, examples in the task-folder format, number dropped by the rules)."""
    task_prefix = data.get("task_prefix", "")
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix, answer_space = _split_trailing_space(data.get("example_output_prefix", "\nA: "))
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = data.get("append_choices_to_input", True)
    raw = data["examples"]
    kind = "multiple_choice" if any("target_scores" in ex for ex in raw) else "generative"
    out, dropped = [], 0
    for ex in raw:
        head = (task_prefix + input_prefix).lstrip("\n") + ex["input"]
        if kind == "multiple_choice":
            scores = ex.get("target_scores")
            if not scores or len(scores) < 2 or len(scores) > MAX_OPTIONS:
                dropped += 1
                continue
            names = list(scores)
            best = max(scores.values())
            golds = [i for i, n in enumerate(names) if scores[n] == best]
            options = [answer_space + n for n in names]
            if len(golds) != 1 or len(set(options)) != len(options) or any(not n.strip() for n in names):
                dropped += 1
                continue
            prompt = head + ("".join(choice_prefix + n for n in names) if append_choices else "") + output_prefix
            if len(prompt) > MAX_PROMPT_CHARS or max(len(n) for n in names) > MAX_ANSWER_CHARS:
                dropped += 1
                continue
            out.append({"prompt": prompt, "completion": options[golds[0]], "options": options,
                        "answer": golds[0]})
        else:
            target = ex["target"]
            target = target[0] if isinstance(target, list) and target else target
            prompt = head + output_prefix
            if not isinstance(target, str) or not target.strip() or len(target) > MAX_ANSWER_CHARS \
                    or len(prompt) > MAX_PROMPT_CHARS:
                dropped += 1
                continue
            out.append({"prompt": prompt, "completion": answer_space + target.strip()})
    return kind, out, dropped


def split_examples(examples: list[dict], seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    examples = examples[:MAX_EXAMPLES]
    n = len(examples)
    n_test = min(100, max(10, n // 5))
    n_val = min(50, max(10, n // 10))
    return {"test": examples[:n_test], "validation": examples[n_test:n_test + n_val],
            "train": examples[n_test + n_val:]}


def task_name(member_name: str) -> str:
    rel = member_name.split("/benchmark_tasks/", 1)[1].rsplit("/task.json", 1)[0]
    return rel.replace("/", "__")


def convert_sdist(sdist: Path, out_root: Path) -> ConvertSummary:
    summary = ConvertSummary()
    out_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or "/benchmark_tasks/" not in member.name \
                    or not member.name.endswith("/task.json"):
                continue
            name = task_name(member.name)
            where = f"{sdist.name}!{member.name}"
            if any(word in name.lower() for word in EVAL_OVERLAP):
                summary.skipped[name] = "eval_overlap: shares a data set with a held-out evaluation task"
                continue
            try:
                text = tar.extractfile(member).read().decode("utf-8")
                data = parse_task_json(text, where)
            except (BigBenchFormatError, UnicodeDecodeError) as exc:
                summary.malformed[name] = str(exc)
                continue
            if "examples" not in data:
                summary.skipped[name] = "no_examples: container or programmatic task"
                continue
            kind, examples, dropped = render_examples(data)
            if len(examples) < MIN_EXAMPLES:
                summary.skipped[name] = f"too_few_usable: {len(examples)} < {MIN_EXAMPLES} ({dropped} dropped)"
                continue
            write_task(out_root / name, split_examples(examples))
            summary.converted[name] = {"kind": kind, "n": min(len(examples), MAX_EXAMPLES), "dropped": dropped}
    return summary
