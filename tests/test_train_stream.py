"""Streamed training data (data.streaming): packing, held-out blocks, shares, resume, one process and two.

The corpus is real text: the docstrings of a few standard-library modules, written by the fixture as
four parquet shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.train import blocks, dataset, sources, stream
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import make_collate, prepare_data
from gqa.train.stream import StreamLoader, StreamShare
from gqa.train.plan import plan_training
from gqa.train.recipe import DataSection
from test_train_kill import launch, wait_done
from train_helpers import REPO, TRAIN_MODULES, docs_text, make_model, tiny_overrides, torchrun, write_shards

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
TESTS = Path(__file__).resolve().parent
SHARDS = (TRAIN_MODULES[:2], TRAIN_MODULES[2:3], TRAIN_MODULES[3:5], TRAIN_MODULES[5:])  # ~110, 85, 140, 70 blocks of 64

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train-stream")
    shards, held = write_shards(root, SHARDS)
    model = make_model(root)
    return SimpleNamespace(root=root, model=model, tokenizer=AutoTokenizer.from_pretrained(model), shards=shards,
                           files=sorted(shards.glob("*.parquet")), held=held, cache=root / "cache")


def section(ws, **extra) -> DataSection:
    """The four shards, streamed, in blocks of 64 tokens."""
    return DataSection(**{"train": [str(f) for f in ws.files], "cache_dir": str(ws.cache), "block_size": 64, "streaming": True, **extra})


def rows(stream, count: int) -> list[bytes]:
    """The first `count` blocks a stream yields, as bytes (comparable, hashable)."""
    return [np.asarray(row["input_ids"], dtype=np.int64).tobytes() for row in islice(iter(stream), count)]


def overrides(ws, out: Path, **extra) -> list[str]:
    """tiny-cpu, streamed from the shards, with held-out blocks from the stream (data.eval null)."""
    values = {"data.streaming": "true", "data.eval": "null", "data.eval_blocks": 8, "data.shuffle_buffer": 32,
              "eval.max_blocks": 8, "budget.steps": 6, "checkpoint.every": 2, **extra}  # fmt: skip
    train = values.pop("data.train", "[" + ", ".join(str(f) for f in ws.files) + "]")
    return tiny_overrides(ws.model, train, ws.held, out, ws.cache, **values)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


# --- the stream itself ----------------------------------------------------------------------------


def cycled(blocks: list[bytes], count: int) -> list[bytes]:
    return (blocks * (count // len(blocks) + 1))[:count]


def test_the_stream_takes_each_files_prepared_blocks_in_turn(ws):
    """Packing is shared, per file: unshuffled, global block k is block k div 4 of file k mod 4's prepared
    blocks, each file repeating on its own."""
    per_file = []
    for file in ws.files:
        prepared = prepare_data(section(ws, train=str(file), streaming=False, eval=str(ws.held)), ws.tokenizer, ws.model, seed=0)
        per_file.append([np.asarray(ids, dtype=np.int64).tobytes() for ids in prepared.train["input_ids"]])
    streamed = prepare_data(section(ws, eval=str(ws.held), shuffle_buffer=1), ws.tokenizer, ws.model, seed=0)
    assert streamed.streaming and streamed.stats["stream_files"] == 4
    longest = max(len(blocks) for blocks in per_file)
    assert min(len(blocks) for blocks in per_file) > 50 and len(set(map(len, per_file))) == 4
    count = 4 * (longest + 20)  # every file into its second epoch
    expected = [cycled(per_file[k % 4], count // 4 + 1)[k // 4] for k in range(count)]
    assert rows(streamed.train, count) == expected
    # data.eval's blocks are prepared (and cached) as always
    assert streamed.eval["input_ids"] == prepared.eval["input_ids"]
    assert streamed.stats["held_out_blocks"] == 0 and streamed.stats["train_tokens"] is None


def test_held_out_blocks_are_the_first_blocks_of_the_stream_and_never_trained_on(ws, monkeypatch):
    blocks = rows(prepare_data(section(ws, eval=str(ws.held), shuffle_buffer=1), ws.tokenizer, ws.model, seed=0).train, 1000)
    data = prepare_data(section(ws, eval_blocks=21, shuffle_buffer=52), ws.tokenizer, ws.model, seed=0)
    held = [np.asarray(ids, dtype=np.int64).tobytes() for ids in data.eval["input_ids"]]
    assert held == blocks[:21] and data.stats["held_out_blocks"] == 21
    # Every file into its third epoch, shuffled in runs of 13 blocks per file: all the other blocks, never a held-out one.
    trained = rows(data.train, 1200)
    assert not set(held) & set(trained)
    assert set(trained) == set(blocks) - set(held)
    unshuffled = rows(prepare_data(section(ws, eval_blocks=21, shuffle_buffer=1), ws.tokenizer, ws.model, seed=0).train, 52)
    assert trained[:52] != unshuffled and sorted(trained[:52]) == sorted(unshuffled)  # really shuffled, within runs
    # The held-out blocks are read once: a second preparation reads them from the cache.
    monkeypatch.setattr(stream, "write_held_out", lambda *a: pytest.fail("the held-out blocks were read again"))
    again = prepare_data(section(ws, eval_blocks=21, shuffle_buffer=52), ws.tokenizer, ws.model, seed=0)
    assert again.eval["input_ids"] == data.eval["input_ids"]


@pytest.mark.parametrize("processes", [2, 3])  # 2 divides the 4 files: each reads its own; 3 does not: each reads all
def test_each_process_keeps_every_nth_block_of_one_stream(ws, processes, caplog):
    one = rows(prepare_data(section(ws, eval_blocks=8, shuffle_buffer=32), ws.tokenizer, ws.model, seed=3).train, 600)
    with caplog.at_level(logging.WARNING, logger="gqa.train.stream"):
        shares = [prepare_data(section(ws, eval_blocks=8, shuffle_buffer=32), ws.tokenizer, ws.model, seed=3,
                               process_index=i, num_processes=processes).train for i in range(processes)]  # fmt: skip
    assert [one[i::processes] for i in range(processes)] == [rows(share, 600 // processes) for share in shares]
    warned = [r.getMessage() for r in caplog.records if "do not split evenly" in r.getMessage()]
    if processes == 2:
        assert [share.files for share in shares] == [[0, 2], [1, 3]] and not warned
    else:
        assert all(share.files == [0, 1, 2, 3] for share in shares)
        assert len(warned) == 1 and "has 4 file(s)" in warned[0] and "a multiple of 3 files" in warned[0]
        assert "tokenises the whole stream and keeps 1 block in 3" in warned[0]
    other_seed = rows(prepare_data(section(ws, eval_blocks=8, shuffle_buffer=32), ws.tokenizer, ws.model, seed=4).train, 600)
    assert other_seed != one and sorted(other_seed[:576]) == sorted(one[:576])  # 576: whole runs of 8 blocks of each file


def test_a_streamed_glob_is_its_files_each_a_stream_shared_among_processes_like_a_folder(ws):
    def shares(train: str) -> list:
        return [prepare_data(section(ws, train=train, eval_blocks=8, shuffle_buffer=32), ws.tokenizer, ws.model, seed=3,
                             process_index=i, num_processes=2) for i in range(2)]  # fmt: skip

    folder, globbed = shares(str(ws.shards)), shares(str(ws.shards / "train-*.parquet"))
    assert [share.stats["stream_files"] for share in globbed] == [4, 4]
    assert [share.train.files for share in globbed] == [[0, 2], [1, 3]] == [share.train.files for share in folder]
    assert [share.train.names for share in globbed][0] == [str(f) for f in ws.files]  # sorted by path
    assert [rows(share.train, 150) for share in globbed] == [rows(share.train, 150) for share in folder]
    assert globbed[0].eval["input_ids"] == folder[0].eval["input_ids"]  # the stream's first blocks, held out


@pytest.mark.parametrize(("files", "processes"), [(4, 2), (6, 3), (4, 3), (6, 4), (1, 2)])
def test_process_i_of_n_yields_blocks_i_i_plus_n_of_the_files_taken_in_turn(files, processes):
    """Global block k is block k div S of file k mod S. Process i of N yields global blocks i, i+N, ... and reads
    only files i mod g, + g, ... (g = gcd(S, N)): when N divides S, exactly its own blocks and nothing else."""

    def stream(file: int) -> datasets.IterableDataset:  # blocks [file, 0], [file, 1], ..., without end
        return datasets.Dataset.from_dict({"input_ids": [[file, b] for b in range(40)]}).to_iterable_dataset().repeat(None)

    names = [f"file{f}" for f in range(files)]
    whole = [row["input_ids"] for row in islice(StreamShare([stream(f) for f in range(files)], names), 240)]
    assert whole == [[k % files, k // files % 40] for k in range(240)]
    for rank in range(processes):
        share = StreamShare([stream(f) for f in range(files)], names, rank, processes)
        assert [row["input_ids"] for row in islice(share, 240 // processes)] == whole[rank::processes]
        apart = math.gcd(files, processes)
        assert sorted(share.read) == share.files == list(range(rank % apart, files, apart))
        assert (sum(share.read.values()) == 240 // processes) == (files % processes == 0)  # nothing read but its own


def test_a_share_resumes_exactly_from_its_state_even_twice_in_a_row(ws):
    """datasets' own positions, kept per file: restored, read one block (one of its two files untouched), saved,
    restored again: the blocks an uninterrupted share reads."""

    def share():
        return prepare_data(section(ws, eval_blocks=8, shuffle_buffer=32), ws.tokenizer, ws.model, seed=3,
                            process_index=1, num_processes=2).train  # fmt: skip

    whole = rows(share(), 160)
    first = share()
    read = rows(first, 57)
    second = share()
    second.load_state_dict(first.state_dict())
    read += rows(second, 1)
    third = share()
    third.load_state_dict(second.state_dict())
    read += rows(third, 160 - 58)
    assert read == whole


def test_prepared_data_is_built_by_the_first_process_inside_local_main_process_first(ws, tmp_path, monkeypatch):
    """accelerate's local_main_process_first lets the first process of a machine run the block while the
    others wait; they then find the cache. Everything that builds must happen inside it."""
    inside = []

    @contextlib.contextmanager
    def first():
        inside.append(True)
        yield
        inside.append(False)

    build = dataset.build_blocks
    built = []
    monkeypatch.setattr(dataset, "build_blocks", lambda *a: (built.append(inside[-1:] == [True]), build(*a)))
    write_held_out = stream.write_held_out
    monkeypatch.setattr(stream, "write_held_out", lambda *a: (built.append(inside[-1:] == [True]), write_held_out(*a)))
    text = tmp_path / "docs.txt"
    text.write_text(docs_text(TRAIN_MODULES[:2]))
    for data in (DataSection(train=str(text), cache_dir=str(tmp_path), block_size=32),
                 DataSection(train=str(text), cache_dir=str(tmp_path), block_size=32, streaming=True, eval_blocks=4)):
        prepare_data(data, ws.tokenizer, ws.model, seed=0, local_main_process_first=first)
    assert built == [True, True] and inside[-1] is False


def test_the_plan_says_how_data_is_read_and_shared(ws, tmp_path):
    streamed = load_recipe(RECIPE, overrides(ws, tmp_path / "o", **{"batch.micro": 2}))
    two = replace(plan_training(streamed, 2), stream_files=4).describe()
    assert "streamed: read, tokenised and packed on the fly" in two
    assert "process i of 2 reads files i, i+2, ... of the stream's 4 (2 each): blocks i, i+2, i+4, ... of the stream" in two
    three = replace(plan_training(streamed, 2), stream_files=3).describe()
    assert ("process i of 2 reads all 3 file(s) of the stream and keeps 1 block in 2 of what it reads (blocks i, i+2, "
            "i+4, ... of the stream), as 3 file(s) do not split evenly among 2 processes; split data.train into a multiple "
            "of 2 files") in three
    six = replace(plan_training(load_recipe(RECIPE, overrides(ws, tmp_path / "o", **{"batch.micro": 1})), 4), stream_files=6)
    assert "process i of 4 reads files i mod 2, +2, ... (3 of 6) of the stream and keeps 1 block in 2" in six.describe()
    assert "one process reads all 4 file(s) of the stream, every block" in replace(plan_training(streamed, 1), stream_files=4).describe()
    prepared = load_recipe(RECIPE, tiny_overrides(ws.model, ws.held, ws.held, tmp_path / "p", ws.cache, **{"batch.micro": 2}))
    assert "prepared: tokenised and packed before step 1, once per machine" in plan_training(prepared, 2).describe()
    assert "process i of 2 reads micro batches i, i+2, ..." in plan_training(prepared, 2).describe()


def test_a_run_is_the_same_run_whatever_the_keys_its_way_of_reading_leaves_unused(ws, tmp_path):
    """Resuming compares run identities: a prepared run ignores the stream's keys, a streamed one eval_fraction."""
    prepared = tiny_overrides(ws.model, ws.held, ws.held, tmp_path / "p", ws.cache)
    identity = load_recipe(RECIPE, prepared).run_identity()
    assert load_recipe(RECIPE, [*prepared, "data.eval_blocks=9", "data.shuffle_buffer=7"]).run_identity() == identity
    assert load_recipe(RECIPE, [*prepared, "data.streaming=true"]).run_identity() != identity
    streamed = overrides(ws, tmp_path / "s")
    identity = load_recipe(RECIPE, streamed).run_identity()
    assert load_recipe(RECIPE, [*streamed, "data.eval_fraction=0.2"]).run_identity() == identity
    assert load_recipe(RECIPE, [*streamed, "data.reader_timeout=9"]).run_identity() == identity  # pacing only
    assert load_recipe(RECIPE, [*streamed, "data.eval_blocks=9"]).run_identity() != identity


