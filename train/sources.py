"""What data.train and data.eval name, resolved into sources (files, globs, folders of shards, saved datasets,
the shipped corpus, hub datasets), and their documents read as one "text" column, with the errors a user meets
when a source cannot be read."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec
import pyarrow.parquet as pq

from gqa.convert.errors import GQAError
from gqa.convert import corpus
from gqa.train.recipe import DataSection

STDLIB_SOURCE = corpus.NAME
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """One entry of data.train / data.eval, resolved."""

    kind: str  # stdlib | text | json | parquet | saved | folder | hub
    location: str  # a path, a hub id, or a stdlib-docs split
    split: str  # split used for saved DatasetDicts, folders of data files and hub datasets
    builder: str = ""  # folder: the datasets builder of its files (text, json, parquet)
    revision: str | None = None  # hub: the branch, tag or commit given as id@revision; None: the default branch


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


def load_documents(sources: list[Source], data: DataSection, key: str, cache_root: Path) -> datasets.Dataset:
    parts = [text_column(load_source(source, data, key, cache_root), source, data, key) for source in sources]
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(has_text, batched=True, desc="dropping empty")
    if len(docs) == 0:
        where = ", ".join(s.location for s in sources)
        raise GQAError(f"{key} holds no text: {where} has no non-empty {data.text_field!r} field; point {key} at real data")
    return docs


def text_column(part, source: Source, data: DataSection, key: str):
    """A source's documents as one column, "text" (a Dataset or an IterableDataset)."""
    columns = part.column_names
    if columns is None:  # a stream that does not declare its columns: its first row does
        columns = list(first_row(part, source.location, key) or {})
    check_text_field(data.text_field, columns, source.location)
    part = part.select_columns([data.text_field])
    if data.text_field != "text":
        part = part.rename_column(data.text_field, "text")
    return part


def check_text_field(field: str, columns: Sequence[str], where: str) -> None:
    if field not in columns:
        raise GQAError(f"data.text_field={field!r} is not a column of {where} (columns: {', '.join(columns)}); set data.text_field")


def has_text(batch: dict[str, list]) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in batch["text"]]


def first_row(part: datasets.IterableDataset, where: str, key: str) -> dict | None:
    """Read a stream's first row now, so that an unreadable source fails before training starts."""
    try:
        return next(iter(part), None)
    except Exception as err:  # malformed files surface as assorted pyarrow/datasets errors
        raise GQAError(f"{key}: could not read {where}: {err}") from err


def load_source(source: Source, data: DataSection, key: str, cache_root: Path, streaming: bool = False):
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
            raise GQAError(f"{unreadable(source, data, key)}: {err}") from err
    try:  # hub dataset
        return datasets.load_dataset(source.location, data.hub_config, split=source.split, streaming=streaming, revision=source.revision)
    except Exception as err:  # network, auth, missing config, split or revision: all say the same to the user
        raise GQAError(f"{unreadable(source, data, key)}: {err}") from err


def _split_key(key: str) -> str:
    return "data.eval_split" if key == "data.eval" else "data.train_split"


def unreadable(source: Source, data: DataSection, key: str) -> str:
    """The start of the error for a folder's split or a hub dataset that cannot be read."""
    if source.kind == "folder":
        return f"{key}: could not read split {source.split!r} ({_split_key(key)}) of the folder {source.location}"
    revision = f", revision {source.revision}" if source.revision else ""
    return (f"{key}: {source.location!r} is not a local path and could not be loaded as a hub dataset "
            f"(config {data.hub_config}, split {source.split}{revision}; {_split_key(key)})")  # fmt: skip


def parquet_files(source: Source, data: DataSection, key: str) -> list[str] | None:
    """The parquet files a streamed source is made of, in order; None for a source of other files."""
    if source.kind == "parquet":
        return [source.location]
    if source.kind == "folder" and source.builder == "parquet":
        builder = datasets.load_dataset_builder("parquet", data_dir=source.location)
    elif source.kind == "hub":
        try:
            builder = datasets.load_dataset_builder(source.location, data.hub_config, revision=source.revision)
        except Exception as err:  # network, auth, missing config or revision: all say the same to the user
            raise GQAError(f"{unreadable(source, data, key)}: {err}") from err
        if builder.name != "parquet":
            return None
    else:
        return None
    splits = builder.config.data_files or {}
    if source.split not in splits:
        raise GQAError(f"{unreadable(source, data, key)}: Available splits: {sorted(str(name) for name in splits)}")
    return list(splits[source.split])


def parquet_documents(file: str, field: str, key: str) -> datasets.IterableDataset:
    """A parquet file's `field` column as a stream of documents ("text"), read one row group at a time by one
    thread: memory holds one row group whatever the size of the file (datasets' parquet stream lets arrow read
    up to about 1 GiB of a file ahead, for every file a process has open). Each row group is a datasets shard,
    so a restored position reads again only the rest of its row group."""
    try:
        with fsspec.open(file, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except Exception as err:  # a missing or unreadable file: assorted fsspec/pyarrow errors
        raise GQAError(f"{key}: could not read {file}: {err}") from err
    check_text_field(field, metadata.schema.to_arrow_schema().names, file)
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


def source_fingerprint(source: Source) -> list:
    if source.kind == "stdlib":
        return [source.kind, source.location, corpus.corpus_tag()]
    if source.kind == "hub":  # unpinned, the branch may move: pin id@revision for a cache that follows the data
        return [source.kind, source.location, source.split, source.revision]
    path = Path(source.location)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [source.kind, source.location, source.split, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
