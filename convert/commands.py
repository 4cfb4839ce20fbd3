"""`gqa convert` and `gqa inspect`: argument parsing and the printed summaries."""

from __future__ import annotations

import argparse
import typing

from gqa.convert import gpt2
from gqa.convert.convert import convert, read_source_config
from gqa.convert.options import ConvertOptions, flag_of
from gqa.convert.families import converts_to_gpt_bigcode, family_for, geometry_of, output_family
from gqa.convert.kvcache import kv_cache_bytes_per_token
from gqa.convert.sizes import human_bytes
from gqa.convert.serving import ENGINE_BY_KEY


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("source", metavar="SOURCE", help="model directory, hub id (owner/name) or .gguf file")
    if name == "inspect":
        return
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist unless --force)")
    parser.epilog = ("Before any weight is read, a warning names each serving engine (vLLM, SGLang, llama.cpp) that "
                     "would not serve the output with its smaller KV cache; `gqa inspect SOURCE` shows them all.")
    add_option_flags(parser)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ConvertOptions field but the library-only ones, named after the field, with its
    default, choices and help. A bool is a switch: --force sets force, --no-copy-tokenizer clears
    copy_tokenizer (whose default is True). Values are parsed (int, float) but not checked here, not
    even against their choices: ConvertOptions checks them, so the command line and the library
    refuse the same values with the same GQAError messages."""
    for name, info in ConvertOptions.model_fields.items():
        flag = flag_of(info)
        if not flag.cli:
            continue
        dashed = name.replace("_", "-")
        if info.annotation is bool:
            option = f"--no-{dashed}" if info.default else f"--{dashed}"
            kw = {"action": "store_false" if info.default else "store_true", "default": info.default}
            help_text = ("do not " if info.default else "") + info.description
        else:
            option = f"--{dashed}"
            kw = {"type": flag.type or _value_type(info.annotation)}
            kw.update({"required": True} if info.is_required() else {"default": info.default})
            help_text = info.description
            if info.default is not None and not info.is_required():
                help_text += f" (default {flag.show(info.default)})"
        if flag.choices:  # shown as argparse shows choices, but checked by ConvertOptions, with its message
            kw["metavar"] = "{" + ",".join(flag.choices) + "}"
        if flag.metavar:
            kw["metavar"] = flag.metavar
        parser.add_argument(option, dest=name, help=help_text.replace("%", "%%"), **kw)


def options_from(args: argparse.Namespace) -> ConvertOptions:
    """The ConvertOptions that add_option_flags' flags ask for."""
    flagged = [name for name, info in ConvertOptions.model_fields.items() if flag_of(info).cli]
    return ConvertOptions(**{name: getattr(args, name) for name in flagged})


def _value_type(annotation) -> type:
    """int, float or str: what a flag's text is parsed as (X | None gives X)."""
    for candidate in (int, float):
        if annotation is candidate or candidate in typing.get_args(annotation):
            return candidate
    return str


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        return run_inspect(args)
    if args.method != "aligned":
        # Streaming is bound by I/O; a second torch thread on a busy machine only burns CPU.
        import torch

        torch.set_num_threads(1)
    options = options_from(args)
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
    src, config = read_source_config(args.source)
    if converts_to_gpt_bigcode(config.model_type):
        return inspect_gpt2(src.id, config)
    family = family_for(config.model_type)
    g = geometry_of(config)
    print(f"{src.id}")
    print(f"  family        {family.name} (model_type {config.model_type})")
    print(f"  layers        {g.layers}")
    print(f"  query heads   {g.heads}")
    print(f"  KV heads      {g.kv_heads}")
    print(f"  head_dim      {g.head_dim}")
    nope = f"; none in layers {', '.join(map(str, g.unrotated_layers))} (no RoPE)" if g.unrotated_layers else ""
    print(f"  rotary dims   {g.rotary_dims} of {g.head_dim}{nope}")
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
    print_serving(family)
    return 0


def inspect_gpt2(source_id: str, config) -> int:
    """What a GPT-2 source is and what it converts to: gpt_bigcode with one KV head."""
    g = gpt2.geometry(config)
    print(f"{source_id}")
    print(f"  family        {gpt2.FAMILY_NAME} (model_type {config.model_type})")
    print(f"  converts to   {gpt2.TARGET_MODEL_TYPE} ({gpt2.TARGET_ARCHITECTURE}, multi_query: one KV head)")
    print(f"  layers        {g.layers}")
    print(f"  query heads   {g.heads}")
    print(f"  KV heads      {g.kv_heads}")
    print(f"  head_dim      {g.head_dim}")
    print(f"  positions     learned ({config.n_positions}); no rotary dims")
    now = kv_cache_bytes_per_token(config)
    print(f"  KV cache      {human_bytes(now)} per token now ({config.dtype or 'float32'})")
    reasons = gpt2.unconvertible_options(config)
    if reasons:
        print("  legal --kv-heads: none; this model cannot be converted:")
        for reason in reasons:
            print(f"    {reason}")
    else:
        after = kv_cache_bytes_per_token(config, 1)
        print("  legal --kv-heads (KV cache per token):")
        print(f"    {1:>4}  {human_bytes(after)}  ({g.kv_heads:g}x smaller)")
    for note in gpt2.NOTES:
        print(f"  note: {note}")
    print_serving(output_family(config.model_type))
    return 0


def print_serving(family) -> None:
    """Each engine's record for this family: whether a GQA output serves as GQA there, and the code that says so."""
    print("  Serves as GQA in:")
    for record in family.serving:
        engine = ENGINE_BY_KEY[record.engine]
        print(f"    {engine.name:<10} {record.status} ({engine.version})")
        print(f"      {record.evidence}")
        if record.remedy:
            print(f"      what to do: {record.remedy}")