# --- training from a stream -------------------------------------------------------------------------


def test_a_streamed_run_resumed_at_a_checkpoint_equals_an_uninterrupted_one_bit_for_bit(ws, tmp_path, caplog):
    # One small shard (~70 blocks; 8 held out): 6 steps of 16 blocks cross into the second epoch.
    small = str(ws.files[3])
    caplog.set_level(logging.INFO, logger="gqa.train")  # the run and its setup stages
    whole = run_recipe(RECIPE, overrides(ws, tmp_path / "whole", **{"data.train": small}))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:"))
    assert "streamed" in plan and "data ready    in " in plan and "one process reads all 1 file(s) of the stream" in plan
    assert whole.plan.data_seconds is not None

    out = tmp_path / "split"
    first = run_recipe(RECIPE, overrides(ws, out, **{"data.train": small, "budget.stop_at_step": 3}))
    assert not first.finished and sorted(first.losses) == [1, 2, 3]
    assert (out / "checkpoints" / "step-00000003" / "custom_checkpoint_0.pkl").is_file()  # the stream's position
    second = run_recipe(RECIPE, overrides(ws, out, **{"data.train": small}))
    assert second.finished and sorted(second.losses) == [4, 5, 6]

    assert {**first.losses, **second.losses} == whole.losses  # exactly: the same blocks in the same steps
    assert second.tokens_seen == whole.tokens_seen == 6 * 16 * 64
    assert second.final_eval == whole.final_eval
    expected, resumed = weights(tmp_path / "whole"), weights(out)
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def test_two_processes_match_one_and_resume_bit_for_bit(ws, tmp_path):
    """One torchrun launch, three runs: two processes uninterrupted, then stopped at step 3 and resumed."""
    common = {"batch.global_sequences": 8, "batch.micro": 2, "optimizer.lr": 3e-4, "data.reader_timeout": 20}
    dump = tmp_path / "dump"
    dump.mkdir()
    command = [*torchrun(), str(TESTS / "train_ddp_worker.py"),
               str(RECIPE), str(dump), *overrides(ws, tmp_path / "unused", **common),
               "@whole", f"output.dir={tmp_path / 'two'}",
               "@first", f"output.dir={tmp_path / 'split'}", "budget.stop_at_step=3",
               "@second", f"output.dir={tmp_path / 'split'}"]  # fmt: skip
    wait_done(launch(command, tmp_path / "log.txt"), tmp_path / "log.txt")

    def dumped(name: str, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
        record = json.loads((dump / f"{name}-rank{rank}.json").read_text())
        record["losses"] = {int(k): v for k, v in record["losses"].items()}
        return record, load_file(dump / f"{name}-rank{rank}.safetensors")

    (two, two_weights), (first, _), (second, resumed) = dumped("whole"), dumped("first"), dumped("second")
    assert two["processes"] == 2 and two["accumulation"] == 2
    assert "process i of 2 reads files i, i+2, ... of the stream's 4 (2 each)" in two["plan"]
    # Resumed with two processes: bit for bit the uninterrupted run.
    assert not first["finished"] and {**first["losses"], **second["losses"]} == two["losses"]
    assert all(torch.equal(two_weights[name], resumed[name]) for name in two_weights)
    assert all(torch.equal(two_weights[name], dumped("whole", 1)[1][name]) for name in two_weights)

    # One process, each global batch in one forward pass: the same blocks in every step.
    one = run_recipe(RECIPE, overrides(ws, tmp_path / "one", **{**common, "batch.micro": 8}))
    assert one.plan.processes == 1 and one.tokens_seen == two["tokens_seen"]
    for step, loss in one.losses.items():
        assert two["losses"][step] == pytest.approx(loss, abs=1e-5), step
    assert two["final_eval"]["loss"] == pytest.approx(one.final_eval["loss"], abs=1e-5)
    single = weights(tmp_path / "one")
    for name, tensor in single.items():
        torch.testing.assert_close(two_weights[name], tensor, atol=1e-5, rtol=0, msg=name)


# --- errors before training -------------------------------------------------------------------------


def expect_failure(ws, out: Path, pattern: str, **extra) -> None:
    with pytest.raises(GQAError, match=pattern):
        run_recipe(RECIPE, overrides(ws, out, **extra))
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_missing_file_split_or_dataset_fails_before_training(ws, tmp_path, monkeypatch):
    missing = ws.shards / "train-00009.parquet"
    expect_failure(ws, tmp_path / "a", r"data\.train: .*train-00009\.parquet does not exist",
                   **{"data.train": f"[{ws.files[0]}, {missing}]"})
    # A folder of shards: its split comes from the file names (train-*.parquet).
    expect_failure(ws, tmp_path / "b", r"data\.train: could not read split 'validation' \(data\.train_split\) of the "
                   r"folder .*shards: .*Available splits: \['train'\]", **{"data.train": ws.shards, "data.train_split": "validation"})
    expect_failure(ws, tmp_path / "c", r"data\.text_field='body' is not a column of .*train-00000\.parquet \(columns: text\)",
                   **{"data.text_field": "body"})
    expect_failure(ws, tmp_path / "d", r"data\.eval: .*nowhere\.txt does not exist", **{"data.eval": tmp_path / "nowhere.txt"})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once, as a missing dataset does
    expect_failure(ws, tmp_path / "e", r"data\.train: 'no-such-user/no-such-dataset' is not a local path and could not be "
                   r"loaded as a hub dataset \(config None, split train; data\.train_split\)",
                   **{"data.train": "no-such-user/no-such-dataset"})
    expect_failure(ws, tmp_path / "f", r"data\.eval_blocks=500 holds out the whole of .*train-00003\.parquet \(\d+ blocks "
                   r"of 64 tokens\), leaving nothing to train on", **{"data.train": ws.files[3], "data.eval_blocks": 500})
    # Four files in turn: 300 held-out blocks take 75 from each, more than the smallest file holds.
    expect_failure(ws, tmp_path / "g", r"data\.eval_blocks=300 holds out the whole of .*train-00003\.parquet \(\d+ blocks "
                   r"of 64 tokens; the stream takes its blocks from its 4 files in turn\)", **{"data.eval_blocks": 300})


def test_a_file_with_nothing_to_train_on_stops_the_run_with_its_name(ws, tmp_path):
    """A file stream that yields no block ends the endless stream: an error naming it, never a shorter run."""
    short = tmp_path / "short.parquet"
    datasets.Dataset.from_dict({"text": ["Too short to fill a block."]}).to_parquet(str(short))
    data = prepare_data(section(ws, train=[str(ws.files[3]), str(short)], eval=str(ws.held)), ws.tokenizer, ws.model, seed=0)
    loader = StreamLoader(data.train, 4, make_collate(64, 0), "cpu")
    with pytest.raises(GQAError, match=r"data\.train: .*short\.parquet yields no block of data\.block_size=64 tokens to "
                       r"train on; remove it from data\.train or lower data\.block_size"):
        list(loader)


def test_each_process_resumes_its_own_stream_position_and_only_under_the_process_count_that_wrote_it(ws):
    def loader(rank: int = 0, processes: int = 2, gather=lambda items: items) -> StreamLoader:
        share = prepare_data(section(ws, eval_blocks=8), ws.tokenizer, ws.model, seed=0, process_index=rank,
                             num_processes=processes).train  # fmt: skip
        return StreamLoader(share, 2, make_collate(64, 0), "cpu", gather=gather)

    running = [loader(0), loader(1)]
    batches = [iter(running[0]), iter(running[1])]
    for rank, count in ((0, 2), (1, 5)):  # the processes' positions differ; each reader has read ahead of them
        for _ in range(count):
            next(batches[rank])
    saved = loader(0, gather=lambda items: [items[0], running[1].position])
    saved.load_state_dict({"processes": 2, "loaders": [running[0].position, None]})
    state = saved.state_dict()
    assert state["processes"] == 2 and len(state["loaders"]) == 2
    with pytest.raises(GQAError, match=r"saved by 2 process\(es\) and this run has 1; .*resume with 2 process\(es\) "
                       r".*or start afresh with resume=never and a new output\.dir"):
        loader(0, 1).load_state_dict(state)
    # Each process restores its own position: the batches after the last one handed to training.
    for rank in (0, 1):
        resumed = loader(rank)
        resumed.load_state_dict(state)
        expected = [next(batches[rank])["input_ids"] for _ in range(3)]
        assert all(torch.equal(a["input_ids"], b) for a, b in zip(islice(resumed, 3), expected, strict=True))
        batches[rank].close()


def _stalling_reader(monkeypatch, batches, stalled: Path, after: int, once: bool = True) -> None:
    """Readers (the forked processes) of `batches` (StreamBatches.__iter__) that send `after` batches and then
    hang, writing their pid to `stalled`: the first one only, or (once False) every one."""
    trainer = os.getpid()

    def stalling(self):
        for i, batch in enumerate(batches(self)):
            if i == after and os.getpid() != trainer and not (once and stalled.exists()):
                stalled.write_text(str(os.getpid()))
                time.sleep(60)  # long enough: a reader not started again fails the test, slowly
            yield batch

    monkeypatch.setattr(stream.StreamBatches, "__iter__", stalling)
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.5)  # how long a stuck reader is given to end


