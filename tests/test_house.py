"""The shape of the house: imports point one way, architecture facts come from the family table, and
the command table is in one place.

gqa.convert is the lower floor (model directories, families, text, conversion, publishing); gqa.train
is the upper floor (recipes, uptraining, evaluation, the demo and the `gqa` command table). Nothing
on the lower floor may import the upper one, not even inside a function; within the lower floor, the
foundation (model directories, families, text) imports nothing of the conversion built on it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tiny import FAMILY_TYPES, build_family_model

REPO = Path(__file__).resolve().parent.parent
FLOORS = {"convert": "gqa.convert", "train": "gqa.train"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, as absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(folder: str) -> list[Path]:
    return sorted((REPO / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules_of("convert"), ids=lambda p: p.name)
def test_the_lower_floor_imports_nothing_from_the_upper_one(path):
    upward = sorted(name for name in imported_modules(path) if name == "gqa.train" or name.startswith("gqa.train."))
    assert not upward, f"convert/{path.name} imports {upward}: gqa.convert must not know about gqa.train"


# The ground the conversion stands on: it knows nothing of merging, writing, publishing or commands.
FOUNDATION = {"__init__", "errors", "modeldir", "families", "serving", "kvcache", "text", "perplexity", "corpus"}


@pytest.mark.parametrize("name", sorted(FOUNDATION), ids=str)
def test_the_foundation_imports_only_the_foundation(name):
    modules = {p.stem for p in modules_of("convert")}
    imported = {n.removeprefix("gqa.convert.").split(".")[0] for n in imported_modules(REPO / "convert" / f"{name}.py")
                if n.startswith("gqa.convert.")} & modules  # fmt: skip
    assert imported <= FOUNDATION, f"convert/{name}.py imports {sorted(imported - FOUNDATION)} from above the foundation"


def runtime_imports(path: Path, floor: str) -> set[str]:
    """The modules of one floor a file imports when it runs (imports for type checkers only are left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}  # fmt: skip
    package, names = FLOORS[floor], set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == package:
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[2] for alias in node.names if alias.name.startswith(package + "."))
    return names - {path.stem}


# Rooms of the upper floor that come in stages: each may import only the stages before it.
STAGES = {
    "data": ["sources", "blocks", "stream", "dataset"],  # sources and their errors; prepared blocks; the stream; the entry
    "memory": ["launch", "activations", "memory"],  # the launch arithmetic; the measured step; the estimate and advice
    "eval": ["heldout", "tasks", "decode", "report", "evaluate"],  # scoring text and tasks; decode speed; the report; the entry
    "loop": ["logbook", "setup", "checkpoints", "loop"],  # logging; setup; checkpoints and the result; the step
}


@pytest.mark.parametrize("floor", FLOORS)
def test_no_floor_has_an_import_cycle(floor):
    graph = {p.stem: runtime_imports(p, floor) for p in modules_of(floor)}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert not [name for name in graph if name in reachable(name)], graph


@pytest.mark.parametrize("room", STAGES)
def test_each_stage_imports_only_the_stages_before_it(room):
    stages = STAGES[room]
    for i, name in enumerate(stages):
        later = runtime_imports(REPO / "train" / f"{name}.py", "train") & set(stages[i + 1:])
        assert not later, f"train/{name}.py imports {sorted(later)}, a later stage of the {room} rooms ({' -> '.join(stages)})"


def test_the_command_table_is_the_only_one():
    """One module builds the `gqa` parser and is the console script; no other module has a table."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'gqa = "gqa.train.cli:main"' in pyproject
    tables = [p for folder in FLOORS for p in modules_of(folder) if "SUBCOMMANDS" in p.read_text()]
    assert tables == [REPO / "train" / "cli.py"]
    from gqa.train.cli import SUBCOMMANDS

    assert set(SUBCOMMANDS) == {"convert", "inspect", "train", "recipes", "eval", "publish", "demo"}


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_which_parameters_train_comes_from_the_family_table(model_type):
    from gqa.convert.errors import GQAError
    from gqa.convert.families import family_for
    from gqa.train.params import trainable_names

    model = build_family_model(model_type, kv=2)
    family = family_for(model_type)
    names = {name for name, _ in model.named_parameters()}
    assert trainable_names(model, "all") == names
    assert trainable_names(model, "attention") == {n for n in names if ".self_attn." in n}
    if family.fused_qkv:
        with pytest.raises(GQAError, match="fuses queries, keys and values"):
            trainable_names(model, "kv")
        return
    kv = trainable_names(model, "kv")
    assert kv and all(n.split(".self_attn.")[1].split(".")[0] in family.kv_modules for n in kv)
    assert {n for n in names if ".self_attn.k_proj." in n or ".self_attn.v_proj." in n} <= kv
    assert not any(".q_proj." in n or ".o_proj." in n or ".dense." in n for n in kv)


def test_the_readme_names_every_room():
    """The README's house section is where a newcomer finds a module: every module of both floors is named there."""
    readme = (REPO / "README.md").read_text()
    house = readme[readme.index("### The house"):]
    named = set(re.findall(r"`([a-z_0-9]+)`", house))
    missing = [f"{folder}/{p.name}" for folder in FLOORS for p in modules_of(folder)
               if p.stem != "__init__" and p.stem not in named]  # fmt: skip
    assert not missing, f"README's house section does not name {missing}"
