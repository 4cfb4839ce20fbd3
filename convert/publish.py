"""`gqa publish`: check a model directory, write its card, and upload it to the Hugging Face hub.

    gqa publish DIR --repo user/name [--private] [--dry-run] [--keep-card] [--redact]

Nothing leaves the machine until every check passes:
- weights: config.json loads; model.safetensors.index.json and the shards agree (every listed shard
  exists and holds exactly the tensors the index puts in it; no stray shard), or one model.safetensors;
- the model builds from config.json on the meta device (no memory, no weights) and every tensor it
  expects is in the checkpoint with the shape it expects, and no other;
- the provenance file agrees with config.json (KV heads, query heads, model type, groups per layer);
- the model card's claims (front matter, KV-head counts, method) agree with the provenance file;
- no text file to upload holds an absolute local path, the home directory, the user name or a token
  from the environment (`--redact` rewrites them: paths to their names, tokens to <redacted>).

The card is regenerated from config.json and gqa_provenance.json (`--keep-card` uploads the README.md
that is there instead, after checking it). The token comes from huggingface_hub's usual places
(HF_TOKEN, or the file `hf auth login` writes); it is handed to the client and never printed or written.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig

from gqa.convert import __version__
from gqa.convert.card import card_problems, render_card
from gqa.convert.errors import GQAError
from gqa.convert.kvcache import kv_heads_of
from gqa.convert.sizes import human_bytes
from gqa.convert.modeldir import (
    CARD_FILE,
    CONFIG_FILE,
    PROVENANCE_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    meta_tensors,
    read_provenance,
    read_safetensors_header,
    tokenizer_files,
    write_provenance,
    write_text_atomic,
)
from gqa.convert.private import environment_secrets, find_private, is_text_file, read_text, redact_text

logger = logging.getLogger(__name__)

# Training leftovers that never belong on the hub. Only top-level files are uploaded at all:
# checkpoint-*/, runs/ (tensorboard) and other folders stay home. gqa_run.json is gqa train's run state
# (the recipe with its local paths, for resuming); gqa_provenance.json is the public record of the run.
NOT_UPLOADED = ("*.pt", "*.pth", "*.bin", "*.tmp*", "optimizer*", "scheduler*", "rng_state*",
                "trainer_state.json", "training_args*", "gqa_run.json", ".*")


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- checks


def read_checkpoint_shapes(model_dir: Path, report: CheckReport) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read), checking index vs shards."""
    on_disk = sorted(p.name for p in model_dir.glob("*.safetensors"))
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            report.problems.append(f"{SAFETENSORS_INDEX} is not a safetensors index with a weight_map ({err})")
            return {}
        listed = sorted(set(weight_map.values()))
        for stray in sorted(set(on_disk) - set(listed)):
            report.problems.append(f"{stray} is not listed in {SAFETENSORS_INDEX}: a stale shard? remove it or re-save the model")
    elif (model_dir / SAFETENSORS_FILE).is_file():
        weight_map, listed = None, [SAFETENSORS_FILE]
        for stray in sorted(set(on_disk) - {SAFETENSORS_FILE}):
            report.problems.append(f"{stray} sits beside {SAFETENSORS_FILE} without an index: remove it or re-save the model")
    else:
        report.problems.append(
            f"no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) in {model_dir}; "
            "save the model with save_pretrained (gqa convert and gqa train write them)"
        )
        return {}

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in listed:
        path = model_dir / shard
        if not path.is_file():
            report.problems.append(f"shard {shard} is listed in {SAFETENSORS_INDEX} but missing; copy it back or re-save the model")
            continue
        try:
            header = read_safetensors_header(path)
        except GQAError as err:
            report.problems.append(f"shard {shard} is unreadable: {err}")
            continue
        names = set(header)
        shapes.update({name: shape for name, (_, shape, _, _) in header.items()})
        if weight_map is not None:
            expected = {name for name, file in weight_map.items() if file == shard}
            if missing := sorted(expected - names):
                report.problems.append(f"{SAFETENSORS_INDEX} puts {len(missing)} tensors in {shard} that it lacks, e.g. {missing[0]}")
            if extra := sorted(names - expected):
                report.problems.append(f"{shard} holds {len(extra)} tensors {SAFETENSORS_INDEX} does not list, e.g. {extra[0]}")
    return shapes