def test_a_reader_that_hangs_is_started_again_from_its_position(ws, tmp_path, monkeypatch, caplog):
    """A reader that sends nothing for data.reader_timeout seconds is ended and started again from the last batch
    handed to training: the batches are those of a reader that never hung. Where it hangs every time, the run
    fails after READER_RESTARTS restarts, saying so."""

    def loader(timeout: float = 300) -> StreamLoader:
        share = prepare_data(section(ws, eval_blocks=8), ws.tokenizer, ws.model, seed=0).train
        return StreamLoader(share, 2, make_collate(64, 0), "cpu", reader_timeout=timeout)

    expected = [batch["input_ids"] for batch in islice(loader(), 12)]
    stalled, batches = tmp_path / "stalled", stream.StreamBatches.__iter__
    _stalling_reader(monkeypatch, batches, stalled, after=6)
    caplog.set_level(logging.WARNING, logger="gqa.train")
    got = [batch["input_ids"] for batch in islice(loader(timeout=1), 12)]
    assert stalled.exists(), "the reader did not hang: nothing was tested"
    assert len(got) == 12 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert any("sent no batch in 1 s; starting it again" in r.getMessage() for r in caplog.records)
    stuck = Path(f"/proc/{stalled.read_text()}/status")
    assert not stuck.exists() or "zombie" in stuck.read_text(), "the stuck reader was left running"

    monkeypatch.setattr(stream, "READER_RESTARTS", 1)
    _stalling_reader(monkeypatch, batches, stalled, after=0, once=False)
    with pytest.raises(GQAError, match=r"sent no batch in 1 s, 2 times in a row, .*raise data\.reader_timeout"):
        list(islice(loader(timeout=1), 3))


