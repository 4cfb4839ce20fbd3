"""Recovery curves: held-out perplexity from step 0 against tokens trained, beside the original's figure."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.train import loop, report, setup
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import prepare_data
from gqa.train.evaluate import evaluate
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


def test_gqa_eval_report_draws_the_recovery_plot(ws, self_baseline, tmp_path):
    out, _ = self_baseline
    results = evaluate(out, None, [ws.eval], BLOCK, tmp_path / "report", contexts=(), update_card=False, progress=False)
    files = results["report_files"]
    assert Path(files["recovery"]) == tmp_path / "report" / "recovery.png" and Path(files["recovery"]).stat().st_size
    assert Path(files["training_curves"]).is_file()
    ax = only_panel(report.recovery_figure(metrics(out)))
    curve = ax.get_lines()[0]
    assert list(curve.get_xdata()) == [r["tokens"] for r in evals(out)]
    assert baseline_line(ax) == baselines(out)[0]["baseline_eval_perplexity"]


def only_panel(fig):
    (ax,) = fig.axes
    return ax


def baseline_line(ax) -> float | None:
    """The y of the panel's dashed line labelled "original", or None."""
    lines = [line for line in ax.get_lines() if line.get_label() == "original"]
    assert all(line.get_linestyle() == "--" for line in lines)
    return lines[0].get_ydata()[0] if lines else None


# Evaluations against tokens, with task scores as the loop records them.
RECORDS = [
    {"step": 1, "loss": 6.0, "lr": 1e-4, "tokens_seen": 1000},  # training rows are not recovery curves
    {"step": 0, "tokens": 0, "eval_loss": 4.5, "eval_perplexity": 90.0},
    {"step": 0, "tokens": 0, "baseline_eval_loss": 2.1, "baseline_eval_perplexity": 8.0},
    {"step": 0, "tokens": 0, "task/hellaswag/acc": 0.25, "task/arc_easy/acc": 0.3, "baseline_task/hellaswag/acc": 0.4},
    {"step": 10, "tokens": 1000, "eval_perplexity": 30.0, "task/hellaswag/acc": 0.3, "task/arc_easy/acc": 0.32},
    {"step": 20, "tokens": 2000, "eval_perplexity": 13.0, "task/hellaswag/acc": 0.35, "task/arc_easy/acc": 0.35},
    {"step": 20, "tokens": 2000, "eval_perplexity": 12.0},  # the same point again (a restart): the later wins
]


def test_one_recovery_panel_per_curve_with_its_baseline(tmp_path):
    fig = report.recovery_figure(RECORDS)
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert list(panels) == ["held-out perplexity", "task/arc_easy/acc", "task/hellaswag/acc"]
    curves = {label: ax.get_lines()[0] for label, ax in panels.items()}
    assert list(curves["held-out perplexity"].get_xdata()) == [0, 1000, 2000]
    assert list(curves["held-out perplexity"].get_ydata()) == [90.0, 30.0, 12.0]
    assert list(curves["task/hellaswag/acc"].get_ydata()) == [0.25, 0.3, 0.35]
    assert baseline_line(panels["held-out perplexity"]) == 8.0
    assert baseline_line(panels["task/hellaswag/acc"]) == 0.4
    assert baseline_line(panels["task/arc_easy/acc"]) is None
    # log-y where the values span more than 10x, the original's line included (90 down to 8), linear elsewhere
    assert [ax.get_yscale() for ax in panels.values()] == ["log", "linear", "linear"]
    plt.close(fig)

    assert report.plot_recovery(RECORDS, tmp_path / "recovery.png") == tmp_path / "recovery.png"
    assert (tmp_path / "recovery.png").stat().st_size
    # Nothing to draw without evaluations against tokens: no file.
    assert report.plot_recovery(RECORDS[:1], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_training_curves_draw_a_baseline_in_its_metrics_panel():
    fig = report.training_figure(RECORDS)
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert not any(label.startswith("baseline_") for label in panels) and "loss" in panels
    assert baseline_line(panels["eval_perplexity"]) == 8.0 and baseline_line(panels["task/arc_easy/acc"]) is None
    plt.close(fig)


def test_task_scores_follow_the_run_from_step_0_beside_the_baselines(ws, tmp_path):
    """eval.tasks: every evaluation scores the tasks as `gqa eval --tasks` does, the baseline at step 0, and
    the training steps are those of a run without tasks (lm-eval's seeding does not leak into training)."""
    pytest.importorskip("lm_eval", reason="lm-eval is installed by the test command (gqa[eval])")
    from test_eval_tasks import write_choice_task

    from gqa.train.tasks import TaskSettings

    folder = write_choice_task(tmp_path / "tasks")
    out = tmp_path / "out"
    result = run(ws, out, **{"eval.baseline": ws.model, "eval.tasks": "[tiny_choice]", "eval.task_paths": f"[{folder}]",
                             "eval.task_limit": 12})  # fmt: skip
    rows = evals(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(isinstance(r.get("task/tiny_choice/acc"), float) and "task/tiny_choice/acc_norm" in r for r in rows)
    baseline = baselines(out)[0]
    assert baseline["baseline_task/tiny_choice/acc_norm"] == rows[0]["task/tiny_choice/acc_norm"]  # the model itself
    alone = evaluate(ws.model, tasks=TaskSettings(("tiny_choice",), limit=12, include_paths=(str(folder),)),
                     contexts=(), update_card=False, progress=False)  # fmt: skip
    assert rows[0]["task/tiny_choice/acc_norm"] == alone["models"][0]["tasks"]["tiny_choice"]["metrics"]["acc_norm"]
    assert result.final_eval["tasks"]["task/tiny_choice/acc"] == rows[-1]["task/tiny_choice/acc"]
    plain = run(ws, tmp_path / "plain", **{"eval.baseline": ws.model})
    assert result.losses == plain.losses


def test_scoring_tasks_leaves_the_global_generators_as_they_were(ws, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is installed by the test command (gqa[eval])")
    from test_eval_tasks import write_choice_task

    from gqa.train.tasks import TaskSettings, run_tasks

    settings = TaskSettings(("tiny_choice",), limit=4, include_paths=(str(write_choice_task(tmp_path / "tasks")),))
    model = AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.float32)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    run_tasks(model, AutoTokenizer.from_pretrained(ws.model), settings)
    assert torch.equal(torch.rand(3), expected)


def test_tasks_are_refused_where_no_process_holds_the_whole_model(monkeypatch):
    from accelerate.utils import DistributedType

    recipe = load_recipe(RECIPE, ["model.path=unused", "eval.tasks=[tiny_choice]"])
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(deepspeed_plugin=None))
    with pytest.raises(GQAError, match="eval.tasks needs the whole model in one process"):
        setup.setup_tasks(recipe, sharded)
