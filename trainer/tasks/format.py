"""The task-folder format shared by meta-training and evaluation (docs/tasks.md).

A task is a folder holding `train.jsonl`, `validation.jsonl` and `test.jsonl`; each line is
`{"prompt": str, "completion": str}` and, for label / multiple-choice tasks, `"options": [str, ...]` and
`"answer": int` with `completion == options[answer]`. Loading validates every line and names the file and
line of the first problem, so a hand-written task fails loudly instead of training on garbage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")


class TaskFormatError(ValueError):
    def __init__(self, path: Path | str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


@dataclass
class Task:
    name: str
    path: Path
    train: list[dict]
    validation: list[dict]
    test: list[dict]

    @property
    def has_options(self) -> bool:
        # A task is scored by option likelihood only if every test item has options; mixing is rejected on load.
        return bool(self.test) and "options" in self.test[0]

    def split(self, name: str) -> list[dict]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def validate_example(obj: object, path: Path | str, line: int) -> dict:
    """Returns a clean example dict (only known keys) or raises TaskFormatError naming path:line."""
    def fail(reason: str):
        raise TaskFormatError(path, line, reason)

    if not isinstance(obj, dict):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"prompt", "completion", "options", "answer"}
    if unknown:
        fail(f"unknown key(s) {sorted(unknown)}; allowed: prompt, completion, options, answer")
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str):
        fail("'prompt' must be a string")
    if not isinstance(completion, str) or not completion:
        fail("'completion' must be a non-empty string")
    example = {"prompt": prompt, "completion": completion}
    if ("options" in obj) != ("answer" in obj):
        fail("'options' and 'answer' must be given together")
    if "options" in obj:
        options, answer = obj["options"], obj["answer"]
        if not isinstance(options, list) or len(options) < 2:
            fail("'options' must be a list of at least 2 strings")
        if not all(isinstance(o, str) and o for o in options):
            fail("every option must be a non-empty string")
        if len(set(options)) != len(options):
            fail("options must be distinct (otherwise accuracy is ill-defined)")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            fail(f"'answer' must be an integer index into options (0..{len(options) - 1}), got {answer!r}")
        if options[answer] != completion:
            fail(f"'completion' must equal options[answer] ({options[answer]!r}), got {completion!r}")
        example["options"] = list(options)
        example["answer"] = answer
    return example


def load_split(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(path, None, "file not found")
    examples = []
    kinds: set[bool] = set()
    with path.open(encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # a trailing blank line is harmless
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TaskFormatError(path, line_no, f"invalid JSON: {exc.msg}") from None
            example = validate_example(obj, path, line_no)
            kinds.add("options" in example)
            if len(kinds) > 1:
                raise TaskFormatError(path, line_no, "mixes examples with and without 'options'")
            examples.append(example)
    if not examples:
        raise TaskFormatError(path, None, "no examples")
    return examples


def load_task(folder: Path | str) -> Task:
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskFormatError(folder, None, "task folder not found")
    splits = {name: load_split(folder / f"{name}.jsonl") for name in SPLITS}
    kinds = {name: "options" in examples[0] for name, examples in splits.items()}
    if len(set(kinds.values())) > 1:
        raise TaskFormatError(folder, None, f"splits disagree on having options: {kinds}")
    return Task(name=folder.name, path=folder, **splits)


def write_split(path: Path | str, examples: list[dict]) -> None:
    """Validates while writing, and writes via a temp file so an interrupted import leaves no half task."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, example in enumerate(examples, start=1):
            fh.write(json.dumps(validate_example(example, path, i), ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_task(folder: Path | str, splits: dict[str, list[dict]]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_split(folder / f"{name}.jsonl", splits[name])
    return folder


def find_tasks(root: Path | str) -> list[Path]:
    """Every task folder (one holding train.jsonl) below root, sorted for reproducible task order."""
    return sorted(p.parent for p in Path(root).rglob("train.jsonl"))
