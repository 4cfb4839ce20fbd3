"""Every shell command the README and docs/ show runs as written: each fenced `bash` block's `gqa ...`
(and `python -m gqa.train`, `torchrun`/`accelerate launch ... -m gqa.train`) parses against the CLI, and
the recipe and overrides a `gqa train` names validate. Parsing needs no GPU and no hub, so every
command is checked, including those that would download a model."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from gqa.train.cli import build_parser
from gqa.train.recipe import load_recipe, resolve_recipe, shipped_recipes
from gqa.convert.errors import GQAError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def shell_commands(text: str) -> list[str]:
    """The commands of a page's fenced shell blocks: continuation lines joined, `&&` chains split."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in commands if c]


def gqa_arguments(words: list[str]) -> list[str] | None:
    """The argv `gqa` would see for this command, or None for a command that is not gqa's."""
    program = Path(words[0]).name
    if program == "gqa":
        return words[1:]
    if "-m" in words:
        module = words[words.index("-m") + 1]
        if module == "gqa.train":
            return ["train", *words[words.index("-m") + 2:]]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for words in shell_commands(page.read_text()):
            found.append((f"{page.relative_to(ROOT)}: {shlex.join(words)}", words))
    return found


COMMANDS = documented_commands()


def test_the_pages_show_commands():
    # The README alone shows convert, train, eval and publish; an extraction that finds nothing checks nothing.
    readme = [gqa_arguments(w) for label, w in COMMANDS if label.startswith("README.md")]
    assert {a[0] for a in readme if a} >= {"convert", "inspect", "train", "recipes", "eval", "publish", "demo"}


@pytest.mark.parametrize("label,words", COMMANDS, ids=[label for label, _ in COMMANDS])
def test_documented_command_parses(label, words):
    if words[:2] == ["python", "-m"] or words[0].endswith("/python") and words[1] == "-m":
        module = words[2]
        if module.startswith("gqa."):
            assert importlib.util.find_spec(module) is not None, f"{label}: no module {module}"
        if module != "gqa.train":
            return
    argv = gqa_arguments(words)
    if argv is None:
        return  # bash, pip, pytest: not gqa's to check
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"{label}: gqa's parser refuses it (exit {exit.code})")
    if args.command == "convert":
        from gqa.convert.commands import options_from

        try:
            options_from(args)  # values the parser takes as text (--dtype, --method) are checked here
        except GQAError as err:
            pytest.fail(f"{label}: {err}")
    if args.command == "train":
        check_recipe(label, args.recipe, args.overrides)
    if args.command == "recipes" and getattr(args, "action", None) == "cp":
        assert args.name.removesuffix(".yaml") in shipped_recipes(), f"{label}: no shipped recipe {args.name}"


def check_recipe(label: str, recipe: str, overrides: list[str]) -> None:
    """A shipped recipe (or a file the docs copy out first) with the command's overrides validates."""
    try:
        path = resolve_recipe(recipe)
    except GQAError:
        path = resolve_recipe("tiny-cpu")  # a copy the docs made (`gqa recipes cp`): check the overrides' keys
    try:
        load_recipe(path, overrides)
    except GQAError as err:
        pytest.fail(f"{label}: {err}")
