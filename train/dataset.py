"""Training data: read documents, tokenise, pack into fixed blocks; prepared once and cached, or streamed.

Prepared (the default): the whole of data.train is tokenised and packed before step 1, by the first
process of each machine while the others wait, and cached. The cache key covers everything that
changes the blocks (the tokenizer files, each source's path/size/mtime or hub id and revision, text
field, block size, packing, the eval split), so a second run with the same data loads memory-mapped
blocks at once and any change rebuilds them. A glob pattern (shards/*.parquet) is the files it matches,
sorted by path, as if they were listed: they, their sizes and mtimes are in the key.

Streamed (data.streaming): data.train is read as datasets IterableDatasets and tokenised and packed on
the fly, with the same code, so nothing before step 1 grows with the corpus. The stream is made of S
file streams, one per file of the sources (the sources as listed, each one's files in its own order:
parquet files read one row group at a time, see _parquet_documents; others datasets' shards). Each
file stream yields its documents in order, empty ones dropped; every PACK_DOCUMENTS of them tokenised
and packed into blocks exactly as prepared data is; its held-out blocks skipped (below); then it
repeats epoch after epoch, each run of ceil(data.shuffle_buffer / S) consecutive blocks in an order
seeded by (seed, file, run number). The global stream takes the file streams in turn: its block k is
block k div S of file stream k mod S. Without data.eval, its first data.eval_blocks blocks are held
out (read once by the first process of each machine, cached) and each file stream skips exactly its
own share of them, in every epoch.

Optimizer step k reads blocks [k*G, (k+1)*G) of the global stream (G the global batch), however many
processes share it: process i of N reads blocks i, i+N, i+2N, ... When N divides S, those are all
the blocks of file streams i, i+N, i+2N, ..., so each process opens, tokenises and packs only its
own files; otherwise it reads file streams i mod g, + g, ... (g = gcd(S, N); every file when g = 1)
and drops the other processes' blocks of them, and a warning says so. Files are read at the same
rate, so a small file repeats sooner than a large one: shards of similar size keep the mixture in
proportion.

Each training process reads its share in a reader process of its own (torchdata's StatefulDataLoader, one
worker), a few micro batches ahead of training. Resuming is exact and does not read the stream again from
its start: each file stream's position is datasets' own IterableDataset.state_dict(); a process's position
(StreamShare.state_dict) is those of the files it reads and the next global block it yields, and the
StatefulDataLoader's state holds the one after the last batch handed to training. Every process's
position is saved with each checkpoint (StreamLoader, registered with
accelerator.register_for_checkpointing), so a resumed run reads exactly the blocks the interrupted one
would have; it must run with the same number of processes.
The file streams are taken in turn here (StreamShare), not with datasets' interleave_datasets: that
one reads ahead in threads and, in datasets 5.2, does not always restore a saved position exactly
(a batched map, or a repeated file near its end, resumes at other blocks).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import multiprocessing
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ContextManager

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from gqa.convert.errors import GQAError
from gqa.convert import corpus
from gqa.convert.modeldir import cache_root, tokenizer_files
from gqa.convert.text import chunk_tokens, document_window, encode_documents, leading_bos
from gqa.train.recipe import DataSection

logger = logging.getLogger(__name__)

STDLIB_SOURCE = corpus.NAME
CACHE_FORMAT = 3  # bump when the layout or the choice of cached blocks changes (3: held-out stream blocks from files in turn)
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Documents tokenised and packed together (prepared and streamed alike); each group drops its tail,
# fewer than block_size tokens, so large groups keep that to block_size - 1 tokens per 4,000 documents.
PACK_DOCUMENTS = 4000
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


@dataclass(frozen=True)
class Source:
    """One entry of data.train / data.eval, resolved."""

    kind: str  # stdlib | text | json | parquet | saved | folder | hub
    location: str  # a path, a hub id, or a stdlib-docs split
    split: str  # split used for saved DatasetDicts, folders of data files and hub datasets
    builder: str = ""  # folder: the datasets builder of its files (text, json, parquet)
    revision: str | None = None  # hub: the branch, tag or commit given as id@revision; None: the default branch


@dataclass(frozen=True)
class PreparedData:
    # input_ids blocks (packed) or documents (not packed); streamed: this process's share of the stream
    train: datasets.Dataset | StreamShare
    eval: datasets.Dataset
    stats: dict[str, Any]  # documents, tokens and blocks per split (None where a stream does not know); the cache

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, StreamShare)


def default_cache_root() -> Path:
    return cache_root() / "data"


def prepare_data(
    data: DataSection,
    tokenizer,
    tokenizer_dir: str | Path,
    seed: int,
    local_main_process_first: Callable[[], ContextManager] = contextlib.nullcontext,
    process_index: int = 0,
    num_processes: int = 1,
) -> PreparedData:
    """Blocks for training and evaluation, from the cache or built by the first process of each machine;
    streamed (data.streaming), this process's share of the training stream and the cached held-out blocks."""
    cache_root = Path(data.cache_dir) if data.cache_dir else default_cache_root()
    train_sources = resolve_sources(data.train, "data.train", data.train_split, cache_root)
    eval_sources = resolve_sources(data.eval, "data.eval", data.eval_split, cache_root) if data.eval else []
    if data.streaming:
        return _prepare_stream(
            data, train_sources, eval_sources, tokenizer, tokenizer_dir, seed, local_main_process_first,
            process_index, num_processes, cache_root,
        )
    key = _cache_key(data, train_sources, eval_sources, tokenizer, tokenizer_dir, seed)
    cache_dir = cache_root / key
    with local_main_process_first():
        if not (cache_dir / "stats.json").is_file():
            _build(data, train_sources, eval_sources, tokenizer, seed, cache_dir)
        else:
            logger.info("data: using cached blocks in %s", cache_dir)
        stats = json.loads((cache_dir / "stats.json").read_text())
        train = datasets.load_from_disk(str(cache_dir / "train"))
        eval_ = datasets.load_from_disk(str(cache_dir / "eval"))
    return PreparedData(train=train, eval=eval_, stats=stats | {"cache_dir": str(cache_dir)})


