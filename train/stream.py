"""Streamed data: each file of data.train a stream of blocks, taken in turn, each process reading its share,
in a reader process of its own, with exact resume (see gqa.train.dataset for the order)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, ContextManager

import datasets
import numpy as np
import pyarrow as pa
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from gqa.convert.errors import GQAError
from gqa.convert.text import leading_bos
from gqa.train.recipe import DataSection
from gqa.train.blocks import (BLOCK_FEATURES, CACHE_FORMAT, PACK_DOCUMENTS, blocks_of, check_sizes, packer, stream_eval_key,
    tokeniser, write_cache)
from gqa.train.sources import (Source, first_row, has_text, load_documents, load_source, parquet_documents, parquet_files,
    text_column)

logger = logging.getLogger(__name__)
READER_RESTARTS = 2  # a stuck reader started again this many times in a row before the run fails


def prepare_stream(
    data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir, seed: int,
    local_main_process_first: Callable[[], ContextManager], process_index: int, num_processes: int, cache_root: Path,
) -> tuple[StreamShare, datasets.Dataset, dict[str, Any]]:
    """This process's share of the training stream (see gqa.train.dataset for its order), the held-out blocks and
    their stats. The held-out blocks are data.eval's, prepared and cached as usual, or the first data.eval_blocks
    blocks of the stream, cached."""
    files = stream_files(train_sources, data, tokenizer, "data.train", cache_root)
    key = stream_eval_key(data, train_sources, eval_sources, tokenizer, tokenizer_dir)
    cache_dir = cache_root / key
    with local_main_process_first():
        if not (cache_dir / "stats.json").is_file():
            logger.info("data: preparing the held-out blocks in %s", cache_dir)
            if eval_sources:
                stats: dict[str, Any] = {"format": CACHE_FORMAT}
                eval_docs = load_documents(eval_sources, data, "data.eval", cache_root)
                built = blocks_of(eval_docs, tokenizer, data, "eval", stats)
                check_sizes(data, stats, ("eval",))
                write_cache(cache_dir, {"eval": built}, stats | {"held_out_blocks": 0})
            else:
                write_held_out(files, data, cache_dir)
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
    if eval_sources and first_row(files[first][1], names[first], "data.train") is None:  # (held out: checked when cached)
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
    return train, eval_, stats | {"cache_dir": str(cache_dir)}


def stream_files(sources: list[Source], data: DataSection, tokenizer, key: str, cache_root: Path) -> list[tuple[str, datasets.IterableDataset]]:
    """One stream of blocks per file of the sources, in order, each with its name: the file's documents, empty
    ones dropped, tokenised and packed (as _tokenise and _pack do) on the fly."""
    tokenise, pack = tokeniser(tokenizer, data), packer(data.block_size, leading_bos(tokenizer))

    def blocks(batch: dict[str, list]) -> dict[str, Any]:
        rows = tokenise(batch["text"])
        if not data.pack:
            return {"input_ids": rows}
        return {"input_ids": pack(pa.array(rows, type=pa.list_(pa.int32())))}

    return [
        (name, docs.filter(has_text, batched=True).map(blocks, batched=True, batch_size=PACK_DOCUMENTS, remove_columns=["text"]))
        for source in sources for name, docs in _streamed_documents(source, data, key, cache_root)
    ]  # fmt: skip


def _streamed_documents(source: Source, data: DataSection, key: str, cache_root: Path) -> list[tuple[str, datasets.IterableDataset]]:
    """A streamed source's documents (one column, "text"), one stream per file, each with its name. Parquet files
    (a file, a folder of them, a hub dataset stored as parquet) are read by parquet_documents; other files by
    datasets' streaming builders (datasets' shards)."""
    files = parquet_files(source, data, key)
    if files is None:
        docs = text_column(load_source(source, data, key, cache_root, streaming=True), source, data, key)
        count = docs.num_shards
        return [(source.location if count == 1 else f"{source.location} (file {j + 1} of {count})",
                 docs.shard(num_shards=count, index=j)) for j in range(count)]  # fmt: skip
    return [(file, parquet_documents(file, data.text_field, key)) for file in files]


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


def write_held_out(files: list[tuple[str, datasets.IterableDataset]], data: DataSection, cache_dir: Path) -> None:
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
    write_cache(cache_dir, {"eval": datasets.Dataset.from_dict({"input_ids": held}, features=BLOCK_FEATURES)}, stats)


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
    that of the last batch handed to training, never of what was read ahead. A reader that sends no batch for
    `reader_timeout` seconds (stuck: a lock held at the fork, a network read that never returns) is ended and
    started again from that position, so training goes on with the batches it would have had; after
    READER_RESTARTS such restarts in a row, the run fails with a GQAError. Where processes cannot be forked,
    the batches are read in the training process. Registered with accelerator.register_for_checkpointing:
    save_state stores state_dict() with every checkpoint and load_state restores it. Each process's position
    differs (each reads its own files), so state_dict gathers them all, by rank, and each process restores its
    own; a checkpoint resumes only under the number of processes that wrote it.
    """

    def __init__(self, share: StreamShare, batch_size: int, collate: Callable, device,
                 gather: Callable[[list], list] = lambda items: items, read_ahead: int = 4, reader_timeout: float = 300):
        self.share = share
        self.batch_size = batch_size  # read by accelerate's DeepSpeed set-up, like a DataLoader's
        self.device = torch.device(device)
        self.gather = gather  # all processes' items, in rank order (accelerate.utils.gather_object)
        self.batches = StreamBatches(share, batch_size, collate)
        self.read_ahead = read_ahead
        self.reader_timeout = reader_timeout
        self.position: dict[str, Any] | None = None  # the loader's state after the last batch handed out

    def __iter__(self):
        restarts = 0
        while True:
            loader = self._loader()
            batches = iter(loader)
            try:
                for batch in batches:  # the reader process stops when the loader's iterator is freed
                    if "error" in batch:
                        raise GQAError(batch["error"])
                    self.position, restarts = loader.state_dict(), 0
                    yield {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}
                return
            except RuntimeError as err:
                if "timed out" not in str(err):  # torch's words for a worker that sent nothing within the timeout
                    raise
                batches._shutdown_workers()  # the stuck reader ends (terminated if it must be) before another starts
            restarts += 1
            if restarts > READER_RESTARTS:
                raise GQAError(
                    f"data.train: the reader process sent no batch in {self.reader_timeout:g} s, {restarts} times in a "
                    "row, started again from the same position each time; check that the data can be read (a hub "
                    "dataset: the network), or raise data.reader_timeout if reading a batch takes that long"
                )
            logger.warning("data: the reader process sent no batch in %g s; starting it again from the same position "
                           "(data.reader_timeout)", self.reader_timeout)

    def _loader(self) -> StatefulDataLoader:
        # fork: the reader inherits the open streams and the tokenizer, which need not pickle
        forked = "fork" in multiprocessing.get_all_start_methods()
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            loader = StatefulDataLoader(
                self.batches, batch_size=None, num_workers=1 if forked else 0,
                prefetch_factor=self.read_ahead if forked else None, multiprocessing_context="fork" if forked else None,
                pin_memory=self.device.type == "cuda", timeout=self.reader_timeout if forked else 0,
            )  # fmt: skip
        if self.position is not None:
            loader.load_state_dict(self.position)
        return loader

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
