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

    monkeypatch.setattr(dataset, "build_blocks", no_rebuild)
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


def write_parts(folder, paragraphs) -> list:
    """The documents split over five files, three jsonl and two parquet, two of them one folder down."""
    names = ["a.jsonl", "b.jsonl", "more/c.jsonl", "d.parquet", "more/e.parquet"]
    files = [folder / name for name in names]
    (folder / "more").mkdir(parents=True)
    for i, file in enumerate(files):
        part = paragraphs[i::len(files)]
        if file.suffix == ".jsonl":
            file.write_text("".join(json.dumps({"text": p}) + "\n" for p in part))
        else:
            datasets.Dataset.from_dict({"text": part}).to_parquet(str(file))
    return files


def test_a_glob_is_the_files_it_matches_sorted_as_if_listed(ws, tmp_path, monkeypatch):
    root, model, tokenizer, paragraphs, text = ws
    parts = tmp_path / "parts"
    files = write_parts(parts, paragraphs)
    jsonl, parquet = [str(f) for f in files if f.suffix == ".jsonl"], [str(f) for f in files if f.suffix == ".parquet"]

    def prepared(train, eval_=None, cache="cache"):
        data = DataSection(train=train, eval=eval_, cache_dir=str(tmp_path / cache), block_size=32, eval_fraction=0.1)
        return prepare_data(data, tokenizer, model, seed=0)

    listed = prepared(jsonl + parquet)
    globbed = prepared([f"{parts}/**/*.jsonl", f"{parts}/**/*.parquet"], cache="other")
    assert len(listed.train) > 20 and globbed.train["input_ids"] == listed.train["input_ids"]
    assert globbed.eval["input_ids"] == listed.eval["input_ids"]
    assert prepared(jsonl[::-1] + parquet, cache="reversed").train["input_ids"] != listed.train["input_ids"]  # order counts
    # data.eval too, and relative to the current directory; one pattern may match files of several kinds
    held = prepared(str(text), jsonl[:2], cache="held")
    monkeypatch.chdir(tmp_path)
    assert prepared(str(text), "parts/*.jsonl", cache="held").eval["input_ids"] == held.eval["input_ids"]
    assert prepared(str(text), "parts/**/*.*", cache="held").stats["eval_documents"] == len(paragraphs)


def test_a_globs_cache_entry_follows_the_files_it_matches(ws, tmp_path):
    root, model, tokenizer, paragraphs, text = ws
    parts = tmp_path / "parts"
    files = write_parts(parts, paragraphs)
    section = DataSection(train=f"{parts}/**/*.jsonl", cache_dir=str(tmp_path / "cache"), block_size=32, eval_fraction=0.1)
    first = prepare_data(section, tokenizer, model, seed=0).stats["cache_dir"]
    assert prepare_data(section, tokenizer, model, seed=0).stats["cache_dir"] == first
    (parts / "more" / "f.jsonl").write_text(json.dumps({"text": paragraphs[0]}) + "\n")  # one more match
    added = prepare_data(section, tokenizer, model, seed=0).stats["cache_dir"]
    files[1].write_text(files[1].read_text() + json.dumps({"text": paragraphs[1]}) + "\n")  # a match changes
    changed = prepare_data(section, tokenizer, model, seed=0)
    assert len({first, added, changed.stats["cache_dir"]}) == 3
    lines = sum(len(f.read_text().splitlines()) for f in parts.rglob("*.jsonl"))
    assert changed.stats["train_documents"] + changed.stats["eval_documents"] == lines  # built from all of them


def test_a_glob_matching_no_file_is_an_error_naming_it(ws, tmp_path):
    root, model, tokenizer, paragraphs, text = ws
    (tmp_path / "empty" / "folder.jsonl").mkdir(parents=True)  # a folder the pattern matches is no file
    for key, values in (("data.train", {"train": f"{tmp_path}/empty/*.jsonl"}),
                        ("data.eval", {"train": str(text), "eval": [str(text), f"{tmp_path}/shards-*.parquet"]})):
        with pytest.raises(GQAError, match=rf"{key}: the pattern {tmp_path}/\S+ matches no file"):
            prepare_data(DataSection(cache_dir=str(tmp_path / "c"), block_size=32, **values), tokenizer, model, seed=0)
    (tmp_path / "empty" / "notes.docx").write_text("x")
    with pytest.raises(GQAError, match=r"data\.train: cannot read .*notes\.docx \(suffix \.docx\), which .*empty/\* matches"):
        prepare_data(DataSection(train=f"{tmp_path}/empty/*", cache_dir=str(tmp_path / "c"), block_size=32),
                     tokenizer, model, seed=0)


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
