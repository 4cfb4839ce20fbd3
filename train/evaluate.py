"""`gqa eval`: what a conversion gained and lost, measured against a baseline.

    gqa eval MODEL [--baseline SOURCE] [--data FILE...] [--tasks NAME,...] [--seq-len 1024] [--report DIR]

Quality: perplexity on held-out text for MODEL and the baseline (cut and scored under one of two
conventions, gqa.train.heldout), agreement with the baseline on the same windows (top-1 next-token
agreement, mean KL(baseline || model) per token), and downstream task scores from lm-evaluation-harness
with the same settings for both (gqa.train.tasks).
Cost: KV-cache bytes per token from the config, checked against the cache `generate` allocates, and
greedy decode speed with a KV cache at several context lengths, with peak memory.

`evaluate()` is the Python API: it returns the results and prints nothing; `run()` is the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert import __version__
from gqa.convert.card import write_model_card
from gqa.convert.modeldir import (
    CARD_FILE,
    CONFIG_FILE,
    config_dtype,
    dtype_name,
    from_pretrained_args,
    read_provenance,
    write_provenance,
)
from gqa.convert.modeldir import DTYPES as DTYPE_BY_NAME
from gqa.convert.errors import GQAError
from gqa.convert.kvcache import kv_heads_of
from gqa.convert.sizes import human_bytes
from gqa.train import report
from gqa.train.decode import greedy, measure_decode, measure_kv_cache, prompt_of
from gqa.train.heldout import CONVENTIONS, held_out, read_documents, score_windows
from gqa.train.heldout import describe as describe_held_out
from gqa.train.tasks import DEFAULT_SEED, TaskSettings, compare, parse_task_list, run_tasks, task_manager

logger = logging.getLogger(__name__)

DTYPES = {name: DTYPE_BY_NAME[name] for name in ("float32", "bfloat16", "float16")}  # --dtype's choices
# Decode contexts: long ones where memory bandwidth shows; on CPU short enough that a 135M model
# (two models, prefill included) finishes in a few minutes on two cores.
DEFAULT_CONTEXTS = {"cuda": (512, 2048, 8192), "cpu": (512, 1024, 2048)}
DEFAULT_NEW_TOKENS = 32


# -------------------------------------------------------------------------------------------- models


def _name(source: str | Path) -> str:
    path = Path(source)
    return path.name if path.exists() else str(source)


def load_model(source: str | Path, device: torch.device, dtype: torch.dtype, role: str):
    where, extra = from_pretrained_args(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise GQAError(
            f"could not load the {role} {source!r} ({err}); pass a local model directory "
            "(config.json + weights), a .gguf file, or a reachable Hugging Face hub id"
        ) from err
    return model.to(device).eval()


def load_tokenizer(model: str | Path, tokenizer_source: str | Path | None):
    source = tokenizer_source or model
    where, extra = from_pretrained_args(source)
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, TypeError) as err:
        hint = (
            "copy the source model's tokenizer files into it (gqa convert does this) or pass --tokenizer"
            if tokenizer_source is None
            else "pass a directory or hub id that holds a tokenizer"
        )
        raise GQAError(f"no usable tokenizer in {source} ({err}); {hint}") from err


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------- API


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, model_dir: str | Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in (None, "auto"):
        raise GQAError(f"--dtype {dtype}: unknown; use one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu":
        return torch.float32  # half precision matmuls are slow or missing on many CPUs
    config_path = Path(model_dir) / CONFIG_FILE
    return config_dtype(json.loads(config_path.read_text()) if config_path.is_file() else {}, torch.bfloat16)


def evaluate(
    model: str | Path,
    baseline: str | Path | None = None,
    data_files: Sequence[str | Path] = (),
    seq_len: int = 1024,
    report_dir: str | Path | None = None,
    *,
    convention: str = "stream",
    tasks: TaskSettings | None = None,
    tokenizer: str | Path | None = None,
    contexts: Sequence[int] | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    kv_context: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    update_card: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` (and `baseline`, when given) on `data_files` and `tasks`; return the results dict.

    convention: how the text is cut and scored, "stream" or "documents" (gqa.train.heldout).
    tasks: lm-eval tasks scored with the same settings for the model and the baseline.
    contexts: decode context lengths (default by device, see DEFAULT_CONTEXTS; () skips decode).
    kv_context: the context length the KV-cache size is quoted at (default: the model's maximum).
    update_card: when `model` is a directory with a gqa provenance file, store the summary in its
        "eval" field and regenerate its README.md, so `gqa publish` shows the table.
    Prints nothing; progress bars go to stderr and can be turned off.
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device, model)
    if new_tokens < 2:
        raise GQAError(f"--new-tokens {new_tokens}: decode speed needs at least 2 new tokens")
    if not data_files and tasks is None:
        raise GQAError("nothing to evaluate: pass --data FILE (perplexity on held-out text), --tasks NAMES, or both")
    documents = read_documents(data_files, convention) if data_files else None
    manager = task_manager(tasks) if tasks is not None else None  # unknown task names fail before any model loads
    tok, models, limit = _load_models(model, baseline, tokenizer, device, dtype)
    entries = [_describe(role, source, m) for role, source, m in models]
    held, scores = None, {}
    if documents is not None:
        if limit is not None and seq_len > limit:
            raise GQAError(f"--seq-len {seq_len} is longer than the model allows ({limit} positions); pass --seq-len {limit} or less")
        held = held_out(tok, documents, seq_len, convention, max_tokens)
        logger.info("evaluating on %d tokens in %d windows of up to %d", len(held.stream), len(held.windows), seq_len)
        scores = score_windows(models[0][2], held, device, models[1][2] if baseline is not None else None,
                               batch_size, progress)  # fmt: skip
        for entry in entries:
            entry.update(scores[entry["role"]])
    task_results = _run_tasks(models, entries, tok, tasks, manager) if tasks is not None else None

    if contexts is None:
        contexts = DEFAULT_CONTEXTS["cuda" if device.type == "cuda" else "cpu"]
    usable = [c for c in sorted(set(contexts)) if limit is None or c + new_tokens <= limit]
    skipped = sorted(set(contexts) - set(usable))
    if skipped:
        logger.info("decode contexts %s skipped: context + %d new tokens exceeds %s positions", skipped, new_tokens, limit)
    kv_context = kv_context or limit or seq_len
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prompt_tokens = held.stream if held is not None else _fallback_prompt(tok)
    _measure_memory_and_speed(models, entries, prompt_tokens, device, pad_id, kv_context, usable, new_tokens, progress)
    if baseline is not None:
        _count_agreeing_tokens(entries[0]["decode"], entries[1]["decode"])

    results = {
        "gqa_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "dtype": dtype_name(dtype),
        "data": describe_held_out(held, data_files) if held is not None else None,
        "tasks": task_results,
        "kv_context": kv_context,
        "decode_new_tokens": new_tokens,
        "decode_contexts_skipped": skipped,
        "peak_memory_kind": "torch.cuda.max_memory_allocated above the level before generate"
        if device.type == "cuda" else "tensor memory allocated above the level before generate (torch CPU allocator events via torch.profiler, a separate untimed run)",
        "agreement": scores.get("agreement"),
        "models": entries,
    }  # fmt: skip
    results["markdown"] = report.markdown_table(results)
    metrics_path = Path(model) / report.METRICS_FILE
    metrics = report.read_metrics(metrics_path) if metrics_path.is_file() else None
    if report_dir is not None:
        results["report_files"] = report.write_report(results, report_dir, metrics)
    if update_card and read_provenance(model) is not None:
        store_in_provenance(model, results)
        results["card_updated"] = str(Path(model) / CARD_FILE)
    return results


def _run_tasks(models, entries, tok, settings: TaskSettings, manager) -> dict[str, Any]:
    """Each model's task scores (stored in its entry) and the comparison rows, under one set of settings."""
    for (role, _, model), entry in zip(models, entries):
        logger.info("tasks %s on the %s", ", ".join(settings.tasks), role)
        scored = run_tasks(model, tok, settings, manager)
        entry["tasks"] = scored["tasks"]
    base = entries[1]["tasks"] if len(entries) > 1 else None
    return {"settings": settings.describe(), "lm_eval_version": scored["lm_eval_version"],
            "rows": compare(entries[0]["tasks"], base)}  # fmt: skip


