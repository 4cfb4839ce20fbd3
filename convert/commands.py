"""`gqa convert` and `gqa inspect`: argument parsing and the printed summaries."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from gqa.convert.convert import convert, load_config
from gqa.convert.options import DTYPES, GROUPINGS, ConvertOptions, parse_size
from gqa.convert.checkpoint import resolve_source
from gqa.convert.families import family_for, geometry_of
from gqa.convert.heads import METHOD_HELP, METHODS
from gqa.convert.kvcache import human_bytes, kv_cache_bytes_per_token


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("source", metavar="SOURCE", help="model directory, hub id (owner/name) or .gguf file")
    if name == "inspect":
        return
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist unless --force)")
    parser.add_argument("--kv-heads", type=int, required=True, metavar="G", help="number of KV heads to keep")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="mean",
        help="how heads of a group are merged: " + "; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items()),
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="output dtype (auto keeps the source's)")
    parser.add_argument(
        "--shard-size", default="5GB", help="largest output shard in bytes, e.g. 5GB (10^9 bytes), 2GiB (default 5GB)"
    )
    parser.add_argument("--no-copy-tokenizer", action="store_true", help="do not copy tokenizer files to OUT")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (only once OUT is complete)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --method random (default 0)")
    parser.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default="contiguous",
        help="contiguous: heads 0..r-1 form group 0 (default); similarity: group similar KV heads per layer "
        "(by calibration activations with --method aligned, else by weights) and renumber heads to match",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="text file for --method aligned, or stdlib-docs:train (the recipes' training text, about 280K "
        "SmolLM2 tokens: enough for 512 sequences of 512); default: docstrings of 22 Python standard-library modules",
    )
    parser.add_argument(
        "--calibration-sequences", type=int, default=ConvertOptions.calibration_sequences,
        help=f"calibration sequences (default {ConvertOptions.calibration_sequences}; fewer are faster and "
        "lighter, and merge less well)",
    )
    parser.add_argument(
        "--calibration-length", type=int, default=ConvertOptions.calibration_length,
        help=f"tokens per sequence (default {ConvertOptions.calibration_length})",
    )
    parser.add_argument(
        "--refine-steps", type=int, default=0,
        help="aligned: after each layer's merge, Adam steps on its attention weights to match the source "
        "attention's output on the calibration tokens (default 0: none; 400 took SmolLM2-135M 3->1 to 1.85x the original "
        "perplexity; on a GPU, 1600 with --refine-batch 32 on 512 calibration sequences to 1.32x)",
    )
    parser.add_argument(
        "--refine-lr", type=float, default=ConvertOptions.refine_lr,
        help=f"learning rate of --refine-steps (default {ConvertOptions.refine_lr:g})",
    )
    parser.add_argument(
        "--refine-batch", type=int, default=ConvertOptions.refine_batch,
        help=f"calibration sequences per --refine-steps step (default {ConvertOptions.refine_batch}; more "
        "fit held-out text better and cost proportionally more time)",
    )
    parser.add_argument(
        "--device", default=ConvertOptions.device,
        help="where --method aligned runs its calibration pass: auto (default: the GPU when torch sees one, "
        "else the CPU), cpu, cuda or cuda:N",
    )


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        return run_inspect(args)
    if args.method != "aligned":
        # Streaming is bound by I/O; a second torch thread on a busy machine only burns CPU.
        import torch

        torch.set_num_threads(1)
    options = ConvertOptions(
        kv_heads=args.kv_heads,
        method=args.method,
        dtype=args.dtype,
        shard_size=parse_size(args.shard_size),
        copy_tokenizer=not args.no_copy_tokenizer,
        force=args.force,
        seed=args.seed,
        grouping=args.grouping,
        calibration=args.calibration,
        calibration_sequences=args.calibration_sequences,
        calibration_length=args.calibration_length,
        refine_steps=args.refine_steps,
        refine_lr=args.refine_lr,
        refine_batch=args.refine_batch,
        device=args.device,
    )
    result = convert(args.source, args.out, options)
    before, after = result.kv_bytes_per_token_before, result.kv_bytes_per_token_after
    g = result.geometry
    print(f"converted {result.source.id} ({result.family}) -> {result.out_dir}")
    print(f"  KV heads          {g.kv_heads} -> {result.kv_heads} ({args.method}), {g.heads} query heads")
    print(f"  KV cache / token  {human_bytes(before)} -> {human_bytes(after)} ({before / after:g}x smaller)")
    print(f"  written           {result.tensors_written} tensors, {human_bytes(result.bytes_written)}")
    print(f"  time              {result.seconds:.1f} s")
    if result.dropped:
        print(f"  left out          {len(result.dropped)} tensors the model does not define (transformers does not load them)")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="gqa-inspect-"))
    try:
        src = resolve_source(args.source, scratch, config_only=True)
        _, config = load_config(src.path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    family = family_for(config.model_type)
    g = geometry_of(config)
    print(f"{src.id}")
    print(f"  family        {family.name} (model_type {config.model_type})")
    print(f"  layers        {g.layers}")
    print(f"  query heads   {g.heads}")
    print(f"  KV heads      {g.kv_heads}")
    print(f"  head_dim      {g.head_dim}")
    print(f"  rotary dims   {g.rotary_dims} of {g.head_dim}")
    now = kv_cache_bytes_per_token(config)
    print(f"  KV cache      {human_bytes(now)} per token now ({config.dtype or 'float32'})")
    legal = g.legal_kv_heads()
    if legal:
        print("  legal --kv-heads (KV cache per token):")
        for kv in reversed(legal):
            print(f"    {kv:>4}  {human_bytes(kv_cache_bytes_per_token(config, kv))}  ({g.kv_heads / kv:g}x smaller)")
    else:
        print("  legal --kv-heads: none (already one KV head)")
    for note in family.notes:
        print(f"  note: {note}")
    return 0
