"""Bad recipes, generated: wrong types, out-of-range values, unknown keys, contradicting keys and global batches
the processes cannot split are each refused before a model is loaded, with a message that names the key, from
Python (run_recipe) and from the command line (`gqa train`, exit code 2, no traceback).

The rules below are written out from the meaning of each key, not read from the schema, so a bound dropped from
train/recipe.py is still drawn here and caught.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import string
from dataclasses import dataclass

import pytest
import transformers
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gqa.train.loop as loop
from gqa.convert.errors import GQAError
from gqa.train import cli
from gqa.train.api import run_recipe
from gqa.train.recipe import Recipe, flat_items
from tiny import tiny_llama_config
from train_helpers import REPO

# Deterministic and bounded: the same examples on every run and machine, no example database.
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
CONTEXT = 256  # the tiny model's max_position_embeddings

# --- the rules, key by key ------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    kind: str  # int, float, bool, str, choice, strs (a str or a list of them), list, pair, size
    optional: bool = False  # null is a value
    outside: st.SearchStrategy | None = None  # values of the right type outside the key's range
    edges: tuple = ()  # the first values past each bound: where a bound off by one lets a value through
    choices: tuple[str, ...] = ()


def whole(at_least: int, optional: bool = False) -> Key:
    return Key("int", optional=optional, outside=st.integers(max_value=at_least - 1), edges=(at_least - 1,))


def optional_whole(at_least: int) -> Key:
    return whole(at_least, optional=True)


NOT_FINITE = (math.nan, math.inf, -math.inf)


def number(above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None, optional: bool = False) -> Key:
    """A float key with its bounds: above/below are open, at_least/at_most closed."""
    outside, edges = [], list(NOT_FINITE)
    if above is not None:
        outside.append(st.floats(max_value=above, allow_nan=False, allow_infinity=False))
        edges.append(above)
    if at_least is not None:
        outside.append(st.floats(max_value=at_least, exclude_max=True, allow_nan=False, allow_infinity=False))
        edges.append(math.nextafter(at_least, -math.inf))
    if below is not None:
        outside.append(st.floats(min_value=below, allow_nan=False, allow_infinity=False))
        edges.append(below)
    if at_most is not None:
        outside.append(st.floats(min_value=at_most, exclude_min=True, allow_nan=False, allow_infinity=False))
        edges.append(math.nextafter(at_most, math.inf))
    return Key("float", optional=optional, outside=st.one_of(outside), edges=tuple(edges))


def choice(*names: str) -> Key:
    return Key("choice", choices=names)


SHAPES = ("cosine", "linear", "constant")
KEYS: dict[str, Key] = {
    "model.path": Key("str"),
    "model.teacher": Key("str", optional=True),
    "model.tokenizer": Key("str", optional=True),
    "data.train": Key("strs"),
    "data.eval": Key("strs", optional=True),
    "data.eval_fraction": number(above=0, below=1),
    "data.text_field": Key("str"),
    "data.hub_config": Key("str", optional=True),
    "data.train_split": Key("str"),
    "data.eval_split": Key("str"),
    "data.block_size": whole(2),
    "data.pack": Key("bool"),
    "data.cache_dir": Key("str", optional=True),
    "data.num_proc": whole(1),
    "data.streaming": Key("bool"),
    "data.shuffle_buffer": whole(1),
    "data.eval_blocks": whole(1),
    "data.reader_timeout": number(above=0),
    "budget.steps": optional_whole(1),
    "budget.tokens": optional_whole(1),
    "budget.alpha": number(above=0, at_most=1, optional=True),
    "budget.pretrain_tokens": optional_whole(1),
    "budget.stop_at_step": optional_whole(1),
    "batch.global_sequences": optional_whole(1),
    "batch.global_tokens": optional_whole(1),
    "batch.micro": whole(1),
    "optimizer.lr": number(above=0),
    "optimizer.betas": Key("pair", outside=st.one_of(  # AdamW takes each in [0, 1)
        st.tuples(st.floats(min_value=1, allow_nan=False, allow_infinity=False), st.just(0.95)),
        st.tuples(st.just(0.9), st.floats(max_value=0, exclude_max=True, allow_nan=False, allow_infinity=False)),
    ).map(list), edges=([1.0, 0.95], [0.9, -5e-324], [math.nan, 0.95])),
    "optimizer.eps": number(above=0),
    "optimizer.weight_decay": number(at_least=0),
    "optimizer.max_grad_norm": number(above=0, optional=True),
    "schedule.kind": choice(*SHAPES),
    "schedule.warmup_steps": optional_whole(0),
    "schedule.warmup_fraction": number(at_least=0, below=1),
    "schedule.min_lr_ratio": number(at_least=0, below=1),
    "train.params": choice("all", "attention", "kv", "lora"),
    "train.gradient_checkpointing": Key("bool"),
    "train.lora.rank": whole(1),
    "train.lora.alpha": number(above=0),
    "train.lora.dropout": number(at_least=0, below=1),
    "train.lora.targets": Key("list", optional=True),
    "train.lora.train_kv": Key("bool"),
    "loss.kind": choice("lm", "distill"),
    "loss.temperature": number(above=0),
    "loss.distill_weight": number(at_least=0, at_most=1),
    "eval.every": whole(0),
    "eval.max_blocks": optional_whole(1),
    "eval.at_start": Key("bool"),
    "eval.baseline": Key("str", optional=True),
    "eval.tasks": Key("list"),
    "eval.task_paths": Key("list"),
    "eval.task_limit": optional_whole(1),
    "eval.num_fewshot": optional_whole(0),
    "checkpoint.every": whole(0),
    "checkpoint.keep": whole(1),
    "logging.trackers": Key("list", edges=(["mlflow"],)),  # the trackers gqa knows, only
    "logging.every": whole(1),
    "logging.project": Key("str"),
    "output.dir": Key("str"),
    # what save_pretrained reads: a whole number and KB/MB/GB/KiB/MiB/GiB, more than zero
    "output.max_shard_size": Key("size", edges=("5.5GB", "5TB", "0GB", "GB", "lots", "5 GB", "-1MB")),
    "output.dtype": choice("auto", "float32", "bfloat16", "float16"),
    "precision": choice("bf16", "fp16", "fp32"),
    "resume": Key("str"),
    "seed": Key("int", outside=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),  # numpy's range
                edges=(-1, 2**32)),
}
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in KEYS if "." in key} | {"train.lora"})
REQUIRED = ["model", "data", "budget", "batch", "output", "model.path", "data.train", "output.dir"]

WORDS = st.text(alphabet=string.ascii_letters + string.digits + " _-/.:", max_size=10)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), WORDS)
NESTED = st.dictionaries(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=5), SCALARS, max_size=2)
FRACTIONAL = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())


def wrong_types(key: Key) -> st.SearchStrategy:
    """Values of a type the key never takes, whatever their range."""
    non_strings = [st.integers(), st.floats(allow_nan=False), st.booleans(), NESTED]
    kinds = {
        "int": [st.booleans(), WORDS, FRACTIONAL, st.lists(st.integers(), max_size=2), NESTED],
        "float": [st.booleans(), WORDS, st.lists(st.floats(allow_nan=False), max_size=2), NESTED],
        "bool": [st.integers(), st.floats(allow_nan=False), WORDS, st.lists(st.booleans(), max_size=2), NESTED],
        "str": [*non_strings, st.lists(WORDS, max_size=2)],
        "size": [*non_strings, st.lists(WORDS, max_size=2)],
        "choice": [st.integers(), st.booleans(), st.lists(WORDS, max_size=2), NESTED],
        "strs": [*non_strings, st.lists(st.integers(), min_size=1, max_size=2)],
        "list": [*non_strings, WORDS, st.lists(st.integers(), min_size=1, max_size=2)],
        "pair": [st.floats(allow_nan=False), WORDS, NESTED, st.lists(st.floats(0, 0.9), min_size=3, max_size=4),
                 st.lists(st.floats(0, 0.9), max_size=1), st.tuples(st.booleans(), st.just(0.9)).map(list),
                 st.tuples(st.just(0.9), WORDS).map(list)],
    }[key.kind]
    if key.kind == "choice":  # a word that names no choice
        kinds.append(WORDS.filter(lambda w: w not in key.choices))
    if not key.optional:
        kinds.append(st.none())
    return st.one_of(kinds)


def out_of_range(key: Key) -> st.SearchStrategy | None:
    ranges = [s for s in (key.outside, st.sampled_from(key.edges) if key.edges else None) if s is not None]
    return st.one_of(ranges) if ranges else None


def bad_value(name: str) -> st.SearchStrategy:
    key = KEYS[name]
    outside = out_of_range(key)
    if outside is None:
        return wrong_types(key)
    # Half the draws out of range: in a one_of the range would be one branch among the many wrong types.
    return st.booleans().flatmap(lambda out: outside if out else wrong_types(key))


# --- the workspace and the entries --------------------------------------------------------------------


def as_yaml(value) -> str:
    """YAML text that reads back as exactly `value` (strings always quoted, so "1e5" stays a string)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{as_yaml(k)}: {as_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) else repr(value)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A model directory holding only a config.json: loading weights from it would fail loudly. The base recipe
    is the shipped tiny-cpu one pointed at it; the spies below make any start of data or model loading fail."""
    root = tmp_path_factory.mktemp("bad-recipes")
    model = root / "model"
    tiny_llama_config(max_position_embeddings=CONTEXT).save_pretrained(model)
    base = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    base["model"]["path"] = str(model)
    base["output"]["dir"] = str(root / "out")
    base["logging"]["trackers"] = []
    base["eval"]["baseline"] = None
    return {"root": root, "model": model, "base": base}


class Loaded(AssertionError):
    """Raised by the spies: a bad recipe got as far as loading data or weights."""


@pytest.fixture(scope="module", autouse=True)
def spies():
    """Reaching the data, the model or the teacher means the recipe was accepted."""
    def refuse(*args, **kwargs):
        raise Loaded("the recipe was accepted: training began loading data or weights")

    with pytest.MonkeyPatch.context() as mp:
        for stage in ("_setup_data", "_setup_model", "_load_frozen"):
            mp.setattr(loop._Run, stage, refuse)
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)  # the class every module imports
        yield


def recipe_file(ws, tree: dict) -> str:
    path = ws["root"] / "recipe.yaml"
    path.write_text(as_yaml(tree) + "\n")
    return str(path)


def named(key: str, message: str) -> bool:
    """`key` appears as a whole dotted key (data.eval is not named by data.eval_fraction)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