def resolve_sources(spec: str | list[str], key: str, split: str, cache_root: Path) -> list[Source]:
    """What each entry of a data key is: a file, a saved dataset, the stdlib corpus, or a hub id."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise GQAError(f"{key} is an empty list; name at least one file, directory or dataset")
    sources = []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.startswith(f"{STDLIB_SOURCE}:"):
            corpus_split = entry.split(":", 1)[1]
            if corpus_split not in corpus.SPLITS:
                raise GQAError(f"{key}: {entry!r} names no corpus split; use stdlib-docs:train or stdlib-docs:heldout")
            sources.append(Source("stdlib", corpus_split, corpus_split))
        elif path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                sources.append(Source("saved", str(path.resolve()), split))
            else:  # a folder of data files (shards); datasets reads its split from the file names
                sources.append(Source("folder", str(path.resolve()), split, _folder_builder(path, key)))
        elif path.is_file():
            sources.append(_file_source(path, key, split))
        elif glob.has_magic(entry):  # shards/*.parquet, data/**/*.jsonl: each matching file, as if listed
            sources.extend(_file_source(file, key, split, entry) for file in matching_files(entry, key))
        elif path.suffix.lower() in FILE_BUILDERS or entry.startswith((".", "/", "~")):  # meant as a file
            raise GQAError(f"{key}: {entry} does not exist; check the path (relative paths start from {Path.cwd()})")
        else:  # e.g. HuggingFaceFW/fineweb-edu, or HuggingFaceFW/fineweb-edu@<commit> to pin a revision
            name, _, revision = entry.partition("@")
            if "@" in entry and not (name and revision):
                raise GQAError(f"{key}: {entry!r} is not a hub dataset id; write ID or ID@REVISION (a branch, tag or commit)")
            sources.append(Source("hub", name, split, revision=revision or None))
    return sources


def matching_files(pattern: str, key: str) -> list[Path]:
    """The files a glob pattern matches, sorted by path: `*`, `?` and `[...]` within a name, `**` across any depth
    of folders (as datasets reads them), neither matching names that start with a dot. A pattern matching no
    file is an error naming it."""
    matches = sorted(set(glob.glob(os.path.expanduser(pattern), recursive=True)))
    files = [Path(match) for match in matches if Path(match).is_file()]
    if not files:
        raise GQAError(f"{key}: the pattern {pattern} matches no file; check it (relative patterns start from {Path.cwd()})")
    return files


def _file_source(path: Path, key: str, split: str, pattern: str | None = None) -> Source:
    """A data file as a source, read by the datasets builder its suffix names; `pattern`: the glob that matched it."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        known = ", ".join(sorted(FILE_BUILDERS))
        matched = f", which {pattern} matches" if pattern else ""
        raise GQAError(f"{key}: cannot read {path} (suffix {path.suffix or 'none'}){matched}; use one of {known}")
    return Source(builder, str(path.resolve()), split)


