"""Real English technical text that ships with Python itself: the docstrings of the standard library.

Two disjoint splits, by package: "heldout" is a fixed list of packages, "train" is every other
importable standard-library module. The text is deterministic for a given Python build (docstrings
change between Python versions, so cached files are keyed by the version). Recipes name the splits
as `stdlib-docs:train` and `stdlib-docs:heldout`; `write_corpus` writes them as .txt files, one
docstring per paragraph block, for anything else that wants plain files.

    python -m gqa.convert.corpus runs/corpus     # writes runs/corpus/{train,heldout}.txt
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
NAME = "stdlib-docs"  # named as `stdlib-docs:train` / `stdlib-docs:heldout` by recipes and `--calibration`

# Held out whole packages, so no module's text sits on both sides (about 250 KB of docstrings).
HELDOUT_PACKAGES = (
    "calendar", "csv", "difflib", "email", "http", "ipaddress", "json", "logging", "statistics", "tarfile", "zipfile"
)

# Modules that act when imported (open a browser, print, need a display), tests, and codec tables.
SKIPPED_PACKAGES = frozenset(
    {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3", "ensurepip",
     "pydoc_data", "encodings", "__hello__", "__phello__", "xxlimited", "xxlimited_35", "xxsubtype"}
)
MIN_DOC_CHARS = 40  # "Return self." and bare signatures carry no prose


def corpus_tag() -> str:
    """Names the corpus version: docstrings differ between Python versions."""
    return "stdlib-docs-py" + ".".join(map(str, sys.version_info[:3]))


def module_names(split: str) -> list[str]:
    """The standard-library modules (packages walked into submodules) that make up a split, sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED_PACKAGES or (name in HELDOUT_PACKAGES) != (split == "heldout"):
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        names.append(name)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{name}.", onerror=lambda _: None):
            if ".test" not in info.name and not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(set(names))


def module_docstrings(name: str) -> list[str]:
    """The module's docstring, then those of its public classes, functions and methods, by name."""
    module = _quiet_import(name)
    if module is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching deprecated attributes (typing.io) warns
        return _docstrings_of(module, name)


def _docstrings_of(module, name: str) -> list[str]:
    docs = [module.__doc__]
    exported = set(getattr(module, "__all__", ()))
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != name and attr not in exported:
            continue  # imported from elsewhere; that module contributes it
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                if inspect.isroutine(member) or isinstance(member, (property, staticmethod, classmethod)):
                    docs.append(getattr(member, "__doc__", None))
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and len(d.strip()) >= MIN_DOC_CHARS]


# Reads the splits in a fresh interpreter and prints them as JSON (ASCII, whatever the locale).
_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_gqa_corpus", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
json.dump(module._collect_documents(), sys.stdout)
"""


@functools.cache
def _split_documents() -> dict[str, tuple[str, ...]]:
    """Both splits, read in a fresh interpreter: libraries imported into this one replace or add
    standard-library functions (torch replaces `inspect.getfile`, transformers adds methods to
    `logging.Logger`), which would change the text with what the caller happened to import."""
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, __file__], capture_output=True, text=True, check=True)
        return {split: tuple(docs) for split, docs in json.loads(done.stdout).items()}
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        logger.warning("could not read the standard library in a fresh interpreter (%s); reading it in this "
                       "one, where libraries imported before may change the text", error)  # fmt: skip
        return _collect_documents()


def _collect_documents() -> dict[str, tuple[str, ...]]:
    """Both splits, each docstring once; heldout drops any docstring that train also holds."""
    result: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    for split in SPLITS:  # train first
        docs = []
        for name in module_names(split):
            for doc in module_docstrings(name):
                if doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
        result[split] = tuple(docs)
    return result


def corpus_documents(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_split_documents()[split])


def corpus_text(split: str) -> str:
    """A split as one text: docstrings separated by blank lines."""
    return "\n\n".join(corpus_documents(split)) + "\n"


def write_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write `train.txt` and `heldout.txt` into out_dir (kept if already there) and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {split: out_dir / f"{split}.txt" for split in SPLITS}
    for split, path in paths.items():
        if path.is_file():
            continue
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(corpus_text(split), encoding="utf-8")
        os.replace(tmp, path)  # atomic: another process never sees half a file
        logger.info("wrote %s (%.0f KB)", path, path.stat().st_size / 1024)
    return paths


def _quiet_import(name: str):
    """Import a module with its warnings and prints swallowed; None when it cannot load here."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # platform-only modules raise ImportError; a few raise other things
            return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gqa.convert.corpus OUT_DIR")
    for split, path in write_corpus(sys.argv[1]).items():
        print(f"{split}: {path} ({path.stat().st_size / 1024:.0f} KB)")
