"""The `gqa` console script: the one command table, one subcommand per job.

It sits on the top floor (gqa.train), the only place that may name both floors' commands. Each
subcommand lives in its own module that exposes `add_arguments(parser, name)` and `run(args)`;
modules are imported only when their subcommand runs, so `gqa --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Callable

from gqa.convert import __version__
from gqa.convert.errors import GQAError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("gqa.convert.commands", "convert a checkpoint to fewer KV heads"),
    "inspect": ("gqa.convert.commands", "show heads, KV heads, legal --kv-heads, KV-cache sizes and where the output serves"),
    "train": ("gqa.train.commands", "uptrain a converted checkpoint from a recipe (a YAML file or a shipped recipe's name)"),
    "recipes": ("gqa.train.commands", "list the shipped recipes, or copy one out to edit (gqa recipes cp NAME)"),
    "eval": ("gqa.train.evaluate", "perplexity, lm-eval tasks, agreement, KV cache and decode speed against a baseline"),
    "publish": ("gqa.convert.publish", "check a model directory and upload it to the Hugging Face hub"),
    "demo": ("gqa.train.demo", "the whole pipeline on the embedded default (SmolLM2-135M)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag is taken only as spelt, so a shortened one in a script cannot start meaning
    # another flag when one is added.
    parser = argparse.ArgumentParser(prog="gqa", description="Convert MHA checkpoints to GQA/MQA and uptrain them.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"gqa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested_subcommand(argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        # Only the subcommand being run pays for importing its module.
        if name == wanted:
            importlib.import_module(module).add_arguments(p, name)
            p.set_defaults(_module=module)
    return parser


def _requested_subcommand(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.debug else logging.DEBUG, format="%(message)s")
    return run_reporting_errors(args.command, args.debug, lambda: int(importlib.import_module(args._module).run(args) or 0))


def _report(line: str) -> None:
    """One write per line: under torchrun every process reports into the same stderr, and print's separate
    newline write lets two processes' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_reporting_errors(command: str, debug: bool, run: Callable[[], int]) -> int:
    """Run a command; a GQAError or a system error becomes one line on stderr and exit status 2 (a traceback
    with --debug). `gqa` and `python -m gqa.train` (what torchrun and accelerate launch start) both report so."""
    try:
        return run()
    except GQAError as err:
        if debug:
            raise
        _report(f"gqa {command}: error: {err}")
        return 2
    except OSError as err:  # a full disk, a read-only or vanished directory: the system's own words
        if debug:
            raise
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk (or quota) in a write no command names itself
            where = f" writing {err.filename}" if err.filename else ""
            _report(f"gqa {command}: error: no space left on the device{where}; free some space and run the "
                    "same command again (--debug shows where)")
        else:
            _report(f"gqa {command}: error: {err} (--debug shows where)")
        return 2
    except KeyboardInterrupt:
        _report(f"gqa {command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
