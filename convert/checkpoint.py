"""Where a checkpoint's tensors are, without loading them.

`resolve_source` turns a local directory, a hub id or a .gguf file into a local directory;
`CheckpointIndex` maps every tensor name to its file, dtype and shape, and reads one tensor at a
time. Safetensors files are opened per read and closed again, so memory-mapped pages never pile
up in the resident set, and the source's pages behind the read position are handed back to the
kernel; a `pytorch_model*.bin` shard is loaded (memory-mapped) one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gqa.convert.errors import GQAError

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
RELEASE_LAG_BYTES = 256 * 2**20  # source pages this far behind the read position are released
RELEASE_STEP_BYTES = 64 * 2**20  # in steps of this much
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class Source:
    """A checkpoint resolved to a local directory, with what the user called it."""

    path: Path
    id: str
    kind: str  # "local", "hub" or "gguf"
    hub_id: str | None = None


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    position: int  # order inside the file, to read files front to back
    offset: int | None = None  # byte offset of the data in a safetensors file


def resolve_source(source: str, scratch: Path, config_only: bool = False) -> Source:
    """A local directory, a `.gguf` file (dequantised into `scratch`), or a hub id (downloaded).
    With `config_only`, only config.json is fetched or extracted (for `gqa inspect`)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GQAError(f"GGUF file {path} does not exist.")
        if config_only:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(scratch / "gguf-config")
            return Source(scratch / "gguf-config", id=path.name, kind="gguf")
        return Source(dequantise_gguf(path, scratch), id=path.name, kind="gguf")
    if path.is_dir():
        return Source(path.resolve(), id=str(path), kind="local")
    if path.exists():
        raise GQAError(f"{path} is a file; give a model directory, a .gguf file or a hub id.")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return Source(download_from_hub(source, config_only), id=source, kind="hub", hub_id=source)
    raise GQAError(f"{source} is neither a local model directory, a .gguf file nor a hub id (owner/name).")


def download_from_hub(repo_id: str, config_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json"] if config_only else ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise GQAError(
            f"could not download {repo_id} from the Hugging Face hub ({type(err).__name__}: {err}). Check the id, "
            "your network and your token (huggingface-cli login), or pass a local directory."
        ) from err


def dequantise_gguf(gguf_file: Path, scratch: Path) -> Path:
    """Dequantise a GGUF file into a plain safetensors checkpoint with transformers' GGUF support.

    This loads the whole (dequantised) model in memory once: GGUF checkpoints are small models.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise GQAError("reading GGUF needs transformers") from err
    out = scratch / "gguf-dequantised"
    log.info("dequantising %s (the whole model is loaded once; GGUF models are small)", gguf_file.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except ImportError as err:
        raise GQAError(f"reading GGUF needs the `gguf` package: pip install gguf ({err})") from err
    except (ValueError, OSError, KeyError) as err:
        raise GQAError(f"could not read {gguf_file} as a GGUF model: {err}") from err
    # The weights are plain tensors now: saving them must not carry the GGUF quantisation config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class CheckpointIndex:
    """Tensor name -> file, dtype, shape, for safetensors (single or sharded) or PyTorch .bin files."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self.files = self._weight_files()
        for file in self.files:
            self._index_file(file)
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._released: dict[Path, int] = {}

    def _weight_files(self) -> list[Path]:
        d = self.model_dir
        for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise GQAError(f"{index} is not a valid weight index ({err}).") from err
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (d / f).is_file()]
                if missing:
                    raise GQAError(f"{index} lists shard(s) that are missing: {', '.join(missing)}.")
                return [d / f for f in files]
            if (d / single).is_file():
                return [d / single]
        found = sorted(p.name for p in d.iterdir())
        raise GQAError(
            f"no weights in {d}: expected model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or "
            f"{BIN_INDEX}. Found: {', '.join(found) or 'nothing'}."
        )

    def _index_file(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            entries = read_safetensors_header(file)
        else:
            state = self._load_bin(file)
            entries = {n: (t.dtype, tuple(t.shape), i, None) for i, (n, t) in enumerate(state.items())}
        for name, (dtype, shape, position, offset) in entries.items():
            if name in self.tensors:
                raise GQAError(f"tensor {name} appears in both {self.tensors[name].file.name} and {file.name}.")
            self.tensors[name] = TensorInfo(file, dtype, shape, position, offset)

    @staticmethod
    def _load_bin(file: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many kinds for a bad pickle
            raise GQAError(f"could not read {file} as a PyTorch checkpoint: {err}") from err

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names_in_file_order(self) -> list[str]:
        """Names sorted by file, then by position in the file, so reads move front to back."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (order[self.tensors[n].file], self.tensors[n].position))

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            self._release_behind(info)
            try:
                with safe_open(info.file, framework="pt") as f:
                    return f.get_tensor(name)
            except SafetensorError as err:
                raise GQAError(f"could not read tensor {name} from {info.file}: {err}") from err
        if self._bin_cache is None or self._bin_cache[0] != info.file:
            self._bin_cache = (info.file, self._load_bin(info.file))  # one .bin shard held at a time
        return self._bin_cache[1][name]

    def _release_behind(self, info: TensorInfo) -> None:
        """Tell the kernel that the source's pages well behind this read will not be read again.

        Conversion reads each byte once, front to back. Left cached, the source fills the page cache
        beside the output's pages, and once memory runs short the kernel spends more CPU reclaiming
        than copying (a 13.5 GB `cp -r` on a 24 GiB machine: 43 s of system time, against 3 s for
        one 5 GB shard). The kernel leaves pages that are still mapped (tensors in use) alone."""
        behind = info.offset - RELEASE_LAG_BYTES
        if behind - self._released.get(info.file, 0) < RELEASE_STEP_BYTES or not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(info.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, behind, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self._released[info.file] = behind

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def read_safetensors_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, position in the file, byte offset of its data), validated by the
    safetensors library, which refuses a header that does not cover the file exactly: a truncated
    download is caught here, before anything is written. Because the data is then known to be
    packed, each tensor's byte offset is the header's end plus the sizes of the tensors before it."""
    try:
        with safe_open(file, framework="pt") as f:
            entries = {}
            with open(file, "rb") as raw:
                offset = 8 + int.from_bytes(raw.read(8), "little")
            for position, name in enumerate(f.offset_keys()):
                piece = f.get_slice(name)
                dtype, shape = SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape())
                entries[name] = (dtype, shape, position, offset)
                offset += math.prod(shape) * dtype.itemsize
            return entries
    except SafetensorError as err:
        raise GQAError(
            f"{file} is not a valid safetensors file ({err}); it may be truncated or corrupt. Download it again."
        ) from err


def directory_is_inside(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents
