"""The Python API of uptraining, for the demo and for scripts.

    from gqa.train.api import run_recipe, write_corpus
    result = run_recipe("tiny-cpu", ["model.path=runs/tiny-gqa", "output.dir=runs/tiny-trained"])
    result.final_eval["perplexity"], result.output_dir
"""

from __future__ import annotations

from pathlib import Path

from gqa.convert.corpus import write_corpus
from gqa.train.loop import TrainResult, train
from gqa.train.recipe import Recipe, load_recipe, resolve_recipe, shipped_recipes

__all__ = ["TrainResult", "Recipe", "load_recipe", "resolve_recipe", "run_recipe", "shipped_recipes", "write_corpus", "train"]


def run_recipe(recipe: str | Path, overrides: list[str] | None = None, check_memory: bool = True) -> TrainResult:
    """Load a recipe (a YAML file or a shipped recipe's name), apply `key=value` overrides, validate,
    train; raises GQAError on bad input, and on CUDA when the memory plan does not fit the device
    (unless check_memory is False)."""
    path = resolve_recipe(recipe)
    return train(load_recipe(path, overrides), recipe_file=str(path), check_memory=check_memory)
