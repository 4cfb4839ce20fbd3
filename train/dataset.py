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
parquet files read one row group at a time, see gqa.train.sources.parquet_documents; others datasets' shards). Each
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
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import datasets
import numpy as np
import torch

from gqa.convert.modeldir import cache_root
from gqa.train.recipe import DataSection
from gqa.train.blocks import build_blocks, cache_key
from gqa.train.sources import resolve_sources
from gqa.train.stream import StreamShare, prepare_stream

logger = logging.getLogger(__name__)


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
        train, eval_, stats = prepare_stream(
            data, train_sources, eval_sources, tokenizer, tokenizer_dir, seed, local_main_process_first,
            process_index, num_processes, cache_root,
        )
        return PreparedData(train=train, eval=eval_, stats=stats)
    key = cache_key(data, train_sources, eval_sources, tokenizer, tokenizer_dir, seed)
    cache_dir = cache_root / key
    with local_main_process_first():
        if not (cache_dir / "stats.json").is_file():
            build_blocks(data, train_sources, eval_sources, tokenizer, seed, cache_dir)
        else:
            logger.info("data: using cached blocks in %s", cache_dir)
        stats = json.loads((cache_dir / "stats.json").read_text())
        train = datasets.load_from_disk(str(cache_dir / "train"))
        eval_ = datasets.load_from_disk(str(cache_dir / "eval"))
    return PreparedData(train=train, eval=eval_, stats=stats | {"cache_dir": str(cache_dir)})


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
