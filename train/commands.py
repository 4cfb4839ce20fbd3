"""`gqa train RECIPE [key=value ...]` (also `python -m gqa.train` under any launcher), `gqa train RECIPE
--plan` (the plan and memory estimate, without training), and `gqa recipes [cp NAME DEST]`, which lists
the shipped recipes or copies one out to edit."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from gqa.convert.errors import GQAError


def add_arguments(parser: argparse.ArgumentParser, name: str = "train") -> None:
    if name == "recipes":
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        actions.add_parser("ls", help="list the shipped recipes and accelerate configs (the default)")
        copy = actions.add_parser("cp", help="copy a shipped recipe or accelerate config out, to edit it")
        copy.add_argument("name", metavar="NAME", help="a name from `gqa recipes`, e.g. smollm2-135m-mqa or accelerate/fsdp")
        copy.add_argument("dest", metavar="DEST", nargs="?", default=".", help="file or directory to write (default: .)")
        copy.add_argument("--force", action="store_true", help="replace DEST if it exists")
        return
    parser.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (see `gqa recipes`)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="recipe overrides by dotted key, values read as YAML: budget.steps=200 optimizer.lr=3e-4 output.dir=runs/x",
    )
    memory = parser.add_argument_group(
        "memory plan",
        "Bytes per process (weights, gradients, optimizer state, activations, teacher) from the model's "
        "config.json alone, and whether they fit a GPU. Training prints the plan before step 1 and, on CUDA, "
        "refuses to start when it does not fit the device, naming the cheapest change that does.",
    )
    memory.add_argument(
        "--plan", action="store_true",
        help="print the training plan and memory estimate per process, then exit without training",
    )
    memory.add_argument(
        "--gpu-memory", metavar="SIZE",
        help="with --plan: the GPU memory to check the estimate against, e.g. 80GB, 24GB, 79.6GiB (default: this "
             "machine's CUDA device, if any; training checks against its own device)",
    )
    memory.add_argument(
        "--launch", metavar="LAUNCH",
        help="with --plan: how the run will be launched: one, ddp, fsdp (FSDP2), zero1, zero2, zero3 (DeepSpeed), or "
             "an accelerate config (a file, or a shipped one such as accelerate/fsdp) (default: this invocation's "
             "launcher, if any, else one process)",
    )
    memory.add_argument(
        "--processes", type=int, metavar="N",
        help="with --plan: processes (GPUs) in all, all machines together (default: from --launch or the launcher)",
    )
    memory.add_argument(
        "--source", metavar="ID_OR_DIR",
        help="with --plan and --kv-heads: plan before converting, from the source checkpoint's config alone (a model "
             "directory, a .gguf file or a hub id, as `gqa convert` takes it) converted to --kv-heads, instead of "
             "model.path's; only the config is read (a hub id's config.json alone is downloaded)",
    )
    memory.add_argument(
        "--kv-heads", type=int, metavar="G",
        help="with --plan --source: the KV heads the conversion keeps (as `gqa convert --kv-heads`; it must divide "
             "the source's KV heads and be fewer)",
    )
    memory.add_argument(
        "--skip-memory-check", action="store_true",
        help="train even when the estimate exceeds the GPU's memory (the estimate may be wrong for your setup)",
    )


def run_recipes(args: argparse.Namespace) -> int:
    from gqa.train.recipe import recipe_description, shipped_recipes

    shipped = shipped_recipes()
    if args.action == "cp":
        if args.name.removesuffix(".yaml") not in shipped:
            raise GQAError(f"no shipped recipe or config is called {args.name}; `gqa recipes` lists them")
        name = args.name.removesuffix(".yaml")
        dest = Path(args.dest)
        if dest.is_dir():
            dest = dest / f"{name.rsplit('/', 1)[-1]}.yaml"
        if dest.exists() and not args.force:
            raise GQAError(f"{dest} already exists; choose another DEST or pass --force to replace it")
        dest.write_text(shipped[name].read_text())
        if name.startswith("accelerate/"):
            print(f"copied {name} to {dest}; use it with `accelerate launch --config_file {dest} -m gqa.train RECIPE`")
        else:
            print(f"copied {name} to {dest}; run it with `gqa train {dest}`")
        return 0
    width = max(len(name) for name in shipped)
    print("recipes (gqa train NAME, or gqa recipes cp NAME to edit one):")
    for name, recipe in shipped.items():
        if not name.startswith("accelerate/"):
            print(f"  {name:<{width}}  {recipe_description(recipe)}")
    print("accelerate configs (gqa recipes cp NAME, then accelerate launch --config_file FILE -m gqa.train ...):")
    for name, recipe in shipped.items():
        if name.startswith("accelerate/"):
            print(f"  {name:<{width}}  {recipe_description(recipe)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "command", "train") == "recipes":
        return run_recipes(args)
    if getattr(args, "plan", False):
        return run_plan(args)
    plan_only = {"--launch": "launch", "--processes": "processes", "--gpu-memory": "gpu_memory", "--source": "source",
                 "--kv-heads": "kv_heads"}
    given = [flag for flag, key in plan_only.items() if getattr(args, key, None) is not None]
    if given:
        options = f"{given[0]} is an option" if len(given) == 1 else f"{', '.join(given)} are options"
        raise GQAError(f"{options} of --plan; training reads its launch from accelerate launch or torchrun and checks "
                       "against its own GPU (`gqa recipes` lists the accelerate configs)")
    from gqa.train.api import run_recipe  # heavy imports (torch, transformers) only when training

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load lines drown the progress
    result = run_recipe(args.recipe, args.overrides, check_memory=not getattr(args, "skip_memory_check", False))
    if result.process_index == 0:
        if result.finished:
            final = result.final_eval
            print(
                f"trained {result.steps} steps, {result.tokens_seen:,} tokens; eval loss {final['loss']:.4f}, "
                f"perplexity {final['perplexity']:.3f}; model in {result.output_dir}"
            )
        else:
            print(f"stopped at step {result.steps} (budget.stop_at_step); resume with the same command and budget.stop_at_step=null")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """`gqa train RECIPE --plan`: what the run would do and hold per process; nothing is read or trained but the
    model's config (model.path's, or with --source the config a conversion of the source would write)."""
    from dataclasses import replace

    from gqa.train.launch import resolve_launch
    from gqa.convert.sizes import parse_size
    from gqa.train.memory import device_memory, plan_memory
    from gqa.train.plan import plan_training
    from gqa.train.recipe import load_recipe

    if args.gpu_memory is not None:  # checked first: a typo here wastes no time
        capacity, source = parse_size(args.gpu_memory, "--gpu-memory", unit_required=True), f"--gpu-memory {args.gpu_memory}"
    else:
        capacity, source = device_memory(), "this machine's CUDA device"
    recipe = load_recipe(args.recipe, args.overrides)
    config, converted = None, ""
    if (args.source is None) != (args.kv_heads is None):
        given, missing = ("--source", "--kv-heads G") if args.kv_heads is None else ("--kv-heads", "--source ID_OR_DIR")
        raise GQAError(f"{given} needs {missing}: --plan --source SOURCE --kv-heads G plans the conversion of SOURCE "
                       "to G KV heads, before converting")
    if args.source is not None:
        from gqa.convert.convert import converted_config, read_source_config
        from gqa.convert.families import geometry_of

        src, source_config = read_source_config(args.source)
        config = converted_config(source_config, args.kv_heads)  # refused as `gqa convert` refuses it
        converted = (f"  {'model':<13} {src.id} converted to {args.kv_heads} KV heads (from "
                     f"{geometry_of(source_config).kv_heads}): its config alone, nothing converted (--source)")
    launch = resolve_launch(args.launch, args.processes)
    plan = plan_training(recipe, launch.processes)
    # A GPU when one is named or here, or the launch spreads over GPUs; else the host memory of a CPU run.
    device = "cuda" if capacity is not None or launch.kind != "one" else "cpu"
    memory = plan_memory(recipe, launch, plan.accumulation, device, capacity, source, config=config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"plan of {args.recipe} (--plan: nothing is trained):")
        if converted:
            print(converted)
        print(replace(plan, memory=memory).describe())
        if device == "cpu":
            print("  (the host memory of a run on the CPU; --gpu-memory SIZE plans for a GPU)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m gqa.train`, `torchrun -m gqa.train` and `accelerate launch -m gqa.train`."""
    parser = argparse.ArgumentParser(prog="python -m gqa.train", description="Uptrain a converted checkpoint from a recipe.",
                                     allow_abbrev=False)  # as gqa's own parser
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    # Launchers start one copy per process; only the first one talks.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    from gqa.train.cli import run_reporting_errors

    return run_reporting_errors("train", args.debug, lambda: run(args))