def test_a_parquet_file_streams_one_row_group_at_a_time_and_resumes_inside_its_row_group(ws, tmp_path, monkeypatch):
    documents = docs_text(TRAIN_MODULES[:3]).strip().split("\n\n")
    file = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), file, row_group_size=40)
    groups = math.ceil(len(documents) / 40)
    read = []
    read_row_group = pq.ParquetFile.read_row_group

    def recorded(self, group, *args, **kwargs):
        read.append(group)
        return read_row_group(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recorded)
    docs = sources.parquet_documents(str(file), "text", "data.train")
    assert [row["text"] for row in docs] == documents and read == list(range(groups)) and groups >= 4
    # Nothing is read ahead: the first document reads the first row group only, the 41st the second.
    read.clear()
    rows_read = iter(docs)
    assert next(rows_read)["text"] == documents[0] and read == [0]
    taken = [next(rows_read)["text"] for _ in range(99)]
    assert taken == documents[1:100] and read == [0, 1, 2]
    # A restored position reads again only the rest of its row group (the third), then goes on exactly.
    state = docs.state_dict()
    read.clear()
    resumed = sources.parquet_documents(str(file), "text", "data.train")
    resumed.load_state_dict(state)
    assert [row["text"] for row in resumed] == documents[100:] and read == list(range(2, groups))
    # Streamed training reads parquet this way, one stream per file, named by the file.
    monkeypatch.setattr(datasets, "load_dataset", None)  # not datasets' own parquet stream
    files = stream.stream_files(sources.resolve_sources(str(ws.shards), "data.train", "train", tmp_path), section(ws),
                                 ws.tokenizer, "data.train", tmp_path)  # fmt: skip
    assert [name for name, _ in files] == [str(f) for f in ws.files]


