"""Recovery curves: held-out perplexity from step 0 against tokens trained, beside the original's figure."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.train import loop
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import prepare_data
from train_helpers import REPO, tiny_overrides, training_workspace

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
BLOCKS = 8  # eval.max_blocks: the held-out blocks every evaluation here scores
BLOCK = 64  # the tiny-cpu recipe's data.block_size

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    return training_workspace(tmp_path_factory.mktemp("recovery"))


def overrides(ws, out: Path, **extra) -> list[str]:
    common = {"budget.steps": 4, "eval.every": 2, "eval.max_blocks": BLOCKS, "checkpoint.every": 0}
    return tiny_overrides(ws.model, ws.train, ws.eval, out, ws.cache, **{**common, **extra})


def run(ws, out: Path, **extra):
    return run_recipe(RECIPE, overrides(ws, out, **extra))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evals(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "eval_perplexity" in r]


def baselines(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "baseline_eval_perplexity" in r]


def held_out_perplexity(ws, out: Path, model_dir: Path) -> float:
    """A model's perplexity on the run's held-out blocks, with the HF model's own loss (equal-length blocks)."""
    recipe = load_recipe(RECIPE, overrides(ws, out))
    data = prepare_data(recipe.data, AutoTokenizer.from_pretrained(ws.model), ws.model, recipe.seed)
    ids = torch.tensor(data.eval["input_ids"][:BLOCKS], dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@pytest.fixture(scope="module")
def self_baseline(ws, tmp_path_factory):
    """A run whose baseline is the converted model itself: its step-0 figure and the baseline's are one number."""
    out = tmp_path_factory.mktemp("self-baseline") / "out"
    return out, run(ws, out, **{"eval.baseline": ws.model})


def test_step_0_scores_the_untrained_model_and_the_baseline_on_the_same_blocks(ws, self_baseline):
    out, result = self_baseline
    rows = evals(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert [r["tokens"] for r in rows] == [0, 2 * result.plan.tokens_per_step, result.tokens_seen]
    assert [e["step"] for e in result.evals] == [0, 2, 4]
    # Step 0 comes before the first update: the untrained model's perplexity, computed here another way.
    assert rows[0]["eval_perplexity"] == pytest.approx(held_out_perplexity(ws, out, ws.model), rel=1e-5)
    # The baseline goes through the same blocks and the same function: the same model gives the same bits.
    (base,) = baselines(out)
    assert base["step"] == 0 and base["tokens"] == 0
    assert base["baseline_eval_perplexity"] == rows[0]["eval_perplexity"]
    assert base["baseline_eval_loss"] == rows[0]["eval_loss"]


def test_the_teacher_is_the_baseline_and_a_loaded_baseline_is_freed_before_training(ws, tmp_path, monkeypatch):
    loaded: list[tuple[str, weakref.ref]] = []
    load, step = loop._Run._load_frozen, loop._Run._step

    def load_and_watch(self, source, key, why):
        model = load(self, source, key, why)
        loaded.append((key, weakref.ref(model)))
        return model

    def first_step_checks(self, micro_batches):
        assert [key for key, _ in loaded] == ["model.teacher"]
        assert loaded[0][1]() is None, "the baseline is still in memory when training starts"
        return step(self, micro_batches)

    monkeypatch.setattr(loop._Run, "_load_frozen", load_and_watch)
    monkeypatch.setattr(loop._Run, "_step", first_step_checks)
    out = tmp_path / "lm"  # lm loss: the teacher is not otherwise loaded, so it is loaded for the baseline alone
    run(ws, out, **{"model.teacher": ws.teacher, "budget.steps": 1, "eval.every": 0})
    (base,) = baselines(out)
    assert base["baseline_eval_perplexity"] == pytest.approx(held_out_perplexity(ws, out, ws.teacher), rel=1e-5)


def test_distillation_scores_the_teacher_it_holds(ws, tmp_path, monkeypatch):
    loaded: list[str] = []
    load = loop._Run._load_frozen
    monkeypatch.setattr(loop._Run, "_load_frozen", lambda self, source, *args: loaded.append(source) or load(self, source, *args))
    out = tmp_path / "distill"
    run(ws, out, **{"model.teacher": ws.teacher, "loss.kind": "distill", "budget.steps": 1, "eval.every": 0})
    assert loaded == [str(ws.teacher)]  # once, for distillation; the baseline is the same model
    (base,) = baselines(out)
    assert base["baseline_eval_perplexity"] == pytest.approx(held_out_perplexity(ws, out, ws.teacher), rel=1e-5)


def test_a_resumed_run_does_not_repeat_step_0(ws, tmp_path):
    out = tmp_path / "out"
    extra = {"eval.baseline": ws.model, "checkpoint.every": 2}
    run(ws, out, **extra, **{"budget.stop_at_step": 2})
    assert [r["step"] for r in evals(out)] == [0, 2]
    resumed = run(ws, out, **extra)
    assert resumed.finished and [e["step"] for e in resumed.evals] == [4]
    assert [r["step"] for r in evals(out)] == [0, 2, 4]
    assert len(baselines(out)) == 1


def test_eval_at_start_false_leaves_step_0_out(ws, tmp_path):
    out = tmp_path / "out"
    run(ws, out, **{"eval.at_start": "false", "eval.baseline": ws.model, "budget.steps": 1, "eval.every": 0})
    assert [r["step"] for r in evals(out)] == [1] and baselines(out) == []


def test_a_baseline_that_is_no_checkpoint_fails_before_training(ws, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GQAError, match=r"eval\.baseline: .*empty holds no config\.json"):
        run(ws, tmp_path / "a", **{"eval.baseline": empty})
    with pytest.raises(GQAError, match=r"eval\.baseline: .*nowhere is neither a local checkpoint directory nor a hub id"):
        run(ws, tmp_path / "b", **{"eval.baseline": tmp_path / "nowhere"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