def python_refusal(ws, tree: dict, overrides: list[str]) -> str:
    with pytest.raises(GQAError) as err:  # anything else (Loaded, a ValueError) fails the property
        run_recipe(recipe_file(ws, tree), overrides)
    return str(err.value)


def cli_refusal(ws, tree: dict, overrides: list[str], *options: str) -> str:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", recipe_file(ws, tree), *overrides, *options])
    text = stderr.getvalue()
    assert rc == 2, text
    assert text.startswith("gqa train: error: ") and "Traceback" not in text, text
    return text


def assert_refused(ws, tree: dict, overrides: list[str], keys: list[str]) -> None:
    """Refused from Python and from the command line, each message naming every key."""
    for message in (python_refusal(ws, tree, overrides), cli_refusal(ws, tree, overrides)):
        missing = [key for key in keys if not named(key, message)]
        assert not missing, f"{missing} not named in: {message}"


def with_values(base: dict, values: dict[str, object]) -> dict:
    tree = json.loads(json.dumps(base))  # a deep copy
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def split(values: dict[str, object], in_file: list[bool]) -> tuple[dict, list[str]]:
    """Some values written into the recipe file, the others given as key=value overrides."""
    file_values = {k: v for (k, v), f in zip(values.items(), in_file) if f}
    overrides = [f"{k}={as_yaml(v)}" for (k, v), f in zip(values.items(), in_file) if not f]
    return file_values, overrides