def test_a_hub_dataset_of_parquet_files_streams_them_with_its_split_and_revision(ws, tmp_path, monkeypatch):
    """Resolved with datasets' builder (the files of the split at the revision), then read as local parquet is."""
    asked = []

    def load_dataset_builder(path, name=None, **kwargs):
        asked.append((path, name, kwargs.get("revision")))
        return real_builder(str(ws.shards))  # a folder of train-*.parquet resolves as a hub repository does

    real_builder = datasets.load_dataset_builder
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    hub = stream.stream_files(sources.resolve_sources("someone/corpus@v1.2", "data.train", "train", tmp_path),
                               section(ws), ws.tokenizer, "data.train", tmp_path)  # fmt: skip
    local = stream.stream_files(sources.resolve_sources([str(f) for f in ws.files], "data.train", "train", tmp_path),
                                 section(ws), ws.tokenizer, "data.train", tmp_path)  # fmt: skip
    assert asked == [("someone/corpus", None, "v1.2")]
    assert [name for name, _ in hub] == [name for name, _ in local] == [str(f) for f in ws.files]
    assert all(rows(a, 1000) == rows(b, 1000) for (_, a), (_, b) in zip(hub, local, strict=True))
    with pytest.raises(GQAError, match=r"data\.train: 'someone/corpus' is not a local path and could not be loaded as a "
                       r"hub dataset \(config None, split validation, revision v1\.2; data\.train_split\): Available "
                       r"splits: \['train'\]"):
        stream.stream_files(sources.resolve_sources("someone/corpus@v1.2", "data.train", "validation", tmp_path),
                             section(ws), ws.tokenizer, "data.train", tmp_path)  # fmt: skip