def check_against_meta_model(config, shapes: dict[str, tuple[int, ...]], report: CheckReport) -> None:
    """Build the model from its config on the meta device and compare its tensors with the checkpoint's."""
    try:
        model = meta_tensors(config, shapes)
    except Exception as err:  # noqa: BLE001 - any failure here means the hub's users could not load it either
        report.problems.append(f"the model does not build from config.json ({type(err).__name__}: {err})")
        return
    # Tied weights are one tensor under several names; the checkpoint needs only one of them.
    names_of: dict[str, list[str]] = {}
    for name in model.shapes:
        names_of.setdefault(model.tied.get(name, name), []).append(name)
    for names in names_of.values():
        if not any(n in shapes for n in names):
            report.problems.append(f"the checkpoint lacks {names[0]} ({len(names)} name(s)), which the model expects")
    ignored = [re.compile(p) for p in model.ignored]
    unexpected = [n for n in shapes if n not in model.shapes and not any(p.search(n) for p in ignored)]
    if unexpected:
        report.problems.append(f"the checkpoint holds {len(unexpected)} tensors the model does not use, e.g. {unexpected[0]}")
    for name in sorted(set(shapes) & set(model.shapes)):
        if shapes[name] != model.shapes[name]:
            report.problems.append(
                f"{name} has shape {list(shapes[name])} in the checkpoint but config.json implies {list(model.shapes[name])}"
            )


def check_provenance(config, provenance: dict[str, Any] | None, report: CheckReport) -> None:
    """The provenance file must describe the model config.json describes."""
    if provenance is None:
        report.problems.append("no gqa_provenance.json: this directory was not written by gqa convert or gqa train")
        return
    source = provenance.get("source") or {}
    conversion = provenance.get("conversion") or {}
    kv_heads = kv_heads_of(config)
    pairs = [
        ("conversion.kv_heads", conversion.get("kv_heads"), "num_key_value_heads", kv_heads),
        ("source.num_attention_heads", source.get("num_attention_heads"), "num_attention_heads", config.num_attention_heads),
    ]
    # A conversion that changes the architecture (GPT-2 to gpt_bigcode) records the model_type it wrote.
    if conversion.get("model_type"):
        pairs.append(("conversion.model_type", conversion["model_type"], "model_type", config.model_type))
    else:
        pairs.append(("source.model_type", source.get("model_type"), "model_type", config.model_type))
    for prov_key, prov_value, config_key, config_value in pairs:
        if prov_value is not None and prov_value != config_value:
            report.problems.append(
                f"gqa_provenance.json {prov_key} is {prov_value!r} but config.json {config_key} is {config_value!r}: "
                "the weights or the config were changed after conversion; re-run gqa convert"
            )
    groups = conversion.get("groups")
    if groups is None:
        return
    layers = config.num_hidden_layers
    if len(groups) != layers:
        report.problems.append(f"gqa_provenance.json lists groups for {len(groups)} layers; config.json has {layers}")
        return
    src_kv = source.get("num_key_value_heads")
    for layer, layer_groups in enumerate(groups):
        if not isinstance(layer_groups, list) or not all(
            isinstance(g, list) and all(isinstance(h, int) for h in g) for g in layer_groups
        ):
            report.problems.append(f"gqa_provenance.json groups of layer {layer} ({layer_groups!r}) are not lists of KV heads")
            break
        members = sorted(h for g in layer_groups for h in g)
        if len(layer_groups) != kv_heads or (src_kv is not None and members != list(range(src_kv))):
            report.problems.append(
                f"gqa_provenance.json groups of layer {layer} ({layer_groups}) are not {kv_heads} groups "
                f"covering the source's {src_kv} KV heads"
            )
            break


