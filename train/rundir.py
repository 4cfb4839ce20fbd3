"""The output directory of a run: who owns it, where its checkpoints are, what to resume from.

    OUTPUT_DIR/
      .gqa.lock                 held (flock) by the run's main process while it runs: one run at a time
      gqa_run.json              the recipe, its identity, and the status of the run
      metrics.jsonl             one line per logged step and per evaluation
      logs/                     tracker files (tensorboard)
      checkpoints/step-00000100/  accelerate save_state + gqa_checkpoint.json (written last)
      checkpoints/.step-00000100.partial/  a checkpoint being written; renamed to step-00000100 once complete
      config.json, model*.safetensors, tokenizer, README.md, gqa_provenance.json   (the final model)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa.convert.errors import GQAError
from gqa.convert.modeldir import write_text_atomic
from gqa.train.recipe import Recipe, flat_items

RUN_FILE = "gqa_run.json"
LOCK_FILE = ".gqa.lock"
CHECKPOINT_MARKER = "gqa_checkpoint.json"  # written after save_state finished: its presence means complete


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
    info = json.loads(marker.read_text())
    return Checkpoint(path=path, step=int(info["step"]), tokens_seen=int(info["tokens_seen"]))


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
        previous = json.loads(run_file.read_text())
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
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    checkpoint = read_checkpoint(Path(recipe.resume))
    if checkpoint is None:
        raise GQAError(
            f"resume={recipe.resume} is not a complete gqa checkpoint (no {CHECKPOINT_MARKER} inside); "
            f"use resume=auto, resume=never, or a path like {checkpoint_path(output_dir, 100)}"
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