# --- the properties ----------------------------------------------------------------------------------------


def test_every_recipe_key_has_a_rule_here():
    """A key added to the recipe must get its rule above, or its bad values go undrawn."""
    assert set(KEYS) == set(flat_items(Recipe.model_validate(
        {"model": {"path": "m"}, "data": {"train": "t"}, "budget": {"steps": 1}, "batch": {"micro": 1, "global_sequences": 1},
         "output": {"dir": "o"}}).model_dump()))


def test_the_base_recipe_is_accepted_and_stops_at_the_spies(ws):
    """Without this, every refusal below could come from a broken base recipe or unwired spies."""
    with pytest.raises(Loaded):
        run_recipe(recipe_file(ws, ws["base"]), [])


@st.composite
def bad_recipes(draw):
    """About half of all keys wrong at once: each example tries some 30 keys, and all must be named. (A failure
    shrinks to the one key that was let through.)"""
    names = [name for name in KEYS if draw(st.booleans(), label=f"{name} wrong")] or [draw(st.sampled_from(sorted(KEYS)))]
    values = {name: draw(bad_value(name), label=name) for name in names}
    return values, draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))


@PROPERTY
@given(bad_recipes())
def test_wrong_types_and_out_of_range_values_are_refused_naming_each_key(ws, case):
    values, in_file = case
    file_values, overrides = split(values, in_file)
    assert_refused(ws, with_values(ws["base"], file_values), overrides, list(values))


EDGES = [(name, edge) for name, key in KEYS.items() for edge in key.edges]