def check_model_dir(model_dir: str | Path) -> tuple[Any, dict[str, Any] | None, CheckReport]:
    """Every check that does not need the card: (config, provenance, report)."""
    model_dir = Path(model_dir)
    report = CheckReport()
    if not (model_dir / CONFIG_FILE).is_file():
        raise GQAError(f"{model_dir} has no config.json: pass the directory gqa convert or gqa train wrote")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as err:
        raise GQAError(f"{model_dir}/config.json does not load ({err}); fix or regenerate it") from err
    shapes = read_checkpoint_shapes(model_dir, report)
    if shapes:
        check_against_meta_model(config, shapes, report)
    provenance = read_provenance(model_dir)
    check_provenance(config, provenance, report)
    if provenance is not None and not (provenance.get("source") or {}).get("hub_id"):
        report.warnings.append("the source has no hub id, so the card names no base_model")
    if not tokenizer_files(model_dir):
        report.warnings.append("no tokenizer files: users will need the source's tokenizer to run the model")
    return config, provenance, report


def files_to_upload(model_dir: str | Path) -> list[Path]:
    """The top-level files of the directory, minus training leftovers (see NOT_UPLOADED)."""
    return sorted(p for p in Path(model_dir).iterdir()
                  if p.is_file() and not any(fnmatch(p.name, pattern) for pattern in NOT_UPLOADED))


# --------------------------------------------------------------------------------------------- API


def publish(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    keep_card: bool = False,
    redact: bool = False,
    api: Any = None,
) -> dict[str, Any]:
    """Check `model_dir`, write its card, and (unless dry_run) create `repo_id` and upload.

    `api` is the hub client (an HfApi by default, made with the token from get_token()); tests pass a
    stand-in with the same create_repo/upload_folder methods. Returns what was (or would be) uploaded.
    Raises GQAError, having uploaded nothing, when a check fails, or when a file to upload holds a local
    path, the home directory, the user name or a token; with `redact` those are rewritten in the files
    first (see gqa.convert.private) and the files checked again.
    """
    model_dir = Path(model_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise GQAError(f"--repo {repo_id!r} is not a valid repository id ({err}); use user/name") from err
    if not model_dir.is_dir():
        raise GQAError(f"{model_dir} is not a directory: pass the model directory gqa convert or gqa train wrote")
    card_path, warnings = _check_and_write_card(model_dir, repo_id, keep_card)
    _check_nothing_private(model_dir, repo_id, files_to_upload(model_dir), redact, keep_card)
    files = files_to_upload(model_dir)  # after any redaction, so the sizes are those uploaded
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "private": private,
        "dry_run": dry_run,
        "card": str(card_path),
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files],
        "total_bytes": sum(p.stat().st_size for p in files),
        "warnings": warnings,
    }
    if not dry_run:
        result.update(_upload(model_dir, repo_id, private, files, api))
    return result


def _check_and_write_card(model_dir: Path, repo_id: str, keep_card: bool) -> tuple[Path, list[str]]:
    """Every check, the card's claims included; the card is (re)written only when all pass."""
    config, provenance, report = check_model_dir(model_dir)
    card_path = model_dir / CARD_FILE
    config_dict = json.loads((model_dir / CONFIG_FILE).read_text())
    if keep_card:
        if not card_path.is_file():
            report.problems.append("--keep-card: there is no README.md to keep; drop --keep-card to generate one")
            card = None
        else:
            card = card_path.read_text()
    else:
        card = render_card(config_dict, provenance or {}, repo_id)
    if card is not None and provenance is not None:
        report.problems += card_problems(card, config_dict, provenance)
    if report.problems:
        raise GQAError(
            f"{model_dir} is not ready to publish; nothing was uploaded:\n  - " + "\n  - ".join(report.problems)
        )
    for warning in report.warnings:
        logger.warning(warning)
    if not keep_card:
        write_text_atomic(card_path, card)
    return card_path, report.warnings


def private_findings(files: list[Path], secrets: dict[str, str] | None = None) -> list[str]:
    """What in the text files among `files` must not leave the machine, as 'file:line: what'."""
    secrets = environment_secrets() if secrets is None else secrets
    found: list[str] = []
    for path in files:
        text = read_text(path) if is_text_file(path) else None
        if text is not None:
            found += [str(f) for f in find_private(text, path.name, secrets)]
    return found