def _folder_builder(path: Path, key: str) -> str:
    files = [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in files} - {None}
    known = ", ".join(sorted(FILE_BUILDERS))
    if not builders:
        raise GQAError(f"{key}: {path} is a directory but neither one written by datasets' save_to_disk nor a folder of data files ({known})")
    if len(builders) > 1:
        raise GQAError(f"{key}: {path} mixes kinds of data files ({', '.join(sorted(builders))}); give one kind per folder")
    return builders.pop()


def training_order(num_blocks: int, num_sequences: int, seed: int) -> np.ndarray:
    """Block indices in the order a run consumes them: a fresh seeded permutation each epoch.

    Fixed by (num_blocks, num_sequences, seed) alone, so one process and many see the same
    global batches, and a resumed run sees what the interrupted one would have.
    """
    epochs = math.ceil(num_sequences / num_blocks)
    order = [np.random.default_rng([seed, epoch]).permutation(num_blocks) for epoch in range(epochs)]
    return np.concatenate(order)[:num_sequences]


def make_collate(block_size: int, pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Collate blocks into tensors: packed blocks as they are, documents padded to block_size."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [np.asarray(example["input_ids"], dtype=np.int64) for example in examples]
        if all(len(row) == block_size for row in rows):
            input_ids = torch.from_numpy(np.stack(rows))
            return {"input_ids": input_ids, "labels": input_ids}
        input_ids = torch.full((len(rows), block_size), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), block_size), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.from_numpy(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # padding is not predicted
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


# --- building ---------------------------------------------------------------------------------


def _build(data: DataSection, train_sources, eval_sources, tokenizer, seed: int, cache_dir: Path) -> None:
    logger.info("data: tokenising and packing into %s", cache_dir)
    train_docs = _load_documents(train_sources, data, "data.train", cache_dir.parent)
    if eval_sources:
        eval_docs = _load_documents(eval_sources, data, "data.eval", cache_dir.parent)
    else:
        if len(train_docs) < 2:
            raise GQAError("data.train holds one document, too few to hold some out; set data.eval to separate files")
        split = train_docs.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    stats: dict[str, Any] = {"format": CACHE_FORMAT}
    built = {name: _blocks_of(docs, tokenizer, data, name, stats) for name, docs in (("train", train_docs), ("eval", eval_docs))}
    _check_sizes(data, stats, ("train", "eval"))  # before caching: an empty split is an error, never a cache entry
    _write_cache(cache_dir, built, stats)


def _blocks_of(docs: datasets.Dataset, tokenizer, data: DataSection, name: str, stats: dict[str, Any]) -> datasets.Dataset:
    """A split's documents tokenised and (packed) cut into blocks; counts go into stats."""
    bos = leading_bos(tokenizer)
    tokens = _tokenise(docs, tokenizer, data, name)
    stats[f"{name}_documents"] = len(docs)
    stats[f"{name}_tokens"] = _token_count(tokens)
    blocks = _pack(tokens, data.block_size, bos, data.num_proc, name) if data.pack else tokens
    stats[f"{name}_blocks"] = len(blocks)
    return blocks


def _write_cache(cache_dir: Path, built: dict[str, datasets.Dataset], stats: dict[str, Any]) -> None:
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, blocks in built.items():
        blocks.save_to_disk(str(tmp / name))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    try:
        os.replace(tmp, cache_dir)  # atomic: a reader sees all of it or none
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_documents(sources: list[Source], data: DataSection, key: str, cache_root: Path) -> datasets.Dataset:
    parts = [_text_column(_load_source(source, data, key, cache_root), source, data, key) for source in sources]
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(_has_text, batched=True, desc="dropping empty")
    if len(docs) == 0:
        where = ", ".join(s.location for s in sources)
        raise GQAError(f"{key} holds no text: {where} has no non-empty {data.text_field!r} field; point {key} at real data")
    return docs


def _text_column(part, source: Source, data: DataSection, key: str):
    """A source's documents as one column, "text" (a Dataset or an IterableDataset)."""
    columns = part.column_names
    if columns is None:  # a stream that does not declare its columns: its first row does
        columns = list(_first_row(part, source.location, key) or {})
    _check_text_field(data.text_field, columns, source.location)
    part = part.select_columns([data.text_field])
    if data.text_field != "text":
        part = part.rename_column(data.text_field, "text")
    return part


def _check_text_field(field: str, columns: Sequence[str], where: str) -> None:
    if field not in columns:
        raise GQAError(f"data.text_field={field!r} is not a column of {where} (columns: {', '.join(columns)}); set data.text_field")


def _has_text(batch: dict[str, list]) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in batch["text"]]