@pytest.mark.parametrize(("name", "edge"), EDGES, ids=[f"{n}={as_yaml(e)}" for n, e in EDGES])
def test_the_first_value_past_each_bound_is_refused(ws, name, edge):
    """The generated examples cluster, and may miss a bound off by one; these are each key's edges, all of them."""
    assert_refused(ws, ws["base"], [f"{name}={as_yaml(edge)}"], [name])


@PROPERTY
@given(st.sampled_from(SECTIONS), st.one_of(st.integers(), WORDS, st.booleans(), st.lists(st.integers(), max_size=2)),
       st.booleans())
def test_a_value_where_a_section_goes_is_refused_naming_the_section(ws, section, value, in_file):
    file_values, overrides = split({section: value}, [in_file])
    assert_refused(ws, with_values(ws["base"], file_values), overrides, [section])


def misspell(word: str, draw) -> str:
    i = draw(st.integers(0, len(word) - 1))
    edit = draw(st.sampled_from(["drop", "double", "swap", "replace", "case"]))
    if edit == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    if edit == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "case":
        return word[:i] + word[i].swapcase() + word[i + 1:]
    return word[:i] + draw(st.sampled_from(string.ascii_lowercase + "_")) + word[i + 1:]


def known_at(prefix: list[str]) -> set[str]:
    depth = len(prefix)
    return {k.split(".")[depth] for k in KEYS if k.split(".")[:depth] == prefix and len(k.split(".")) > depth}


@st.composite
def misspelled_keys(draw):
    """A real dotted key with one of its parts misspelled, the key that must be named, and a plausible value."""
    parts = draw(st.sampled_from(sorted(KEYS))).split(".")
    depth = draw(st.integers(0, len(parts) - 1))
    wrong = misspell(parts[depth], draw)
    if wrong in known_at(parts[:depth]):
        wrong += "s"  # a real neighbour (data.eval -> data.evals is not one either)
    while wrong in known_at(parts[:depth]):
        wrong += "x"
    spelled = parts[:depth] + [wrong] + parts[depth + 1:]
    value = draw(st.one_of(st.integers(1, 100), st.floats(0.01, 0.9), st.booleans(), WORDS))
    return ".".join(spelled), ".".join(spelled[:depth + 1]), value


@PROPERTY
@given(misspelled_keys(), st.booleans())
def test_unknown_keys_at_any_depth_are_refused_naming_the_key(ws, case, in_file):
    full, unknown, value = case
    file_values, overrides = split({full: value}, [in_file])
    for message in (python_refusal(ws, with_values(ws["base"], file_values), overrides),
                    cli_refusal(ws, with_values(ws["base"], file_values), overrides)):
        assert f"{unknown}: unknown key" in message, message


@PROPERTY
@given(st.sampled_from(sorted(KEYS)), st.sampled_from(["[", "{", "'", '"', "@", "`", "[1, {"]), WORDS)
def test_override_values_that_are_not_yaml_are_refused_naming_the_key(ws, key, opener, rest):
    assert_refused(ws, ws["base"], [f"{key}={opener}{rest}"], [key])


POSITIVE = st.integers(1, 10**6)