def redact_files(model_dir: Path, repo_id: str, files: list[Path], keep_card: bool, secrets: dict[str, str]) -> None:
    """Rewrite the text files among `files` without local paths, home, user name or tokens; the card is
    regenerated from the redacted provenance (unless keep_card: then its text is redacted like the rest)."""
    provenance_path = model_dir / PROVENANCE_FILE
    if provenance_path.is_file():
        write_provenance(model_dir, json.loads(redact_text(provenance_path.read_text(), secrets)))
    for path in files:
        if path.name in (PROVENANCE_FILE, CARD_FILE) or not is_text_file(path):
            continue
        text = read_text(path)
        if text is not None and (clean := redact_text(text, secrets)) != text:
            write_text_atomic(path, clean)
    card_path = model_dir / CARD_FILE
    if keep_card and card_path.is_file():
        write_text_atomic(card_path, redact_text(card_path.read_text(), secrets))
    elif not keep_card:
        config_dict = json.loads((model_dir / CONFIG_FILE).read_text())
        write_text_atomic(card_path, render_card(config_dict, read_provenance(model_dir) or {}, repo_id))


def _check_nothing_private(model_dir: Path, repo_id: str, files: list[Path], redact: bool, keep_card: bool) -> None:
    secrets = environment_secrets()
    found = private_findings(files, secrets)
    if found and redact:
        redact_files(model_dir, repo_id, files, keep_card, secrets)
        found = private_findings(files_to_upload(model_dir), secrets)
    if found:
        what = "still holds" if redact else "holds"
        hint = "remove them by hand" if redact else "pass --redact to rewrite them (paths to names, tokens to <redacted>)"
        raise GQAError(
            f"{model_dir} {what} what must not leave this machine; nothing was uploaded ({hint}):\n  - "
            + "\n  - ".join(found)
        )


def _upload(model_dir: Path, repo_id: str, private: bool, files: list[Path], api: Any) -> dict[str, Any]:
    if api is None:
        token = get_token()
        if not token:
            raise GQAError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then publish again")
        api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(model_dir),
            # Exact names (escaped: fnmatch would read [ ] as a pattern) so nothing else in DIR goes up.
            allow_patterns=[glob.escape(p.name) for p in files],
            # Shards from an earlier upload with another shard count must not linger beside the new ones.
            delete_patterns=["*.safetensors", SAFETENSORS_INDEX],
            commit_message=f"Upload {model_dir.name} with gqa {__version__}",
        )
    except HfHubHTTPError as err:
        raise GQAError(f"the hub refused the upload to {repo_id} ({err}); check the token's write access and the repo name") from err
    return {"url": str(url), "commit_url": getattr(commit, "commit_url", None)}


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, name: str = "publish") -> None:
    parser.add_argument("model_dir", metavar="DIR", help="model directory written by gqa convert or gqa train")
    parser.add_argument("--repo", required=True, metavar="USER/NAME", help="hub repository to create or update")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the checks, write the card, list what would be uploaded; contact nothing")
    parser.add_argument("--keep-card", action="store_true",
                        help="upload the README.md in DIR as it is (after checking its claims) instead of regenerating it")
    parser.add_argument("--redact", action="store_true",
                        help="rewrite local paths (to their names), the home directory, the user name and tokens "
                        "(to <redacted>) in the files to upload, in DIR itself (with --dry-run too), instead of refusing to publish them")


def run(args: argparse.Namespace) -> int:
    result = publish(args.model_dir, args.repo, private=args.private, dry_run=args.dry_run, keep_card=args.keep_card,
                     redact=args.redact)
    # Warnings were already logged by publish(); the CLI's logging prints them.
    print(f"checks passed; model card: {result['card']}")
    verb = "would upload" if result["dry_run"] else "uploaded"
    visibility = "private" if result["private"] else "public"
    print(f"{verb} {len(result['files'])} files ({human_bytes(result['total_bytes'])}) to {visibility} repo {result['repo_id']}:")
    for f in result["files"]:
        print(f"  {f['name']:<40} {human_bytes(f['bytes']):>12}")
    if not result["dry_run"]:
        print(f"done: {result['url']}")
    return 0