def _first_row(part: datasets.IterableDataset, where: str, key: str) -> dict | None:
    """Read a stream's first row now, so that an unreadable source fails before training starts."""
    try:
        return next(iter(part), None)
    except Exception as err:  # malformed files surface as assorted pyarrow/datasets errors
        raise GQAError(f"{key}: could not read {where}: {err}") from err


def _load_source(source: Source, data: DataSection, key: str, cache_root: Path, streaming: bool = False):
    """A source's rows: a Dataset, or read lazily as an IterableDataset when streaming."""
    if source.kind == "stdlib":
        path = corpus.write_corpus(cache_root / corpus.corpus_tag())[source.location]
        return datasets.load_dataset("text", data_files=[str(path)], sample_by="paragraph", split="train", streaming=streaming)
    if source.kind == "text":  # a document is a block of lines between blank lines
        return datasets.load_dataset("text", data_files=[source.location], sample_by="paragraph", split="train", streaming=streaming)
    if source.kind in ("json", "parquet"):
        try:
            return datasets.load_dataset(source.kind, data_files=[source.location], split="train", streaming=streaming)
        except Exception as err:  # malformed files surface as assorted pyarrow/datasets errors
            raise GQAError(f"{key}: could not read {source.location}: {err}") from err
    if source.kind == "saved":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise GQAError(f"{_split_key(key)}={source.split!r} is not a split of {source.location} ({', '.join(loaded)})")
            loaded = loaded[source.split]
        # streamed, one file stream per arrow file, as a folder of data files would give
        return loaded.to_iterable_dataset(num_shards=max(1, len(loaded.cache_files))) if streaming else loaded
    if source.kind == "folder":  # the split comes from the file names (train-*.parquet, ...); none named: all train
        text = {"sample_by": "paragraph"} if source.builder == "text" else {}
        try:
            return datasets.load_dataset(source.builder, data_dir=source.location, split=source.split, streaming=streaming, **text)
        except Exception as err:  # a missing split, or unreadable files
            raise GQAError(f"{_unreadable(source, data, key)}: {err}") from err
    try:  # hub dataset
        return datasets.load_dataset(source.location, data.hub_config, split=source.split, streaming=streaming, revision=source.revision)
    except Exception as err:  # network, auth, missing config, split or revision: all say the same to the user
        raise GQAError(f"{_unreadable(source, data, key)}: {err}") from err


def _split_key(key: str) -> str:
    return "data.eval_split" if key == "data.eval" else "data.train_split"


def _unreadable(source: Source, data: DataSection, key: str) -> str:
    """The start of the error for a folder's split or a hub dataset that cannot be read."""
    if source.kind == "folder":
        return f"{key}: could not read split {source.split!r} ({_split_key(key)}) of the folder {source.location}"
    revision = f", revision {source.revision}" if source.revision else ""
    return (f"{key}: {source.location!r} is not a local path and could not be loaded as a hub dataset "
            f"(config {data.hub_config}, split {source.split}{revision}; {_split_key(key)})")  # fmt: skip


def _tokeniser(tokenizer, data: DataSection) -> Callable[[Sequence[str]], list[list[int]]]:
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