@st.composite
def contradictions(draw):
    """(values, keys the message must name): combinations that each key alone allows and the recipe forbids."""
    kind = draw(st.sampled_from(["budget", "batch", "alpha", "distill", "min_lr", "warmup", "stop", "tokens",
                                 "context", "missing"]))
    if kind == "budget":  # exactly one of steps, tokens, alpha
        given_ = draw(st.sampled_from([(), ("steps", "tokens"), ("steps", "alpha"), ("tokens", "alpha"),
                                       ("steps", "tokens", "alpha")]))
        values = {"budget.steps": None, "budget.tokens": None, "budget.alpha": None, "budget.pretrain_tokens": 10**9}
        for name in given_:
            values[f"budget.{name}"] = draw(st.floats(0.001, 1) if name == "alpha" else POSITIVE)
        return values, [f"budget.{name}" for name in given_ or ("steps", "tokens", "alpha")]
    if kind == "batch":  # exactly one of global_sequences, global_tokens
        both = draw(st.booleans())
        values = {"batch.global_sequences": draw(POSITIVE) if both else None,
                  "batch.global_tokens": draw(POSITIVE) if both else None}
        return values, ["batch.global_sequences", "batch.global_tokens"]
    if kind == "alpha":
        return {"budget.steps": None, "budget.alpha": draw(st.floats(0.001, 1)), "budget.pretrain_tokens": None}, \
            ["budget.pretrain_tokens"]
    if kind == "distill":
        return {"loss.kind": "distill", "model.teacher": None}, ["model.teacher"]
    if kind == "min_lr":
        return {"schedule.kind": draw(st.sampled_from(["linear", "constant"])),
                "schedule.min_lr_ratio": draw(st.floats(0.001, 0.99))}, ["schedule.min_lr_ratio"]
    if kind == "warmup":
        steps = draw(st.integers(1, 1000))
        return {"budget.steps": steps, "schedule.warmup_steps": draw(st.integers(steps + 1, 10**6))}, \
            ["schedule.warmup_steps"]
    if kind == "stop":
        steps = draw(st.integers(1, 1000))
        return {"budget.steps": steps, "budget.stop_at_step": draw(st.integers(steps + 1, 10**6))}, ["budget.stop_at_step"]
    if kind == "tokens":  # tokens per step that are no whole number of blocks
        block = draw(st.integers(2, CONTEXT))
        tokens = draw(POSITIVE.filter(lambda t: t % block))
        return {"data.block_size": block, "batch.global_sequences": None, "batch.global_tokens": tokens}, \
            ["batch.global_tokens", "data.block_size"]
    if kind == "context":  # blocks longer than the model reads
        return {"data.block_size": draw(st.integers(CONTEXT + 1, 10**6))}, ["data.block_size"]
    key = draw(st.sampled_from(REQUIRED))
    return {key: "MISSING"}, [key]


def without(tree: dict, key: str) -> dict:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[leaf]
    return tree


@PROPERTY
@given(contradictions(), st.booleans())
def test_contradicting_keys_are_refused_naming_them(ws, case, in_file):
    values, keys = case
    missing = [k for k, v in values.items() if v == "MISSING"]
    if missing:  # a required key left out of the file
        tree, overrides = without(json.loads(json.dumps(ws["base"])), missing[0]), []
    else:
        file_values, overrides = split(values, [in_file] * len(values))
        tree = with_values(ws["base"], file_values)
    assert_refused(ws, tree, overrides, keys)


@st.composite
def unsplittable_batches(draw, processes: st.SearchStrategy):
    """(processes, overrides, keys to name): a global batch that micro batches on all processes do not divide."""
    n = draw(processes)
    micro = draw(st.integers(1, 64))
    sequences = draw(st.integers(1, 4096).filter(lambda g: g % (micro * n)))
    if draw(st.booleans()):
        values = {"batch.global_sequences": sequences, "batch.global_tokens": None, "batch.micro": micro}
        global_key = "batch.global_sequences"
    else:
        values = {"batch.global_sequences": None, "batch.global_tokens": sequences * 64, "batch.micro": micro}
        global_key = "batch.global_tokens"
    return n, values, ["batch.micro", global_key]


@PROPERTY
@given(unsplittable_batches(st.just(1)), st.booleans())
def test_a_batch_one_process_cannot_split_is_refused_by_training(ws, case, in_file):
    _, values, keys = case
    file_values, overrides = split(values, [in_file] * len(values))
    assert_refused(ws, with_values(ws["base"], file_values), overrides, keys)


@PROPERTY
@given(unsplittable_batches(st.integers(2, 64)), st.booleans())
def test_a_batch_the_launchers_processes_cannot_split_is_refused_by_the_plan(ws, case, from_environment):
    """--plan counts the processes as training does under a launcher: WORLD_SIZE, or --processes."""
    n, values, keys = case
    _, overrides = split(values, [False] * len(values))
    with pytest.MonkeyPatch.context() as mp:
        if from_environment:
            mp.setenv("WORLD_SIZE", str(n))
            options = ["--plan"]
        else:
            mp.delenv("WORLD_SIZE", raising=False)
            options = ["--plan", f"--processes={n}"]
        message = cli_refusal(ws, ws["base"], overrides, *options)
    assert all(named(key, message) for key in keys) and f"on {n} process(es)" in message, message


@PROPERTY
@given(st.integers(-3, 20).filter(lambda g: g not in (1, 2, 4)))
def test_kv_heads_that_do_not_divide_are_refused_naming_the_option(ws, kv_heads):
    """--plan --source plans a conversion of the tiny model's 8 KV heads; only 1, 2 and 4 split them."""
    message = cli_refusal(ws, ws["base"], [], "--plan", "--source", str(ws["model"]), f"--kv-heads={kv_heads}")
    assert f"--kv-heads {kv_heads}" in message or f"--kv-heads must be at least 1, got {kv_heads}" in message, message

