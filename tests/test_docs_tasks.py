"""The offline multiple-choice tasks (gqa.train.docs_tasks): written deterministically, items clean and
balanced, the docstring task held out from the training text, and run by lm-eval on a tiny model."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gqa.convert.corpus import corpus_documents
from gqa.train.docs_tasks import CHOICES, CONTINUATION_WORDS, ITEMS, TASK_NAMES, task_documents, write_tasks
from train_helpers import REPO, make_model


def normalised(text: str) -> str:
    return " ".join(text.split())


def rows_of(dest: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (dest / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tasks")
    assert write_tasks(dest) == list(TASK_NAMES)
    return dest


def test_tasks_are_written_the_same_each_time(tasks_dir, tmp_path):
    """Two writes are byte-identical; the CLI writes the same items elsewhere, its YAML naming its own data file."""
    assert all(name.startswith("gqa_") for name in TASK_NAMES) and len(TASK_NAMES) >= 2
    first = {p.name: p.read_bytes() for p in tasks_dir.iterdir()}
    assert sorted(first) == sorted(f"{n}.{ext}" for n in TASK_NAMES for ext in ("yaml", "jsonl"))
    write_tasks(tasks_dir)
    assert {p.name: p.read_bytes() for p in tasks_dir.iterdir()} == first

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "gqa.train.docs_tasks", str(tmp_path)], check=True, cwd=REPO, env=env,
                   capture_output=True)  # fmt: skip
    for name in TASK_NAMES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == first[f"{name}.jsonl"]
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert config["task"] == name
        assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path.resolve() / f"{name}.jsonl")
        assert (tmp_path / f"{name}.yaml").read_text() == first[f"{name}.yaml"].decode().replace(str(tasks_dir), str(tmp_path))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_items_are_clean_and_balanced(tasks_dir, name):
    """Four distinct choices of the same word count, no stray whitespace; each position is the answer
    equally often; the answer is the text that follows the context in its document, and no false
    choice follows it in any document of the task."""
    documents, _ = task_documents(name)
    everything = normalised("\n".join(documents))
    rows = rows_of(tasks_dir, name)
    assert len(rows) == ITEMS
    assert len({row["context"] for row in rows}) == ITEMS
    assert collections.Counter(row["label"] for row in rows) == {i: ITEMS // CHOICES for i in range(CHOICES)}
    for row in rows:
        choices, context = row["choices"], row["context"]
        assert len(choices) == CHOICES and len(set(choices)) == CHOICES, row
        assert context == context.strip() and context
        for choice in choices:
            assert choice == choice.strip() and len(choice.split()) == CONTINUATION_WORDS, row
        source = normalised(documents[row["document"]])
        assert f"{context} {choices[row['label']]}" in source, row
        assert not any(f"{context} {c}" in everything for i, c in enumerate(choices) if i != row["label"]), row
        lengths = sorted(len(c) for c in choices)
        assert lengths[-1] <= 2 * lengths[0], row  # no choice is picked out by its length alone


def test_docstring_items_are_held_out(tasks_dir):
    """No context or choice of gqa_docstrings occurs in stdlib-docs:train, and none of gqa_pyref in either split."""
    train = normalised("\n".join(corpus_documents("train")))
    both = normalised("\n".join(corpus_documents("train") + corpus_documents("heldout")))
    for name, excluded in (("gqa_docstrings", train), ("gqa_pyref", both)):
        for row in rows_of(tasks_dir, name):
            for text in [row["context"], *row["choices"]]:
                assert text not in excluded, (name, text)


def test_lm_eval_runs_the_tasks_offline(tasks_dir, tmp_path, one_thread):
    """lm-eval finds the tasks through include_path, reads each item's context, choices and answer as
    written, and scores a tiny model in memory with acc and acc_norm."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval) ")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model(tmp_path, provenance=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = 20
    out = simple_evaluate(
        HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu"),
        tasks=list(TASK_NAMES), task_manager=TaskManager(include_path=tasks_dir), limit=limit, bootstrap_iters=0,
        log_samples=True,
    )  # fmt: skip
    for name in TASK_NAMES:
        result = out["results"][name]
        assert 0 <= result["acc,none"] <= 1 and 0 <= result["acc_norm,none"] <= 1, result
        samples = out["samples"][name]
        assert len(samples) == limit
        for sample, row in zip(sorted(samples, key=lambda s: s["doc_id"]), rows_of(tasks_dir, name)):
            assert sample["target"] == row["label"]
            assert [tuple(a) for a in sample["arguments"]] == [(row["context"], " " + c) for c in row["choices"]]
