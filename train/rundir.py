"""The output directory of a run: who owns it, where its checkpoints are, what to resume from.

    OUTPUT_DIR/
      .gqa.lock                 held (flock) by the run's main process while it runs: one run at a time
      gqa_run.json              the recipe, its identity, and the status of the run
      metrics.jsonl             one line per logged step and per evaluation
      logs/                     tracker files (tensorboard)
      checkpoints/step-00000100/  accelerate save_state + gqa_checkpoint.json (written last)
      checkpoints/.step-00000100.partial/  a checkpoint being written; renamed to step-00000100 once complete
      .final.partial/           the trained model being written; its files are moved up once all are written
      config.json, model*.safetensors, tokenizer, README.md, gqa_provenance.json   (the final model)
"""

from __future__ import annotations

import json
import logging
import re
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa.convert.diskspace import disk_full_is_an_error, remove
from gqa.convert.errors import GQAError
from gqa.convert.modeldir import write_text_atomic
from gqa.train.recipe import Recipe, flat_items

logger = logging.getLogger(__name__)

RUN_FILE = "gqa_run.json"
LOCK_FILE = ".gqa.lock"
FINAL_STAGING = ".final.partial"
CHECKPOINT_MARKER = "gqa_checkpoint.json"  # written after save_state finished: its presence means complete
SMALL_FILE_BYTES = 64 * 2**20  # torch/pickle files up to this size are loaded whole to check them
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    tokens_seen: int


def lock_path(output_dir: Path) -> Path:
    return output_dir / LOCK_FILE


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:08d}"


def read_checkpoint(path: Path) -> Checkpoint | None:
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        return None
    info = _marker_info(marker)
    if info is None:  # garbled on disk: known by its folder's name, and damaged (checkpoint_damage says so)
        named = re.fullmatch(r"step-(\d+)", path.name)
        return Checkpoint(path=path, step=int(named.group(1)), tokens_seen=0) if named else None
    return Checkpoint(path=path, step=info[0], tokens_seen=info[1])


