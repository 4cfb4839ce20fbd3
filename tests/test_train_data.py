"""Data: sources, packing, the on-disk cache, the data order, and the standard-library corpus."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.convert import corpus
from gqa.train import dataset
from gqa.train.dataset import prepare_data, training_order
from gqa.train.recipe import DataSection
from train_helpers import TRAIN_MODULES, docs_text, make_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    model = make_model(root)
    paragraphs = docs_text(TRAIN_MODULES[:3]).strip().split("\n\n")
    text = root / "docs.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    return root, model, AutoTokenizer.from_pretrained(model), paragraphs, text


def section(train, cache, **extra) -> DataSection:
    return DataSection(train=str(train), cache_dir=str(cache), block_size=32, eval_fraction=0.1, **extra)


def test_packed_blocks_are_the_held_in_documents_cut_into_full_blocks(ws, tmp_path):
    root, model, tokenizer, paragraphs, text = ws
    data = prepare_data(section(text, tmp_path), tokenizer, model, seed=0)
    # Written out independently: hold out 10% of the documents, tokenise each, append EOS, concatenate.
    split = datasets.Dataset.from_dict({"text": paragraphs}).train_test_split(test_size=0.1, seed=0, shuffle=True)
    stream = [t for doc in split["train"]["text"] for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    assert data.stats["train_documents"] == len(split["train"]) and data.stats["eval_documents"] == len(split["test"])
    assert data.stats["train_tokens"] == len(stream)
    usable = len(stream) // 32 * 32  # one map batch here: only the tail (< one block) is dropped
    assert data.train["input_ids"] == np.array(stream[:usable]).reshape(-1, 32).tolist()
    eval_stream = [t for doc in split["test"]["text"] for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    assert data.eval["input_ids"] == np.array(eval_stream[: len(eval_stream) // 32 * 32]).reshape(-1, 32).tolist()


def test_a_second_preparation_reads_the_cache_without_rebuilding(ws, tmp_path, monkeypatch):
    root, model, tokenizer, paragraphs, text = ws
    first = prepare_data(section(text, tmp_path), tokenizer, model, seed=0)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(dataset, "_build", no_rebuild)
    again = prepare_data(section(text, tmp_path), tokenizer, model, seed=0)
    assert again.stats["cache_dir"] == first.stats["cache_dir"]
    assert again.train["input_ids"] == first.train["input_ids"]
    # Anything that changes the blocks changes the key: here the block size.
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_data(DataSection(train=str(text), cache_dir=str(tmp_path), block_size=16), tokenizer, model, seed=0)


def test_jsonl_parquet_and_saved_datasets_give_the_same_blocks_as_text(ws, tmp_path):
    root, model, tokenizer, paragraphs, text = ws
    rows = datasets.Dataset.from_dict({"body": paragraphs, "id": list(range(len(paragraphs)))})
    jsonl, parquet, saved = tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "saved"
    jsonl.write_text("".join(json.dumps({"body": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    rows.to_parquet(str(parquet))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(saved))
    expected = prepare_data(section(text, tmp_path / "c0"), tokenizer, model, seed=0).train["input_ids"]
    for i, source in enumerate((jsonl, parquet, saved)):
        got = prepare_data(section(source, tmp_path / f"c{i + 1}", text_field="body"), tokenizer, model, seed=0)
        assert got.train["input_ids"] == expected, source.name


def test_source_errors_name_the_key(ws, tmp_path):
    root, model, tokenizer, paragraphs, text = ws
    with pytest.raises(GQAError, match=r"data\.text_field='content' is not a column .*columns: text"):
        prepare_data(section(text, tmp_path, text_field="content"), tokenizer, model, seed=0)
    odd = tmp_path / "notes.docx"
    odd.write_text("x")
    with pytest.raises(GQAError, match=r"data\.train: cannot read .*notes\.docx"):
        prepare_data(section(odd, tmp_path), tokenizer, model, seed=0)
    with pytest.raises(GQAError, match=r"data\.train: .*missing\.txt does not exist"):
        prepare_data(section(tmp_path / "missing.txt", tmp_path), tokenizer, model, seed=0)
    with pytest.raises(GQAError, match=r"data\.eval: .*stdlib-docs:test.* names no corpus split"):
        prepare_data(section(text, tmp_path, eval="stdlib-docs:test"), tokenizer, model, seed=0)


def test_training_order_is_a_fresh_permutation_each_epoch_fixed_by_the_seed():
    order = training_order(num_blocks=10, num_sequences=25, seed=3)
    assert len(order) == 25
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert not np.array_equal(order[:10], order[10:20])
    assert np.array_equal(order, training_order(10, 25, seed=3))
    assert np.array_equal(training_order(10, 7, seed=3), order[:7])  # a shorter run is a prefix
    assert not np.array_equal(order, training_order(10, 25, seed=4))


def test_stdlib_corpus_splits_are_real_disjoint_and_deterministic(tmp_path):
    train_modules, heldout_modules = corpus.module_names("train"), corpus.module_names("heldout")
    assert not set(train_modules) & set(heldout_modules)
    assert {"json", "email.message", "difflib"} <= set(heldout_modules)
    assert {"argparse", "pathlib", "asyncio.tasks"} <= set(train_modules)
    paths = corpus.write_corpus(tmp_path)
    train_text, heldout_text = paths["train"].read_text(), paths["heldout"].read_text()
    assert 500_000 < len(train_text) < 5_000_000 and 150_000 < len(heldout_text) < 2_000_000
    assert not set(corpus.corpus_documents("train")) & set(corpus.corpus_documents("heldout"))  # no docstring in both
    assert "JSON" in heldout_text and "Return" in train_text  # English prose about the library
    assert corpus.corpus_text("heldout") == heldout_text  # the same text each time


def test_stdlib_corpus_does_not_depend_on_what_the_process_imported(tmp_path):
    """This process has imported torch and transformers, which patch the standard library (torch
    replaces inspect.getfile, transformers adds methods to logging.Logger); the text is the one a
    fresh `python -m gqa.convert.corpus` writes."""
    import subprocess
    import sys

    import torch  # noqa: F401
    import transformers  # noqa: F401

    subprocess.run([sys.executable, "-m", "gqa.convert.corpus", str(tmp_path)], check=True, capture_output=True)
    for split in corpus.SPLITS:
        assert corpus.corpus_text(split) == (tmp_path / f"{split}.txt").read_text(encoding="utf-8"), split
