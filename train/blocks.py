"""Prepared data: documents tokenised and packed into fixed blocks, once, and cached under a key that covers
everything that changes the blocks (see gqa.train.dataset)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gqa.convert.errors import GQAError
from gqa.convert.modeldir import tokenizer_files
from gqa.convert.text import chunk_tokens, document_window, encode_documents, leading_bos
from gqa.train.recipe import DataSection
from gqa.train.sources import load_documents, source_fingerprint

logger = logging.getLogger(__name__)


CACHE_FORMAT = 3  # bump when the layout or the choice of cached blocks changes (3: held-out stream blocks from files in turn)
# Documents tokenised and packed together (prepared and streamed alike); each group drops its tail,
# fewer than block_size tokens, so large groups keep that to block_size - 1 tokens per 4,000 documents.
PACK_DOCUMENTS = 4000
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


def build_blocks(data: DataSection, train_sources, eval_sources, tokenizer, seed: int, cache_dir: Path) -> None:
    logger.info("data: tokenising and packing into %s", cache_dir)
    train_docs = load_documents(train_sources, data, "data.train", cache_dir.parent)
    if eval_sources:
        eval_docs = load_documents(eval_sources, data, "data.eval", cache_dir.parent)
    else:
        if len(train_docs) < 2:
            raise GQAError("data.train holds one document, too few to hold some out; set data.eval to separate files")
        split = train_docs.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    stats: dict[str, Any] = {"format": CACHE_FORMAT}
    built = {name: blocks_of(docs, tokenizer, data, name, stats) for name, docs in (("train", train_docs), ("eval", eval_docs))}
    check_sizes(data, stats, ("train", "eval"))  # before caching: an empty split is an error, never a cache entry
    write_cache(cache_dir, built, stats)


def blocks_of(docs: datasets.Dataset, tokenizer, data: DataSection, name: str, stats: dict[str, Any]) -> datasets.Dataset:
    """A split's documents tokenised and (packed) cut into blocks; counts go into stats."""
    bos = leading_bos(tokenizer)
    tokens = _tokenise(docs, tokenizer, data, name)
    stats[f"{name}_documents"] = len(docs)
    stats[f"{name}_tokens"] = _token_count(tokens)
    blocks = _pack(tokens, data.block_size, bos, data.num_proc, name) if data.pack else tokens
    stats[f"{name}_blocks"] = len(blocks)
    return blocks


def write_cache(cache_dir: Path, built: dict[str, datasets.Dataset], stats: dict[str, Any]) -> None:
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, blocks in built.items():
        blocks.save_to_disk(str(tmp / name))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    try:
        os.replace(tmp, cache_dir)  # atomic: a reader sees all of it or none
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def tokeniser(tokenizer, data: DataSection) -> Callable[[Sequence[str]], list[list[int]]]:
    """Documents to token rows (gqa.convert.text): each document's tokens and EOS when packing;
    unpacked, each document's one window."""
    if data.pack and tokenizer.eos_token_id is None:
        logger.warning("data: the tokenizer has no EOS token; packed documents run into each other")
    bos = leading_bos(tokenizer)

    def tokenise(texts: Sequence[str]) -> list[list[int]]:
        if data.pack:
            return encode_documents(tokenizer, texts)
        # One document per block, cut to the block (it ends where its padding begins, so it carries
        # no EOS); drop what leaves nothing to predict.
        encoded = encode_documents(tokenizer, texts, eos=False)
        windows = (document_window(ids, data.block_size, bos) for ids in encoded)
        return [ids for ids in windows if len(ids) >= 2]

    return tokenise


def packer(block_size: int, bos: int | None) -> Callable[[pa.Array | pa.ChunkedArray], np.ndarray]:
    """A group of documents' token rows, concatenated and cut into full blocks (gqa.convert.text's windows)."""

    def pack(rows: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return chunk_tokens(pc.list_flatten(rows).to_numpy(), block_size, bos)

    return pack


def _tokenise(docs: datasets.Dataset, tokenizer, data: DataSection, name: str) -> datasets.Dataset:
    """Each document's tokens; unpacked, each document's one window."""
    tokenise = tokeniser(tokenizer, data)
    return docs.map(
        lambda batch: {"input_ids": tokenise(batch["text"])}, batched=True, remove_columns=docs.column_names,
        features=BLOCK_FEATURES, num_proc=data.num_proc, desc=f"tokenising {name}",
    )


def _pack(tokens: datasets.Dataset, block_size: int, bos: int | None, num_proc: int, name: str) -> datasets.Dataset:
    """Concatenate documents and cut into full blocks.

    Training blocks are cut per group of PACK_DOCUMENTS documents, each dropping its tail (< one
    block). The held-out split is cut as one stream, the way `gqa eval` cuts a text, so both score
    the same windows.
    """
    pack = packer(block_size, bos)
    whole = name == "eval"
    packed = tokens.with_format("arrow").map(
        lambda batch: {"input_ids": pack(batch.column("input_ids"))}, batched=True,
        batch_size=None if whole else PACK_DOCUMENTS, features=BLOCK_FEATURES, num_proc=None if whole else num_proc,
        desc=f"packing {name}",
    )
    return packed.with_format(None)


def _token_count(tokens: datasets.Dataset) -> int:
    if len(tokens) == 0:
        return 0
    column = tokens.data.column("input_ids")
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def check_sizes(data: DataSection, stats: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        key = "data.train" if name == "train" else "data.eval" if data.eval else "data.eval_fraction"
        if stats[f"{name}_blocks"] == 0 and not data.pack:
            raise GQAError(f"{key}: no {name} document is 2 tokens or longer; add data to {key}")
        if stats[f"{name}_blocks"] == 0:
            raise GQAError(
                f"data.block_size={data.block_size} is longer than the {name} data ({stats[f'{name}_tokens']:,} tokens "
                f"in {stats[f'{name}_documents']:,} documents, none long enough); lower data.block_size or add data to {key}"
            )


def cache_key(data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir, seed: int) -> str:
    return _key("blocks", data, tokenizer, tokenizer_dir,
        train=[source_fingerprint(s) for s in train_sources],
        eval=[source_fingerprint(s) for s in eval_sources],
        # the held-out fraction is drawn with the seed only when there are no eval files
        holdout=None if eval_sources else [data.eval_fraction, seed],
    )  # fmt: skip


def stream_eval_key(data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir) -> str:
    """Streamed runs cache only their held-out blocks: data.eval's, or the first data.eval_blocks of data.train's stream."""
    held_out = None if eval_sources else {"train": [source_fingerprint(s) for s in train_sources], "blocks": data.eval_blocks}
    return _key("stream-eval", data, tokenizer, tokenizer_dir, eval=[source_fingerprint(s) for s in eval_sources],
                held_out=held_out)  # fmt: skip


def _key(prefix: str, data: DataSection, tokenizer, tokenizer_dir, **sources) -> str:
    """A cache entry's name: a digest of everything that changes its blocks."""
    identity = {
        "format": CACHE_FORMAT,
        "tokenizer": _tokenizer_fingerprint(tokenizer, tokenizer_dir),
        "text_field": data.text_field,
        "hub_config": data.hub_config,
        "block_size": data.block_size,
        "pack": data.pack,
        **sources,
    }
    return f"{prefix}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


def _tokenizer_fingerprint(tokenizer, tokenizer_dir) -> dict[str, Any]:
    local = Path(tokenizer_dir).is_dir()  # a hub id's files are pinned by the hub's own cache
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tokenizer_files(tokenizer_dir)} if local else {}
    return {"class": type(tokenizer).__name__, "files": files, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