def _fallback_prompt(tok) -> list[int]:
    """Prompt tokens for the KV-cache and decode measures when no --data text was given."""
    return tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"] or [0]


def _load_models(model, baseline, tokenizer, device, dtype):
    """The tokenizer (checked against the baseline's), the models by role, and the shorter of their
    position limits (None when neither says)."""
    tok = load_tokenizer(model, tokenizer)
    if baseline is not None:
        _check_same_tokenizer(tok, baseline)
    else:
        source = ((read_provenance(model) or {}).get("source") or {}).get("id")
        logger.info("no --baseline: MODEL is measured alone%s", f" (its source: --baseline {source})" if source else "")
    models = [("model", model, load_model(model, device, dtype, "model"))]
    if baseline is not None:
        models.append(("baseline", baseline, load_model(baseline, device, dtype, "baseline")))
    known = [p for p in (_max_positions(m) for _, _, m in models) if p]
    return tok, models, min(known) if known else None


def _describe(role: str, source, model) -> dict[str, Any]:
    return {
        "role": role,
        "name": _name(source),
        "source": str(source),
        "model_type": model.config.model_type,
        "num_attention_heads": model.config.num_attention_heads,
        "kv_heads": kv_heads_of(model.config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def _measure_memory_and_speed(models, entries, stream, device, pad_id, kv_context, contexts, new_tokens, progress) -> None:
    """Each model's KV cache (measured against the config's size) and its decode speed per context."""
    with tqdm(total=len(models) * (1 + len(contexts)), desc="KV cache + decode", unit="run", disable=not progress) as bar:
        for (role, _, model), entry in zip(models, entries):
            entry["kv_cache"] = measure_kv_cache(model, prompt_of(stream, 16, device), pad_id, kv_context)
            bar.update()
            greedy(model, prompt_of(stream, 8, device), 2, pad_id)  # warm-up: first-call overheads out of the timings
            entry["decode"] = []
            for context in contexts:
                bar.set_postfix(model=role, context=context)
                entry["decode"].append(measure_decode(model, prompt_of(stream, context, device), new_tokens, pad_id))
                bar.update()


def _count_agreeing_tokens(mine: list[dict], theirs: list[dict]) -> None:
    """How many greedy tokens the model produces before it first departs from the baseline."""
    for run, base in zip(mine, theirs):
        same = 0
        for a, b in zip(run["generated"], base["generated"]):
            if a != b:
                break
            same += 1
        run["same_greedy_prefix_as_baseline"] = same


def _check_same_tokenizer(tok, baseline: str | Path) -> None:
    """Perplexities compare only under one tokenizer: refuse a baseline whose own tokenizer differs."""
    where, extra = from_pretrained_args(baseline)
    try:
        base_tok = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, TypeError):
        return  # no tokenizer beside the baseline: the vocabulary-size check in scoring still applies
    if base_tok.get_vocab() != tok.get_vocab():
        raise GQAError(
            f"the baseline {baseline} uses a different tokenizer than the model; perplexity and agreement "
            "need the same one: pass the source the model was converted from as --baseline"
        )


def provenance_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The part of the results a model card shows: headline numbers, task rows and the markdown table."""
    by_role = {m["role"]: m for m in results["models"]}
    model, base = by_role["model"], by_role.get("baseline")
    data, tasks = results.get("data"), results.get("tasks")
    summary = {
        "created": results["created"],
        "gqa_version": results["gqa_version"],
        "baseline": base["source"] if base else None,
        "kv_bytes_per_token": model["kv_cache"]["bytes_per_token"],
        "baseline_kv_bytes_per_token": base["kv_cache"]["bytes_per_token"] if base else None,
        "markdown": results["markdown"],
    }
    if data is not None:
        summary.update({
            "data": data["names"], "convention": data["convention"], "seq_len": data["seq_len"],
            "predicted_tokens": data["predicted_tokens"],
            "perplexity": model["perplexity"], "baseline_perplexity": base["perplexity"] if base else None,
            "bits_per_byte": model.get("bits_per_byte"),
            "baseline_bits_per_byte": base.get("bits_per_byte") if base else None,
            "top1_agreement": results["agreement"]["top1"] if results["agreement"] else None,
            "kl_mean": results["agreement"]["kl_mean"] if results["agreement"] else None,
        })  # fmt: skip
    if tasks is not None:
        summary["tasks"] = {"settings": tasks["settings"], "lm_eval_version": tasks["lm_eval_version"],
                            "rows": tasks["rows"]}  # fmt: skip
    return summary


def store_in_provenance(model_dir: str | Path, results: dict[str, Any]) -> None:
    provenance = read_provenance(model_dir) or {}
    provenance["eval"] = provenance_summary(results)
    write_provenance(model_dir, provenance)
    write_model_card(model_dir)


# ---------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 512,2048, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("context lengths must be positive")
    return values


def add_arguments(parser: argparse.ArgumentParser, name: str = "eval") -> None:
    parser.add_argument("model", metavar="MODEL", help="model directory (or hub id) to evaluate")
    parser.add_argument("--baseline", metavar="SOURCE",
                        help="model to compare against, usually the source it was converted from (directory, .gguf file or hub id)")
    parser.add_argument("--data", metavar="FILE", nargs="+", default=(),
                        help="held-out text for perplexity: plain text files or .jsonl with a 'text' field")
    parser.add_argument("--convention", choices=list(CONVENTIONS), default="stream",
                        help="how --data is scored. stream (default): each file (or .jsonl record) one token stream, "
                             "every token predicted once, as lm-eval's loglikelihood_rolling and the Hugging Face "
                             "perplexity guide score text; with bits per byte and word perplexity. documents: "
                             "paragraphs with EOS after each, cut into windows as training data is (gqa train's figure)")
    parser.add_argument("--seq-len", type=int, default=1024,
                        help="tokens per evaluation window (model inputs under stream); windows do not overlap (default 1024)")
    parser.add_argument("--tasks", metavar="NAME[,NAME...]", type=parse_task_list, default=(),
                        help="lm-evaluation-harness tasks or groups (hellaswag,arc_easy,...) scored for MODEL and "
                             "--baseline with the same settings; needs pip install 'gqa[eval]'")
    parser.add_argument("--task-path", metavar="DIR", action="append", default=[],
                        help="a folder of local lm-eval task YAML files (lm-eval's include path); repeatable")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                        help="few-shot examples per task item (default: each task's own, 0 when it sets none)")
    parser.add_argument("--limit", type=_limit, default=None, metavar="N",
                        help="score only the first N items of each task (a fraction when below 1); default all")
    parser.add_argument("--task-batch-size", type=int, default=8, metavar="B",
                        help="requests per forward pass in task scoring (default 8)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of lm-eval's samplers and few-shot draws (default {DEFAULT_SEED}, lm-eval's)")
    parser.add_argument("--report", metavar="DIR",
                        help="write eval.json, eval.md and PNG plots into DIR")
    parser.add_argument("--tokenizer", metavar="SOURCE", help="tokenizer to use (default: the one in MODEL)")
    parser.add_argument("--contexts", type=_int_list, default=None, metavar="N,N,...",
                        help="decode context lengths in tokens, 'none' to skip "
                             "(default 512,2048,8192 on CUDA, 512,1024,2048 on CPU; longer than the model allows are skipped)")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                        help=f"greedy tokens generated per decode run (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--kv-context", type=int, default=None, metavar="N",
                        help="context length to quote the KV-cache size at (default: the model's maximum)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="evaluate only the first N tokens of the text")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and KV-cache dtype (auto: float32 on CPU, the config's dtype on CUDA)")
    parser.add_argument("--no-update-card", dest="update_card", action="store_false",
                        help="do not store the summary in MODEL's gqa_provenance.json and README.md")


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number of items (or a fraction below 1), got {text!r}") from err
    return int(value) if value >= 1 and value == int(value) else value


def task_settings(args: argparse.Namespace) -> TaskSettings | None:
    """The task settings the flags ask for; None without --tasks (the other task flags then refused)."""
    if not args.tasks:
        given = [flag for flag, value in (("--task-path", args.task_path), ("--num-fewshot", args.num_fewshot),
                                          ("--limit", args.limit)) if value]  # fmt: skip
        if given:
            raise GQAError(f"{', '.join(given)} applies to tasks: add --tasks NAME[,NAME...]")
        return None
    return TaskSettings(tuple(args.tasks), args.num_fewshot, args.limit, args.task_batch_size, args.seed,
                        tuple(args.task_path))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    results = evaluate(
        args.model, args.baseline, args.data, args.seq_len, args.report,
        convention=args.convention, tasks=task_settings(args), tokenizer=args.tokenizer, contexts=args.contexts, new_tokens=args.new_tokens, kv_context=args.kv_context,
        max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        update_card=args.update_card,
    )
    print(results["markdown"])
    for m in results["models"]:
        kv = m["kv_cache"]
        check = "matches" if kv["matches_config"] else "DOES NOT match"
        print(f"\n{m['role']}: KV cache {human_bytes(kv['bytes_per_token'])}/token from the config; "
              f"generate allocated {human_bytes(kv['measured_bytes_per_token'])}/token ({check})")
    for path in (results.get("report_files") or {}).values():
        print(f"wrote {path}")
    if results.get("card_updated"):
        print(f"stored the summary in {Path(args.model) / 'gqa_provenance.json'} and refreshed {results['card_updated']}")
    return 0
