"""gqa as users install it: a wheel built from this checkout, installed (not editable) into a fresh
virtual environment, run from a directory outside the checkout.

The fresh environment gets gqa from the wheel alone; its dependencies (torch, transformers, ...)
are the test environment's own, reached through a .pth line, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from tiny import build_family_model, save_model

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with gqa installed from a freshly built wheel; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the package is made of, so no build/ folder from an earlier build is reused
    # and none is left in the checkout.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "convert", "train", "recipes"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(source)], root)
    assert built.returncode == 0, built.stderr
    wheel = next(root.glob("gqa-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # One namespace: nothing called convert/ or train/ lands in a user's site-packages.
    assert {n.split("/")[0] for n in names} == {"gqa", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}
    assert "gqa/recipes/smollm2-135m-mqa.yaml" in names and "gqa/recipes/accelerate/fsdp.yaml" in names

    venv = root / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root).returncode == 0
    fresh_site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    (fresh_site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)], root)
    assert installed.returncode == 0, installed.stderr
    return venv / "bin"


def test_wheel_install_lists_copies_and_runs_shipped_recipes_outside_the_checkout(installed, tmp_path):
    where = run([str(installed / "python"), "-c", "import gqa.convert, gqa.train, gqa.recipes; print(gqa.recipes.__file__)"], tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(installed.parent) in where.stdout and str(REPO) not in where.stdout  # the wheel's copy, not the checkout

    listed = run([str(installed / "gqa"), "recipes"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m-mqa" in listed.stdout and "tiny-cpu" in listed.stdout and "accelerate/fsdp" in listed.stdout

    copied = run([str(installed / "gqa"), "recipes", "cp", "tiny-cpu", "mine.yaml"], tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "mine.yaml").read_text() == (REPO / "recipes" / "tiny-cpu.yaml").read_text()
    again = run([str(installed / "gqa"), "recipes", "cp", "tiny-cpu", "mine.yaml"], tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    # The demo's recipe resolves by name and validates, from the installed package data.
    code = ("from gqa.train.demo import DEMO_RECIPE; from gqa.train.recipe import load_recipe, resolve_recipe; "
            "print(resolve_recipe(DEMO_RECIPE)); print(load_recipe(DEMO_RECIPE).batch.global_sequences)")  # fmt: skip
    demo = run([str(installed / "python"), "-c", code], tmp_path)
    assert demo.returncode == 0, demo.stderr
    path, batch = demo.stdout.split()
    assert Path(path).is_relative_to(installed.parent) and int(batch) > 0

    # `gqa train NAME` reaches the shipped recipe (and fails on the missing model it names, not the recipe).
    missing = run([str(installed / "gqa"), "train", "tiny-cpu", "model.path=no-such-model"], tmp_path)
    assert missing.returncode == 2 and "model.path: no-such-model is not a directory" in missing.stderr


def test_wheel_install_converts_a_tiny_model(installed, tmp_path):
    model = build_family_model("llama", kv=4, seed=3)
    save_model(model.config, model.state_dict(), tmp_path / "src")
    converted = run([str(installed / "gqa"), "convert", "src", "out", "--kv-heads", "2"], tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert "4 -> 2" in converted.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 2
    provenance = json.loads((tmp_path / "out" / "gqa_provenance.json").read_text())
    assert provenance["gqa_version"] == "0.1.0"  # the installed distribution's version, not a source-tree fallback