def _marker_info(marker: Path) -> tuple[int, int] | None:
    """(step, tokens seen) from a checkpoint's marker, or None when it does not read."""
    try:
        info = json.loads(marker.read_text())
        return int(info["step"]), int(info["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    found = [read_checkpoint(p) for p in sorted(root.glob("step-*"))] if root.is_dir() else []
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def partial_path(output_dir: Path, step: int) -> Path:
    """Where a checkpoint is written before it is complete: a name complete_checkpoints never reads."""
    return checkpoints_dir(output_dir) / f".step-{step:08d}.partial"


def clear_partial(output_dir: Path) -> None:
    """Remove what an interrupted save or prune left: partial checkpoints, and step dirs without a marker."""
    root = checkpoints_dir(output_dir)
    leftovers = [*root.glob(".step-*.partial"), *(p for p in root.glob("step-*") if read_checkpoint(p) is None)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def final_staging_path(output_dir: Path) -> Path:
    """Where the trained model is written before it is complete: a hidden folder nothing reads as a model."""
    return output_dir / FINAL_STAGING


def move_final_model(staging: Path, output_dir: Path) -> None:
    """Move the staged model's files into output_dir, config.json last: a model directory without it is no
    model, so a process stopped among the renames leaves nothing that loads or looks finished."""
    files = sorted(staging.iterdir(), key=lambda p: (p.name == "config.json", p.name))
    for path in files:
        os.replace(path, output_dir / path.name)
    staging.rmdir()


def disk_full_stops_run(output_dir: Path, what: str, cleanup=None):
    """A context in which a full disk stops the run with a GQAError naming `what` and the checkpoint it resumes from."""
    return disk_full_is_an_error(output_dir, what, lambda: resume_note(output_dir), cleanup)


def disk_full_stops_checkpoint(output_dir: Path, step: int, partial: Path):
    """The context of writing checkpoint `step` into `partial`: a full disk removes the partial checkpoint."""
    return disk_full_stops_run(output_dir, f"checkpoint {checkpoint_path(output_dir, step)}", lambda: remove(partial))


def resume_note(output_dir: Path) -> str:
    """What a run stopped now continues from when it is started again: for the message that stops it."""
    found = complete_checkpoints(output_dir)
    if not found:
        return "no checkpoint was saved yet, so the run starts over"
    return f"it resumes from {found[-1].path} (step {found[-1].step}), which is intact"


def complete_checkpoint(partial: Path, step: int, tokens_seen: int) -> Path:
    """Mark a fully written checkpoint (the marker last) and move it to its step's name in one rename, so a
    process killed at any moment leaves either a complete checkpoint or none under that name."""
    write_text_atomic(partial / CHECKPOINT_MARKER, json.dumps({"step": step, "tokens_seen": tokens_seen}))
    path = checkpoint_path(partial.parent.parent, step)
    shutil.rmtree(path, ignore_errors=True)  # a leftover, or the same step of a run resumed from an older checkpoint
    os.replace(partial, path)
    return path


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        (old.path / CHECKPOINT_MARKER).unlink()  # first: a deletion cut short leaves no checkpoint that looks complete
        shutil.rmtree(old.path, ignore_errors=True)


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (the first damaged file and why), or None when each
    looks whole: its marker, safetensors headers against file sizes, torch zip archives' directories, small
    pickles loaded."""
    marker = path / CHECKPOINT_MARKER
    if _marker_info(marker) is None:
        try:
            json.loads(marker.read_text())
            why = "lacks its step or token count"
        except (OSError, ValueError) as err:
            why = f"does not read ({type(err).__name__}: {err})"
        return f"{marker} {why}"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            problem = _safetensors_damage(file)
        elif file.suffix in TORCH_SUFFIXES:
            problem = _torch_file_damage(file)
        else:
            continue
        if problem is not None:
            return f"{file} {problem}"
    return None


def _safetensors_damage(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes long, too short for a safetensors header"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return f"is cut short: its header alone needs {8 + header_len} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "has a header that is not valid JSON"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError):
        return "has a header without valid tensor offsets"
    if 8 + header_len + end != size:
        return f"is cut short: its header lists {8 + header_len + end} bytes, the file has {size}"
    return None


def _torch_file_damage(file: Path) -> str | None:
    size = file.stat().st_size
    if zipfile.is_zipfile(file):  # torch.save's format: a directory at the end lists every record
        try:
            with zipfile.ZipFile(file) as archive:
                for info in archive.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"is cut short: its record {info.filename} ends past the file's {size} bytes"
        except (zipfile.BadZipFile, OSError) as err:
            return f"is not a readable archive ({err})"
        if size > SMALL_FILE_BYTES:
            return None
    elif size > SMALL_FILE_BYTES:
        return f"is cut short or damaged: {size} bytes, and not the archive torch.save writes"
    import torch  # only here: the run directory's other readers need no torch

    try:
        torch.load(file, map_location="cpu", weights_only=False)  # this run's own file, as accelerate loads it
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes torch.load or pickle raise
        return f"does not load ({type(err).__name__}: {err})"
    return None


def newest_whole_checkpoint(output_dir: Path, before: int | None = None) -> Checkpoint | None:
    """The newest complete checkpoint (below step `before`, if given) whose files are whole; each damaged one
    passed over is named in a warning. None when there is no checkpoint; GQAError when all are damaged."""
    found = [c for c in complete_checkpoints(output_dir) if before is None or c.step < before]
    damaged = []
    for checkpoint in reversed(found):
        problem = checkpoint_damage(checkpoint.path)
        if problem is None:
            return checkpoint
        damaged.append(problem)
        logger.warning("checkpoint %s is damaged: %s; trying the one before it", checkpoint.path, problem)
    if damaged:
        raise no_whole_checkpoint(output_dir, damaged)
    return None


def no_whole_checkpoint(output_dir: Path, damaged: list[str]) -> GQAError:
    return GQAError(
        f"output.dir {output_dir} holds no checkpoint that can be resumed: {'; '.join(damaged)}. Restore the "
        f"damaged files from a copy, or delete the damaged checkpoints (all of {checkpoints_dir(output_dir)} "
        "to start the run over)"
    )


def resolve_start(recipe: Recipe) -> Checkpoint | None:
    """Check that output.dir is free for this run (or holds this very run); return the checkpoint to resume.

    Raises before anything heavy starts when the directory holds other files, a run of a different
    recipe, a finished run, or when `resume` names something that is not a checkpoint.
    """
    output_dir = Path(recipe.output.dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise GQAError(f"output.dir {output_dir} is a file; point output.dir at a directory")
    run_file = output_dir / RUN_FILE
    holds_files = output_dir.is_dir() and any(p.name != LOCK_FILE for p in output_dir.iterdir())
    if holds_files and not run_file.is_file():
        raise GQAError(
            f"output.dir {output_dir} already holds files that are not from `gqa train`; "
            "choose a new or empty output.dir"
        )
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError as err:  # garbled on disk
            raise GQAError(
                f"{run_file} does not read ({type(err).__name__}: {err}); it records which run output.dir holds and "
                "how far it got: restore it from a copy, or choose another output.dir"
            ) from None
        changed = _differences(previous.get("identity", {}), recipe.run_identity())
        if changed:
            raise GQAError(
                f"output.dir {output_dir} holds a different run: {'; '.join(changed)}. "
                "Choose another output.dir, or restore those keys to continue that run"
            )
        if previous.get("status") == "finished":
            raise GQAError(
                f"output.dir {output_dir} already holds the finished run of this recipe "
                f"({previous.get('steps')} steps); choose another output.dir to train again"
            )
    if recipe.resume == "never":
        if complete_checkpoints(output_dir):
            raise GQAError(
                f"resume=never, but output.dir {output_dir} holds checkpoints of this run; "
                "set resume=auto to continue it, or choose another output.dir"
            )
        return None
    if recipe.resume == "auto":
        return newest_whole_checkpoint(output_dir)
    checkpoint = read_checkpoint(Path(recipe.resume))
    if checkpoint is None:
        raise GQAError(
            f"resume={recipe.resume} is not a complete gqa checkpoint (no {CHECKPOINT_MARKER} inside); "
            f"use resume=auto, resume=never, or a path like {checkpoint_path(output_dir, 100)}"
        )
    problem = checkpoint_damage(checkpoint.path)
    if problem is not None:
        raise GQAError(
            f"resume={recipe.resume} is damaged: {problem}. Restore that file from a copy, or resume from "
            "another checkpoint (resume=auto takes the newest whole one)"
        )
    return checkpoint


def write_run_file(output_dir: Path, recipe: Recipe, recipe_file: str | None, **status: Any) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe_file": recipe_file,
        "recipe": recipe.model_dump(mode="json"),
        "identity": recipe.run_identity(),
        **status,
    }
    write_text_atomic(output_dir / RUN_FILE, json.dumps(record, indent=2))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old_flat, new_flat = flat_items(old), flat_items(new)
    keys = sorted(set(old_flat) | set(new_flat))
    return [f"{k} was {old_flat.get(k)!r}, now {new_flat.get(k)!r}" for k in keys if old_flat.get(k) != new_flat.get(k)]