def _packer(block_size: int, bos: int | None) -> Callable[[pa.Array | pa.ChunkedArray], np.ndarray]:
    """A group of documents' token rows, concatenated and cut into full blocks (gqa.convert.text's windows)."""

    def pack(rows: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return chunk_tokens(pc.list_flatten(rows).to_numpy(), block_size, bos)

    return pack


def _tokenise(docs: datasets.Dataset, tokenizer, data: DataSection, name: str) -> datasets.Dataset:
    """Each document's tokens; unpacked, each document's one window."""
    tokenise = _tokeniser(tokenizer, data)
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
    pack = _packer(block_size, bos)
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


def _check_sizes(data: DataSection, stats: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        key = "data.train" if name == "train" else "data.eval" if data.eval else "data.eval_fraction"
        if stats[f"{name}_blocks"] == 0 and not data.pack:
            raise GQAError(f"{key}: no {name} document is 2 tokens or longer; add data to {key}")
        if stats[f"{name}_blocks"] == 0:
            raise GQAError(
                f"data.block_size={data.block_size} is longer than the {name} data ({stats[f'{name}_tokens']:,} tokens "
                f"in {stats[f'{name}_documents']:,} documents, none long enough); lower data.block_size or add data to {key}"
            )


# --- streaming --------------------------------------------------------------------------------


def _prepare_stream(
    data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir, seed: int,
    local_main_process_first: Callable[[], ContextManager], process_index: int, num_processes: int, cache_root: Path,
) -> PreparedData:
    """This process's share of the training stream (see the module docstring for its order) and the held-out
    blocks: data.eval prepared and cached as usual, or the first data.eval_blocks blocks of the stream, cached."""
    files = stream_files(train_sources, data, tokenizer, "data.train", cache_root)
    key = _stream_eval_key(data, train_sources, eval_sources, tokenizer, tokenizer_dir)
    cache_dir = cache_root / key
    with local_main_process_first():
        if not (cache_dir / "stats.json").is_file():
            logger.info("data: preparing the held-out blocks in %s", cache_dir)
            if eval_sources:
                stats: dict[str, Any] = {"format": CACHE_FORMAT}
                eval_docs = _load_documents(eval_sources, data, "data.eval", cache_root)
                built = _blocks_of(eval_docs, tokenizer, data, "eval", stats)
                _check_sizes(data, stats, ("eval",))
                _write_cache(cache_dir, {"eval": built}, stats | {"held_out_blocks": 0})
            else:
                _write_held_out(files, data, cache_dir)
        else:
            logger.info("data: using cached held-out blocks in %s", cache_dir)
        stats = json.loads((cache_dir / "stats.json").read_text())
        eval_ = datasets.load_from_disk(str(cache_dir / "eval"))
    held_out = stats["held_out_blocks"]
    names = [name for name, _ in files]
    empty = (f"data.train: {{name}} yields no block of data.block_size={data.block_size} tokens to train on"
             + (" after its share of the held-out blocks" if held_out else "")
             + "; remove it from data.train or lower data.block_size" + (" or data.eval_blocks" if held_out else ""))
    train = StreamShare(_training_streams(files, data, seed, held_out), names, process_index, num_processes, empty)
    first = train.files[0]
    if eval_sources and _first_row(files[first][1], names[first], "data.train") is None:  # (held out: checked when cached)
        raise GQAError(_no_blocks_message(data) if len(files) == 1 else empty.format(name=names[first]))
    if not train.sharded and process_index == 0:
        share = "the whole stream" if len(train.files) == len(files) else f"{len(train.files)} of its files"
        logger.warning(
            "data: data.train has %d file(s), which do not split evenly among %d processes: each process reads and "
            "tokenises %s and keeps 1 block in %d of what it reads. Split the data into a multiple of %d files "
            "(e.g. parquet shards in a folder) for each process to read only its own", len(files), num_processes,
            share, num_processes * len(train.files) // len(files), num_processes,
        )
    if num_processes > 1 and process_index == 0:  # the plan gives the rule; these are the names
        for rank in range(min(num_processes, 4)):
            own = [names[j] for j in share_files(len(files), rank, num_processes)]
            logger.info("data: process %d reads %s%s", rank, ", ".join(own[:3]), f" and {len(own) - 3} more" if len(own) > 3 else "")
    stats = stats | {"train_documents": None, "train_tokens": None, "train_blocks": None, "streaming": True,
                     "stream_files": len(files)}  # fmt: skip
    return PreparedData(train=train, eval=eval_, stats=stats | {"cache_dir": str(cache_dir)})


def stream_files(sources: list[Source], data: DataSection, tokenizer, key: str, cache_root: Path) -> list[tuple[str, datasets.IterableDataset]]:
    """One stream of blocks per file of the sources, in order, each with its name: the file's documents, empty
    ones dropped, tokenised and packed (as _tokenise and _pack do) on the fly."""
    tokenise, pack = _tokeniser(tokenizer, data), _packer(data.block_size, leading_bos(tokenizer))

    def blocks(batch: dict[str, list]) -> dict[str, Any]:
        rows = tokenise(batch["text"])
        if not data.pack:
            return {"input_ids": rows}
        return {"input_ids": pack(pa.array(rows, type=pa.list_(pa.int32())))}

    return [
        (name, docs.filter(_has_text, batched=True).map(blocks, batched=True, batch_size=PACK_DOCUMENTS, remove_columns=["text"]))
        for source in sources for name, docs in _streamed_documents(source, data, key, cache_root)
    ]  # fmt: skip


def _streamed_documents(source: Source, data: DataSection, key: str, cache_root: Path) -> list[tuple[str, datasets.IterableDataset]]:
    """A streamed source's documents (one column, "text"), one stream per file, each with its name. Parquet files
    (a file, a folder of them, a hub dataset stored as parquet) are read by _parquet_documents; other files by
    datasets' streaming builders (datasets' shards)."""
    files = _parquet_files(source, data, key)
    if files is None:
        docs = _text_column(_load_source(source, data, key, cache_root, streaming=True), source, data, key)
        count = docs.num_shards
        return [(source.location if count == 1 else f"{source.location} (file {j + 1} of {count})",
                 docs.shard(num_shards=count, index=j)) for j in range(count)]  # fmt: skip
    return [(file, _parquet_documents(file, data.text_field, key)) for file in files]


def _parquet_files(source: Source, data: DataSection, key: str) -> list[str] | None:
    """The parquet files a streamed source is made of, in order; None for a source of other files."""
    if source.kind == "parquet":
        return [source.location]
    if source.kind == "folder" and source.builder == "parquet":
        builder = datasets.load_dataset_builder("parquet", data_dir=source.location)
    elif source.kind == "hub":
        try:
            builder = datasets.load_dataset_builder(source.location, data.hub_config, revision=source.revision)
        except Exception as err:  # network, auth, missing config or revision: all say the same to the user
            raise GQAError(f"{_unreadable(source, data, key)}: {err}") from err
        if builder.name != "parquet":
            return None
    else:
        return None
    splits = builder.config.data_files or {}
    if source.split not in splits:
        raise GQAError(f"{_unreadable(source, data, key)}: Available splits: {sorted(str(name) for name in splits)}")
    return list(splits[source.split])


def _parquet_documents(file: str, field: str, key: str) -> datasets.IterableDataset:
    """A parquet file's `field` column as a stream of documents ("text"), read one row group at a time by one
    thread: memory holds one row group whatever the size of the file (datasets' parquet stream lets arrow read
    up to about 1 GiB of a file ahead, for every file a process has open). Each row group is a datasets shard,
    so a restored position reads again only the rest of its row group."""
    try:
        with fsspec.open(file, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except Exception as err:  # a missing or unreadable file: assorted fsspec/pyarrow errors
        raise GQAError(f"{key}: could not read {file}: {err}") from err
    _check_text_field(field, metadata.schema.to_arrow_schema().names, file)
    groups = list(range(metadata.num_row_groups))
    return datasets.IterableDataset.from_generator(
        _parquet_rows, features=datasets.Features({"text": datasets.Value("string")}),
        gen_kwargs={"file": [file] * len(groups), "row_group": groups, "field": field},
    )  # fmt: skip


def _parquet_rows(file: list[str], row_group: list[int], field: str):
    for path, group in zip(file, row_group, strict=True):  # datasets hands each shard its part of the lists
        with fsspec.open(path, "rb") as handle:
            column = pq.ParquetFile(handle).read_row_group(group, columns=[field], use_threads=False).column(0)
        for text in column.to_pylist():
            yield {"text": text}


def _training_streams(files: list[tuple[str, datasets.IterableDataset]], data: DataSection, seed: int, held_out: int):
    """Each file stream as training reads it: without its share of the held-out blocks, repeated, shuffled in runs."""
    count = len(files)
    run = math.ceil(data.shuffle_buffer / count)  # a run of about data.shuffle_buffer blocks of the global stream
    streams = []
    for j, (_, blocks) in enumerate(files):
        held = len(range(j, held_out, count))  # the held-out global blocks j, j+S, ... are this file's first ones
        stream = (blocks.skip(held) if held else blocks).repeat(None)  # the skip applies again in every epoch
        if run > 1:
            stream = stream.map(_window_shuffle(seed, j, run), batched=True, batch_size=run, with_indices=True)
        streams.append(stream)
    return streams


def _window_shuffle(seed: int, file: int, size: int) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """Each run of `size` consecutive blocks of a file stream (a map batch) in the order rng([seed, file, run number]) draws."""

    def shuffle(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        order = np.random.default_rng([seed, file, indices[0] // size]).permutation(len(indices))
        return {name: [column[i] for i in order] for name, column in batch.items()}

    return shuffle


def _write_held_out(files: list[tuple[str, datasets.IterableDataset]], data: DataSection, cache_dir: Path) -> None:
    """The first data.eval_blocks blocks of the stream, cached; one more is read to be sure training has some."""
    whole = StreamShare([blocks for _, blocks in files], [name for name, _ in files])  # the global stream, read once
    rows = [np.asarray(row["input_ids"], dtype=np.int32) for row in islice(iter(whole), data.eval_blocks + 1)]
    if not rows and len(files) == 1:
        raise GQAError(_no_blocks_message(data))
    if len(rows) <= data.eval_blocks:
        name, read = whole.ended
        if read == 0:
            raise GQAError(f"data.train: {name} yields no block of data.block_size={data.block_size} tokens; "
                           "remove it from data.train or lower data.block_size")
        turns = f"; the stream takes its blocks from its {len(files)} files in turn" if len(files) > 1 else ""
        raise GQAError(
            f"data.eval_blocks={data.eval_blocks} holds out the whole of {name} ({read} blocks of "
            f"{data.block_size} tokens{turns}), leaving nothing to train on; lower data.eval_blocks or set data.eval"
        )
    held = rows[: data.eval_blocks]
    stats = {"format": CACHE_FORMAT, "eval_documents": None, "eval_tokens": int(sum(len(r) for r in held)),
             "eval_blocks": len(held), "held_out_blocks": len(held)}  # fmt: skip
    _write_cache(cache_dir, {"eval": datasets.Dataset.from_dict({"input_ids": held}, features=BLOCK_FEATURES)}, stats)


def _no_blocks_message(data: DataSection) -> str:
    if not data.pack:
        return "data.train: no document is 2 tokens or longer; add data to data.train"
    return (f"data.train yields no block of data.block_size={data.block_size} tokens (no text, or too little); "
            "lower data.block_size or add data to data.train")


class StreamShare(torch.utils.data.IterableDataset):
    """Process `rank` of `processes`'s blocks of the global stream: its blocks rank, rank+N, rank+2N, ...

    Global block k is block k div S of file stream k mod S (S = len(streams)), so this process needs file
    streams rank mod g, rank mod g + g, ... (g = gcd(S, N)) and opens only those. When N divides S (g = N),
    all their blocks are its own; otherwise it reads the other processes' blocks of them too and drops them
    (with g = 1, every file). The position (state_dict) is the next global block and, for each file stream
    read, the blocks read from it and datasets' own state_dict after the last one. That state is kept here
    rather than asked of a stream again: datasets reports a fresh position for a stream restored with
    load_state_dict until it yields again.
    """

    def __init__(self, streams: Sequence[datasets.IterableDataset], names: Sequence[str], rank: int = 0,
                 processes: int = 1, empty: str = "data.train: {name} ran out of blocks"):  # fmt: skip
        self.streams, self.names, self.rank, self.processes = list(streams), list(names), rank, processes
        self.sharded = len(self.streams) % processes == 0  # reads only its own blocks
        self.empty = empty  # the error when a file stream ends, with {name}
        self.next = rank  # the next global block this process yields
        self.read: dict[int, int] = {}  # file stream -> blocks read from it
        self.states: dict[int, dict] = {}  # file stream -> its state_dict() after its last block read
        self.ended: tuple[str, int] | None = None  # (name, blocks read) of the file stream that ran out

    @property
    def files(self) -> list[int]:
        """The file streams this process reads."""
        return share_files(len(self.streams), self.rank, self.processes)

    def __iter__(self):
        count = len(self.streams)
        iterators: dict[int, Any] = {}
        while True:
            j, index = self.next % count, self.next // count
            if j not in iterators:
                if j in self.states:
                    self.streams[j].load_state_dict(self.states[j])
                iterators[j] = iter(self.streams[j])
            block = None
            while self.read.get(j, 0) <= index:  # one block when sharded; else other processes' blocks go by first
                block = next(iterators[j], None)
                if block is None:
                    self.ended = (self.names[j], self.read.get(j, 0))
                    return
                self.read[j] = self.read.get(j, 0) + 1
                self.states[j] = self.streams[j].state_dict()
            self.next += self.processes
            yield block

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next, "read": dict(self.read), "states": dict(self.states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next, self.read, self.states = int(state["next"]), dict(state["read"]), dict(state["states"])

    def ended_error(self) -> GQAError:
        return GQAError(self.empty.format(name=self.ended[0] if self.ended else "data.train"))


def share_files(files: int, rank: int, processes: int) -> list[int]:
    """The file streams process `rank` reads: those of global blocks rank, rank+N, ... (see StreamShare)."""
    apart = math.gcd(files, processes)
    return list(range(rank % apart, files, apart))


class StreamBatches(torch.utils.data.IterableDataset):
    """A share's micro batches, collated. Where the share runs out, or reading it raises a GQAError, the last
    item is {"error": message} instead: the training process raises it (a reader process's own exception would
    reach it wrapped in the reader's traceback). Its position is the share's."""

    def __init__(self, share: StreamShare, batch_size: int, collate: Callable):
        self.share, self.batch_size, self.collate = share, batch_size, collate

    def __iter__(self):
        try:
            blocks = iter(self.share)
            while len(rows := list(islice(blocks, self.batch_size))) == self.batch_size:
                yield self.collate(rows)
            yield {"error": str(self.share.ended_error())}  # the training stream repeats, unless a file has no block
        except GQAError as err:
            yield {"error": str(err)}

    def state_dict(self) -> dict[str, Any]:
        return self.share.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.share.load_state_dict(state)


class StreamLoader:
    """The training batches of a streamed run, and every process's position in the stream for checkpoints.

    Not prepared by accelerate: each process already reads only its share (StreamShare), so batches go to
    the device as they come. A reader process (torchdata's StatefulDataLoader, one worker) reads, tokenises and
    packs up to `read_ahead` micro batches ahead of training, on a core of its own; the loader's position is
    that of the last batch handed to training, never of what was read ahead. Where processes cannot be forked,
    the batches are read in the training process. Registered with accelerator.register_for_checkpointing:
    save_state stores state_dict() with every checkpoint and load_state restores it. Each process's position
    differs (each reads its own files), so state_dict gathers them all, by rank, and each process restores its
    own; a checkpoint resumes only under the number of processes that wrote it.
    """

    def __init__(self, share: StreamShare, batch_size: int, collate: Callable, device,
                 gather: Callable[[list], list] = lambda items: items, read_ahead: int = 4):
        self.share = share
        self.batch_size = batch_size  # read by accelerate's DeepSpeed set-up, like a DataLoader's
        self.device = torch.device(device)
        self.gather = gather  # all processes' items, in rank order (accelerate.utils.gather_object)
        self.batches = StreamBatches(share, batch_size, collate)
        self.read_ahead = read_ahead
        self.position: dict[str, Any] | None = None  # the loader's state after the last batch handed out

    def __iter__(self):
        # fork: the reader inherits the open streams and the tokenizer, which need not pickle
        forked = "fork" in multiprocessing.get_all_start_methods()
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            loader = StatefulDataLoader(
                self.batches, batch_size=None, num_workers=1 if forked else 0,
                prefetch_factor=self.read_ahead if forked else None, multiprocessing_context="fork" if forked else None,
                pin_memory=self.device.type == "cuda",
            )  # fmt: skip
        if self.position is not None:
            loader.load_state_dict(self.position)
        for batch in loader:  # the reader process stops when this generator is closed and the loader freed
            if "error" in batch:
                raise GQAError(batch["error"])
            self.position = loader.state_dict()
            yield {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"processes": self.share.processes, "loaders": self.gather([self.position])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loaders" not in state:
            raise GQAError("the checkpoint holds its data.train stream position in a layout older than this gqa's; "
                           "start afresh with resume=never and a new output.dir")
        if state["processes"] != self.share.processes:
            raise GQAError(
                f"the checkpoint's position in the data.train stream was saved by {state['processes']} process(es) and "
                f"this run has {self.share.processes}; each process reads its own files of the stream, so resume with "
                f"{state['processes']} process(es) (torchrun --nproc_per_node, accelerate launch --num_processes), "
                "or start afresh with resume=never and a new output.dir"
            )
        self.position = state["loaders"][self.share.rank]


# --- cache key --------------------------------------------------------------------------------


def _cache_key(data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir, seed: int) -> str:
    return _key("blocks", data, tokenizer, tokenizer_dir,
        train=[_source_fingerprint(s) for s in train_sources],
        eval=[_source_fingerprint(s) for s in eval_sources],
        # the held-out fraction is drawn with the seed only when there are no eval files
        holdout=None if eval_sources else [data.eval_fraction, seed],
    )  # fmt: skip


def _stream_eval_key(data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir) -> str:
    """Streamed runs cache only their held-out blocks: data.eval's, or the first data.eval_blocks of data.train's stream."""
    held_out = None if eval_sources else {"train": [_source_fingerprint(s) for s in train_sources], "blocks": data.eval_blocks}
    return _key("stream-eval", data, tokenizer, tokenizer_dir, eval=[_source_fingerprint(s) for s in eval_sources],
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


def _source_fingerprint(source: Source) -> list:
    if source.kind == "stdlib":
        return [source.kind, source.location, corpus.corpus_tag()]
    if source.kind == "hub":  # unpinned, the branch may move: pin id@revision for a cache that follows the data
        return [source.kind, source.location, source.split, source.revision]
    path = Path(source.location)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [source.kind, source.location, source.split, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