def test_hub_sources_pin_a_revision_as_id_at_revision(ws, tmp_path, monkeypatch):
    (source,) = sources.resolve_sources("someone/corpus@v1.2", "data.train", "train", tmp_path)
    assert (source.kind, source.location, source.revision) == ("hub", "someone/corpus", "v1.2")
    with pytest.raises(GQAError, match=r"data\.train: 'someone/corpus@' is not a hub dataset id; write ID or ID@REVISION"):
        sources.resolve_sources("someone/corpus@", "data.train", "train", tmp_path)
    # The revision reaches datasets, prepared (load_dataset) and streamed (its builder), and a missing one is
    # a GQAError naming it.
    asked = []

    def load_dataset(*args, **kwargs):
        asked.append(kwargs.get("revision"))
        raise FileNotFoundError("Revision 'v1.2' does not exist")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset)
    for streaming in (True, False):
        with pytest.raises(GQAError, match=r"data\.train: 'someone/corpus' is not a local path and could not be loaded as a "
                           r"hub dataset \(config None, split train, revision v1\.2; data\.train_split\): Revision 'v1\.2' "):
            prepare_data(section(ws, train="someone/corpus@v1.2", streaming=streaming), ws.tokenizer, ws.model, seed=0)
    assert asked == ["v1.2", "v1.2"]
    # Cached blocks follow the revision.
    keys = {revision: blocks.cache_key(section(ws), sources.resolve_sources(f"someone/corpus{revision}", "data.train",
                                                                                "train", tmp_path), [], ws.tokenizer, ws.model, 0)
            for revision in ("", "@v1.2", "@v1.3")}  # fmt: skip
    assert len(set(keys.values())) == 3


def test_a_split_missing_from_a_saved_dataset_fails_before_training(ws, tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"]})}).save_to_disk(str(saved))
    expect_failure(ws, tmp_path / "a", r"data\.train_split='validation' is not a split of .*saved \(train\)",
                   **{"data.train": saved, "data.train_split": "validation"})
