"""Recipes: validation with messages that name the key, overrides, and the derived plan."""

from __future__ import annotations

import re

import pytest
import yaml

from gqa.convert.errors import GQAError
from gqa.train.plan import plan_training
from gqa.train.recipe import Recipe, apply_overrides, flat_items, load_recipe, model_directory, recipe_from_dict
from train_helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
MINIMAL = {
    "model": {"path": "runs/m"},
    "data": {"train": "stdlib-docs:train", "block_size": 128},
    "budget": {"steps": 10},
    "batch": {"global_sequences": 16, "micro": 2},
    "output": {"dir": "runs/o"},
}


def recipe(*overrides: str) -> Recipe:
    return recipe_from_dict(apply_overrides(MINIMAL, list(overrides)))


def failure(*overrides: str) -> str:
    with pytest.raises(GQAError) as err:
        recipe(*overrides)
    return str(err.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    loaded = load_recipe(path)
    assert loaded.model.path and loaded.output.dir


def test_shipped_recipes_are_the_expected_set():
    names = {p.name for p in RECIPES}
    assert {"tiny-cpu.yaml", "smollm2-135m-mqa.yaml", "llama2-7b-gqa8.yaml", "olmo-1b-gqa4.yaml",
            "phi3-mini-gqa8.yaml", "qwen1.5-0.5b-gqa4.yaml"} <= names
    accelerate_configs = {p.name for p in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed-zero3.yaml", "two-node.yaml"} <= accelerate_configs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_list_and_comment_every_key(path):
    """Like litgpt's config hub: every key of the schema is present, each with a comment above it."""
    text = path.read_text()
    listed = set(flat_items(yaml.safe_load(text)))
    schema = set(flat_items(recipe().model_dump()))
    assert listed == schema
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*\w+:\s*\S", line):  # a key with a value
            assert lines[i - 1].strip().startswith("#"), f"no comment above: {line.strip()}"


def test_overrides_are_read_as_yaml_and_1e_minus_4_is_a_float():
    r = recipe("optimizer.lr=3e-4", "optimizer.betas=[0.8, 0.9]", "model.teacher=runs/src", "eval.max_blocks=null")
    assert r.optimizer.lr == 3e-4 and r.optimizer.betas == (0.8, 0.9)
    assert r.model.teacher == "runs/src" and r.eval.max_blocks is None


def test_unknown_key_is_named_with_a_suggestion():
    message = failure("optimizer.lrr=0.1")
    assert "optimizer.lrr: unknown key" in message and "did you mean optimizer.lr?" in message
    assert "bogus: unknown key" in failure("bogus=1")


def test_wrong_types_name_the_key():
    assert "budget.steps:" in failure("budget.steps=ten")
    assert "data.pack:" in failure("data.pack=[1]")
    assert "logging.trackers.0:" in failure("logging.trackers=[mlflow]")
    assert "precision:" in failure("precision=fp8")


@pytest.mark.parametrize("override", ["output.dir=''", "model.path='  '", "model.teacher=''", "model.tokenizer=''",
                                      "data.train=[]", "data.train=[a.txt, '']", "data.eval=[]", "data.cache_dir=''",
                                      "resume=''"])
def test_empty_names_are_refused_not_read_as_the_working_directory(override):
    # An empty output.dir or model.path is Path('') = '.': a run would write into, or read, the working directory.
    key = override.split("=")[0]
    assert re.search(rf"{re.escape(key)}: is an empty (name|list)", failure(override)), failure(override)
    assert recipe(override.split("=")[0] + "=null" if key in ("model.teacher", "model.tokenizer", "data.eval",
                                                               "data.cache_dir") else "seed=0")  # null still means the default


def test_a_home_path_means_the_users_home_as_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    r = recipe("model.path=~/m", "model.teacher=~/t", "model.tokenizer=~/tok", "output.dir=~/out", "data.cache_dir=~/c")
    assert (r.model.path, r.model.teacher, r.model.tokenizer) == (f"{tmp_path}/m", f"{tmp_path}/t", f"{tmp_path}/tok")
    assert (r.output.dir, r.data.cache_dir) == (f"{tmp_path}/out", f"{tmp_path}/c")
    assert model_directory("model.path", r.model.path) == tmp_path / "m"
    assert recipe("model.path=runs/~m").model.path == "runs/~m"  # only a leading ~ is the home


def test_cross_field_rules():
    assert "exactly one of budget.steps, budget.tokens, budget.alpha" in failure("budget.tokens=100")
    assert "budget.alpha needs budget.pretrain_tokens" in failure("budget.steps=null", "budget.alpha=0.05")
    assert "loss.kind: distill needs model.teacher" in failure("loss.kind=distill")
    assert "schedule.min_lr_ratio" in failure("schedule.kind=linear", "schedule.min_lr_ratio=0.1")


def test_missing_required_key():
    raw = {k: v for k, v in MINIMAL.items() if k != "output"}
    with pytest.raises(GQAError, match="output: required key is missing"):
        recipe_from_dict(raw)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(GQAError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(GQAError, match="not valid YAML"):
        load_recipe(bad)


def test_plan_derives_accumulation_steps_and_tokens():
    plan = plan_training(recipe(), processes=2)
    assert (plan.accumulation, plan.global_batch, plan.tokens_per_step) == (4, 16, 16 * 128)
    assert (plan.steps, plan.total_tokens, plan.warmup_steps) == (10, 10 * 16 * 128, 0)  # round(0.05 * 10) = 0
    by_tokens = plan_training(recipe("budget.steps=null", "budget.tokens=100000"), processes=1)
    assert by_tokens.steps == 49 and by_tokens.accumulation == 8  # ceil(100000 / 2048)
    alpha = plan_training(
        recipe("budget.steps=null", "budget.alpha=0.05", "budget.pretrain_tokens=2000000", "batch.global_sequences=null",
               "batch.global_tokens=4096"),
        processes=1,
    )
    assert alpha.global_batch == 32 and alpha.steps == 25 and alpha.pretrain_fraction == pytest.approx(0.0512)
    text = alpha.describe()
    assert "accumulation  16" in text and "102,400" in text and "0.0512 of the source's 2,000,000" in text


def test_plan_rejects_batches_that_do_not_split():
    with pytest.raises(GQAError, match=r"batch\.global_sequences a multiple of 6"):
        plan_training(recipe("batch.micro=3"), processes=2)
    with pytest.raises(GQAError, match=r"batch\.global_tokens=1000 is not a multiple of data\.block_size=128"):
        plan_training(recipe("batch.global_sequences=null", "batch.global_tokens=1000"), processes=1)
    with pytest.raises(GQAError, match=r"budget\.stop_at_step=11 is past the end"):
        plan_training(recipe("budget.stop_at_step=11"), processes=1)


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_ones_accelerate_launch_reads(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert set(nested) <= launch_options, set(nested) - launch_options
    assert "gradient_accumulation_steps" not in nested  # gqa derives it from the recipe
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_version"] == 2
    if config.deepspeed_config:
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]


def test_shipped_recipes_run_by_name_and_paths_still_work(tmp_path):
    from gqa.train.recipe import resolve_recipe, shipped_recipes

    shipped = shipped_recipes()
    accelerate = {f"accelerate/{p.stem}" for p in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    assert set(shipped) == {p.stem for p in RECIPES} | accelerate
    assert load_recipe("tiny-cpu") == load_recipe(REPO / "recipes" / "tiny-cpu.yaml") == load_recipe("tiny-cpu.yaml")
    mine = tmp_path / "tiny-cpu"  # a file beside the user wins over the shipped recipe of the same name
    mine.write_text((REPO / "recipes" / "tiny-cpu.yaml").read_text().replace("steps: 30", "steps: 7"))
    assert resolve_recipe(mine) == mine and load_recipe(mine).budget.steps == 7
    with pytest.raises(GQAError, match=r"recipe no-such-recipe not found: .*smollm2-135m-mqa.*gqa recipes"):
        load_recipe("no-such-recipe")
