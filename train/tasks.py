"""Downstream tasks through lm-evaluation-harness, for `gqa eval --tasks` and the loop's `eval.tasks`.

The model gqa already loaded is handed to lm-eval's own `HFLM` and scored by `simple_evaluate`, so
every figure is lm-eval's: nothing here scores an answer. The model and its baseline are scored with
one `TaskSettings`, so they see the same prompts, few-shot examples and items.

lm-eval is an optional extra (`pip install 'gqa[eval]'`); only this module imports it, when it runs.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gqa.convert.errors import GQAError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'gqa[eval]'  (or: pip install lm-eval)"
# lm-eval's default, so stderr figures of bootstrapped metrics match what lm-eval prints.
BOOTSTRAP_ITERS = 100000
DEFAULT_SEED = 1234  # lm-eval's own default seed for its samplers and few-shot draws


@dataclass(frozen=True)
class TaskSettings:
    """What decides a task score besides the model: one value for the model and its baseline."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None  # None: each task's own default (0 when it sets none)
    limit: int | float | None = None  # items per task (a fraction when < 1); None: all of them
    batch_size: int = 8
    seed: int = DEFAULT_SEED
    include_paths: tuple[str, ...] = ()  # folders of local task YAMLs (lm-eval's include path)
    bootstrap_iters: int = BOOTSTRAP_ITERS

    def __post_init__(self) -> None:
        if not self.tasks:
            raise GQAError("no tasks named: pass --tasks NAME[,NAME...] (lm-eval task or group names)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise GQAError(f"--num-fewshot {self.num_fewshot}: must be 0 or more")
        if self.limit is not None and self.limit <= 0:
            raise GQAError(f"--limit {self.limit}: must be positive (items per task, or a fraction below 1)")
        if self.batch_size < 1:
            raise GQAError(f"--batch-size {self.batch_size}: must be at least 1")
        for path in self.include_paths:
            if not Path(path).is_dir():
                raise GQAError(f"--task-path {path}: no such folder; pass a folder of lm-eval task YAML files")

    def describe(self) -> dict[str, Any]:
        """The settings as the report and the card state them."""
        return {**asdict(self), "tasks": list(self.tasks), "include_paths": [Path(p).name for p in self.include_paths]}


def lm_eval_version() -> str:
    lm_eval = _import_lm_eval()
    from importlib.metadata import version

    return getattr(lm_eval, "__version__", None) or version("lm_eval")


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise GQAError(f"tasks are scored by lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from err
    return lm_eval


def task_manager(settings: TaskSettings):
    """lm-eval's TaskManager over its own tasks and the include paths, with every name checked."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[*settings.include_paths, *_shipped_task_folder(settings)] or None)
    known = set(manager.all_tasks)
    for name in settings.tasks:
        if name in known or Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" or in --task-path {', '.join(settings.include_paths)}" if settings.include_paths else ""
        raise GQAError(f"--tasks {name}: lm-eval knows no such task{where}{hint} (`lm-eval ls tasks` lists them)")
    return manager


def _shipped_task_folder(settings: TaskSettings) -> list[str]:
    """The folder of gqa's offline tasks (gqa.train.docs_tasks), written once into the cache, when they
    are named and no include path holds them."""
    from gqa.convert.corpus import corpus_tag
    from gqa.convert.modeldir import cache_root
    from gqa.train.docs_tasks import TASK_NAMES, write_tasks

    wanted = set(settings.tasks) & set(TASK_NAMES)
    if not wanted or any((Path(p) / f"{name}.yaml").is_file() for p in settings.include_paths for name in wanted):
        return []
    folder = cache_root() / "tasks" / corpus_tag()
    if not all((folder / f"{name}.yaml").is_file() for name in TASK_NAMES):
        write_tasks(folder)
    return [str(folder)]


def run_tasks(model, tokenizer, settings: TaskSettings, manager=None) -> dict[str, Any]:
    """Score an already loaded causal LM on the tasks; per task: its metrics as lm-eval reports them.

    Returns {"tasks": {name: {"metrics": {metric: value, metric + "_stderr": value, ...},
    "higher_is_better": {...}, "samples": n, "num_fewshot": k, "version": v, "group": bool}},
    "lm_eval_version": ...}. Metric names drop lm-eval's ",none" filter suffix; other filters keep it.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(settings)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    seed = settings.seed
    # lm-eval seeds the global generators: a training caller's data order and dropout must not see it.
    with _generators_kept():
        try:
            out = lm_eval.simple_evaluate(
                wrapped, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
                task_manager=manager, bootstrap_iters=settings.bootstrap_iters, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )  # fmt: skip
        except (ConnectionError, OSError) as err:
            raise GQAError(
                f"the task data could not be loaded ({type(err).__name__}: {err}); lm-eval's standard tasks download "
                "their data from the Hugging Face hub: on a machine without it, use local tasks (--task-path DIR)"
            ) from err
    return {"tasks": _by_task(out), "lm_eval_version": out.get("lm_eval_version") or lm_eval_version()}


@contextlib.contextmanager
def _generators_kept():
    """Python's, numpy's and torch's global random states (CUDA's too) as they were on entry."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _by_task(out: dict[str, Any]) -> dict[str, Any]:
    groups = {name for name, members in (out.get("group_subtasks") or {}).items() if members}
    tasks = {}
    for name, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, name, sample_len, and "N/A" stderrs
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        samples = (out.get("n-samples") or {}).get(name) or {}
        tasks[name] = {
            "metrics": metrics,
            "higher_is_better": (out.get("higher_is_better") or {}).get(name, {}),
            "samples": samples.get("effective", row.get("sample_len")),
            "num_fewshot": (out.get("n-shot") or {}).get(name),
            "version": (out.get("versions") or {}).get(name),
            "group": name in groups,
        }
    return tasks


def headline_metrics(task: dict[str, Any]) -> list[str]:
    """The metrics of a task worth a column: every one lm-eval reports, without their stderrs."""
    return [m for m in task["metrics"] if not m.endswith("_stderr") and "_stderr," not in m]


def compare(model_tasks: dict[str, Any], baseline_tasks: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per task and metric: the model's value and stderr, the baseline's, and their ratio."""
    rows = []
    for name, task in model_tasks.items():
        base = (baseline_tasks or {}).get(name)
        for metric in headline_metrics(task):
            value = task["metrics"][metric]
            base_value = base["metrics"].get(metric) if base else None
            rows.append({
                "task": name,
                "metric": metric,
                "model": value,
                "model_stderr": task["metrics"].get(_stderr_key(metric)),
                "baseline": base_value,
                "baseline_stderr": base["metrics"].get(_stderr_key(metric)) if base else None,
                "ratio": value / base_value if base_value else None,
                "higher_is_better": task["higher_is_better"].get(metric.split(",")[0]),
                "samples": task["samples"],
                "num_fewshot": task["num_fewshot"],
            })
    return rows


def _stderr_key(metric: str) -> str:
    name, _, filt = metric.partition(",")
    return f"{name}_stderr" + (f",{filt}" if filt else "")


def parse_task_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`hellaswag,arc_easy` (or a list) -> ("hellaswag", "arc_easy"); duplicates dropped, order kept."""
    if not text:
        return ()
    parts = text.split(",") if isinstance(text, str) else [p for item in text for p in str(item).split(",")]
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
