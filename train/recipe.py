"""The uptraining recipe: a YAML file, validated into one frozen object before anything heavy starts.

Every key, its type and its default is listed in the `tiny-cpu` recipe; the classes below are the
source of truth. Unknown keys and wrong types are errors that name the key. `key=value` overrides
(dotted paths, values parsed as YAML) are merged in before validation.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gqa.convert.errors import GQAError

SHIPPED_PACKAGE = "gqa.recipes"


class _Section(BaseModel):
    # strict: YAML has already typed every value, so `true` or "10" where a number goes and `yes` or 1 where a
    # switch goes are mistakes to name, not values to coerce (lax pydantic would read them as 1, 10, True, True).
    # No .inf or .nan: no key is meant to take them, and .inf passes every lower bound (lr, max_grad_norm, temperature).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_floats_are_integers(cls, value: Any, info) -> Any:
        """`tokens: 2e9` is how one writes two billion: a whole float is accepted where an integer goes."""
        if isinstance(value, float) and value.is_integer() and int in _members(cls.model_fields[info.field_name].annotation):
            return int(value)
        return value


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types a field's annotation admits: (int, NoneType) for `int | None`, (int,) for `int`."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _refuse_blank(value: Any) -> Any:
    """A name that names nothing: an empty output.dir or model.path would be read as the working directory,
    and an empty data.train list as no data at all, which fail much later or write where nobody asked."""
    if isinstance(value, list) and not value:
        raise PydanticCustomError("blank", "is an empty list; name at least one")
    if any(not name.strip() for name in ([value] if isinstance(value, str) else value or [])):
        raise PydanticCustomError("blank", "is an empty name; it must name something")
    return value


def _expand_home(value: Any) -> Any:
    """~/runs/x as the shell would read it (a recipe file is not read by a shell), so a path means the same
    written in a recipe, in an override or on gqa convert's command line."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


# AdamW's coefficients: torch refuses anything outside [0, 1), but only once the model is loaded.
Beta = Annotated[StrictFloat, Field(ge=0, lt=1)]


class ModelSection(_Section):
    path: str  # the converted checkpoint directory (what `gqa convert` wrote)
    teacher: str | None = None  # the source checkpoint; the teacher when loss.kind is distill, and eval's baseline
    tokenizer: str | None = None  # where to load the tokenizer from; default: model.path

    _named = field_validator("path", "teacher", "tokenizer")(_refuse_blank)
    _home = field_validator("path", "teacher", "tokenizer")(_expand_home)


class DataSection(_Section):
    train: str | list[str]  # files (.txt, .jsonl, .json, .parquet), glob patterns of them, a folder of them, a `datasets` dir, a hub id, or stdlib-docs:train
    eval: str | list[str] | None = None  # same kinds; None: hold out eval_fraction of the train documents
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    text_field: str = "text"
    hub_config: str | None = None  # dataset configuration name, for hub ids
    train_split: str = "train"  # split used from a hub dataset, a folder of data files or a saved DatasetDict
    eval_split: str = "validation"
    block_size: int = Field(1024, ge=2)
    pack: bool = True  # concatenate documents (EOS between) into full blocks; False: one padded document per block
    cache_dir: str | None = None  # tokenised, packed data lives here; default ~/.cache/gqa/data
    num_proc: int = Field(1, ge=1)  # processes for tokenisation (not streamed)
    streaming: bool = False  # read, tokenise and pack data.train on the fly instead of preparing all of it first
    shuffle_buffer: int = Field(1000, ge=1)  # streamed: blocks shuffled in seeded runs, ceil(N / files) consecutive blocks of each file at a time
    eval_blocks: int = Field(256, ge=1)  # streamed, no data.eval: blocks held out from the start of the stream
    reader_timeout: float = Field(300, gt=0)  # streamed: seconds without a batch before the reader process is started again (under NCCL's 10-minute collective timeout)

    _named = field_validator("train", "eval", "text_field", "hub_config", "train_split", "eval_split", "cache_dir")(_refuse_blank)
    _home = field_validator("cache_dir")(_expand_home)


class BudgetSection(_Section):
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0, le=1)  # fraction of the source's pre-training tokens (paper: 0.05)
    pretrain_tokens: int | None = Field(None, gt=0)  # the source's pre-training tokens, for alpha and the report
    stop_at_step: int | None = Field(None, gt=0)  # end this invocation at this step (checkpointed), schedule unchanged

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSection:
        given = [k for k in ("steps", "tokens", "alpha") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of budget.steps, budget.tokens, budget.alpha (got {given or 'none'})")
        if self.alpha is not None and self.pretrain_tokens is None:
            raise ValueError("budget.alpha needs budget.pretrain_tokens (the source model's pre-training tokens)")
        return self


class BatchSection(_Section):
    global_sequences: int | None = Field(None, gt=0)  # sequences per optimizer step, all processes together
    global_tokens: int | None = Field(None, gt=0)  # or tokens per optimizer step (a multiple of data.block_size)
    micro: int = Field(1, gt=0)  # sequences per forward pass on each process

    @model_validator(mode="after")
    def _one_size(self) -> BatchSection:
        if (self.global_sequences is None) == (self.global_tokens is None):
            raise ValueError("give exactly one of batch.global_sequences and batch.global_tokens")
        return self


class OptimizerSection(_Section):
    lr: float = Field(1e-4, gt=0)  # 0 would spend the whole budget changing nothing
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), strict=False)  # not strict: YAML gives a list, not a tuple
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)  # applied to matrices only, never to norms or biases
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; None: no clipping


class ScheduleSection(_Section):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_fraction when set
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)  # cosine only: the floor as a fraction of lr

    @model_validator(mode="after")
    def _min_lr_for_cosine(self) -> ScheduleSection:
        if self.min_lr_ratio and self.kind != "cosine":
            raise ValueError("schedule.min_lr_ratio applies to schedule.kind: cosine only")
        return self


class LoraSection(_Section):
    """train.params: lora. Low-rank adapters (peft) on `targets`, merged into the weights on save."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # adapters are scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None  # module names (q_proj, ...); None: the family's q and o projections (k, v too without train_kv)
    train_kv: bool = True  # the merged key/value projections train fully (the merge changed them), no adapters on them; fused qkv: all of it


class TrainSection(_Section):
    params: Literal["all", "attention", "kv", "lora"] = "all"  # which parameters train (the paper: all); lora: see LoraSection
    gradient_checkpointing: bool = False
    lora: LoraSection = LoraSection()


class LossSection(_Section):
    kind: Literal["lm", "distill"] = "lm"
    temperature: float = Field(2.0, gt=0)  # distill: softmax temperature for teacher and student
    distill_weight: float = Field(0.5, ge=0, le=1)  # distill: loss = (1-w) * lm + w * T^2 * KL(teacher || student)


class EvalSection(_Section):
    every: int = Field(0, ge=0)  # evaluate every N optimizer steps; 0: only at the end
    max_blocks: int | None = Field(None, gt=0)  # evaluate on the first N held-out blocks; None: all of them
    # A fresh run evaluates once before its first update (step 0), where the recovery curve starts, and scores
    # the baseline there; a resumed run does not (its step 0 is in metrics.jsonl already).
    at_start: bool = True
    # The original's figure: a model dir, .gguf file or hub id scored at step 0 on the same held-out blocks.
    # None: model.teacher when it is set (the distillation teacher already in memory is reused), else no baseline.
    baseline: str | None = None
    # lm-eval tasks scored at every evaluation, step 0 and the baseline included, as `gqa eval --tasks` scores
    # them (same seed and defaults): the recovery curve in task accuracy. Needs gqa[eval]; not under FSDP/ZeRO-3.
    tasks: list[str] = []
    task_paths: list[str] = []  # folders of local task YAMLs (lm-eval's include path)
    task_limit: int | None = Field(200, gt=0)  # items per task at each evaluation; None: all of them
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own default


class CheckpointSection(_Section):
    every: int = Field(0, ge=0)  # save a resumable checkpoint every N steps; 0: never (except at stop_at_step)
    keep: int = Field(2, gt=0)  # keep the newest N checkpoints


class LoggingSection(_Section):
    trackers: list[Literal["tensorboard", "wandb", "trackio"]] = ["tensorboard"]
    every: int = Field(10, gt=0)  # log every N optimizer steps
    project: str = "gqa-uptrain"  # tracker project name


class OutputSection(_Section):
    dir: str  # the trained model lands here; checkpoints/ and logs/ live inside it
    max_shard_size: str = "5GB"  # safetensors shard size of the final model: a whole number and KB, MB, GB, KiB, MiB or GiB
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the input checkpoint's dtype

    _named = field_validator("dir")(_refuse_blank)
    _home = field_validator("dir")(_expand_home)

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        # What save_pretrained reads; checked here, since it reads it only after the last step.
        if not re.fullmatch(r"0*[1-9][0-9]*[KMG]i?B", value, re.IGNORECASE):
            raise ValueError(f"output.max_shard_size: {value!r} is not a size save_pretrained reads; write a whole "
                             "number and a unit, e.g. 5GB, 500MB or 2GiB")
        return value


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    budget: BudgetSection
    batch: BatchSection
    output: OutputSection
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    loss: LossSection = LossSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    resume: str = "auto"  # auto: the newest checkpoint in output.dir if any; never; or a checkpoint path
    seed: int = Field(0, ge=0, lt=2**32)  # the range numpy's seed takes

    _named = field_validator("resume")(_refuse_blank)

    @model_validator(mode="after")
    def _teacher_for_distill(self) -> Recipe:
        if self.loss.kind == "distill" and not self.model.teacher:
            raise ValueError("loss.kind: distill needs model.teacher (the source checkpoint)")
        return self

    def run_identity(self) -> dict[str, Any]:
        """The keys that decide what a run computes; resuming into an output dir requires them unchanged.

        Left out: how the run is watched or paced (eval, checkpoint, logging, resume, stop_at_step)
        and how the final weights are stored.
        """
        identity = self.model_dump(mode="json", exclude={"eval", "checkpoint", "logging", "resume", "output"})
        identity["budget"].pop("stop_at_step")
        identity["data"].pop("cache_dir")
        identity["data"].pop("num_proc")
        identity["data"].pop("reader_timeout")
        # Keys a run's way of reading data leaves unused change nothing it computes.
        unused = ("eval_fraction",) if self.data.streaming else ("streaming", "shuffle_buffer", "eval_blocks")
        for key in unused:
            identity["data"].pop(key)
        if self.train.params != "lora":  # the adapters' settings are read only by train.params: lora
            identity["train"].pop("lora")
        return identity


# --- loading ---------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`, a trap in lr fields)."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML: `10`, `3e-4`, `[0.9, 0.95]`, `null`, `runs/x`."""
    return yaml.load(text, Loader=_RecipeLoader)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `a.b.c=value` overrides into a raw recipe dict (a copy); validation comes later."""
    merged = yaml.load(yaml.safe_dump(raw), Loader=_RecipeLoader) or {}  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GQAError(f"override {item!r} is not key=value; write for example budget.steps=100")
        *parents, leaf = key.strip().split(".")
        node = merged
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise GQAError(f"override {item!r}: {where} is a value, not a section")
            node = child
        try:
            node[leaf] = parse_value(value)
        except yaml.YAMLError as err:
            raise GQAError(f"override {item!r}: the value of {key.strip()} is not valid YAML ({getattr(err, 'problem', None) or err}); "
                           "quote a string as key='\"text\"'") from None
    return merged


def shipped_recipes() -> dict[str, Traversable]:
    """The recipes and accelerate configs installed with gqa, by name: `smollm2-135m-mqa`,
    `accelerate/fsdp`, ... (the package `gqa.recipes` is the repository's recipes/ folder)."""
    root = resources.files(SHIPPED_PACKAGE)
    found = {}
    for folder, prefix in ((root, ""), (root / "accelerate", "accelerate/")):
        if folder.is_dir():
            found.update({prefix + f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")})
    return dict(sorted(found.items()))


def recipe_description(recipe: Traversable) -> str:
    """The first sentence of a recipe's header comment."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        header.append(line.lstrip("# ").strip())
    return re.split(r"(?<=\.)\s|:\s", " ".join(header), maxsplit=1)[0]


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else the shipped recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = str(name_or_path).removesuffix(".yaml")
    if name in shipped:
        with resources.as_file(shipped[name]) as file:  # a real file for an installed wheel's data
            return Path(file)
    names = ", ".join(n for n in shipped if not n.startswith("accelerate/"))
    raise GQAError(f"recipe {name_or_path} not found: it is no file, nor one of the shipped recipes ({names}); "
                   "`gqa recipes` lists them")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge overrides into and validate a recipe (a YAML file, or the name of a shipped
    recipe); every error names the offending key."""
    path = resolve_recipe(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        raise GQAError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise GQAError(f"recipe {path} must be a YAML mapping of sections (model:, data:, ...)")
    return recipe_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def model_directory(key: str, path: str) -> Path:
    """The checkpoint directory a recipe's model key (model.path, model.teacher) names, checked. gqa train and
    --plan read both from disk and never download them, so whatever the spelling (runs/x, ./x, /x, owner/name),
    a path that is not a directory holding a config.json is refused here, before anything asks the hub."""
    directory = Path(path)
    if not directory.is_dir():
        if key == "model.path":
            raise GQAError(
                f"model.path: {path} is not a directory; gqa train reads the converted checkpoint from disk and never "
                f"downloads it: write it first with `gqa convert SOURCE {path} --kv-heads G`, or plan before "
                "converting with `gqa train RECIPE --plan --source SOURCE --kv-heads G`"
            )
        raise GQAError(f"{key}: {path} is not a directory; point it at a checkpoint directory on disk (gqa train "
                       "never downloads one; `hf download OWNER/NAME --local-dir DIR` fetches a hub model into DIR)")
    if not (directory / "config.json").is_file():
        raise GQAError(f"{key}: {path} holds no config.json; point it at a transformers checkpoint directory")
    return directory


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems: dict[str, list[str]] = {}  # key -> messages; a union type gives one message per member
        for error in err.errors():
            key, message = _describe_error(error)
            if message not in problems.setdefault(key, []):
                problems[key].append(message)
        lines = [f"{key}: {' or '.join(messages)}" if key else " or ".join(messages) for key, messages in problems.items()]
        raise GQAError(f"{source} is not a valid recipe:\n  " + "\n  ".join(lines)) from None


def _describe_error(error: dict[str, Any]) -> tuple[str, str]:
    """(dotted key, what is wrong) for one pydantic error."""
    parts = _key_path(error["loc"])
    key = ".".join(parts)
    if error["type"] == "extra_forbidden":
        known = _known_keys(parts[:-1])
        close = difflib.get_close_matches(parts[-1], known, n=1)
        hint = f"; did you mean {'.'.join(parts[:-1] + close)}?" if close else ""
        return key, f"unknown key (known here: {', '.join(known)}){hint}"
    if error["type"] == "missing":
        return key, "required key is missing"
    message = error["msg"]
    if message.startswith("Value error, "):  # cross-field checks name their keys themselves
        return "", message.removeprefix("Value error, ")
    got = error.get("input")
    return key, message + ("" if isinstance(got, dict) else f" (got {got!r})")


def _key_path(loc: tuple) -> list[str]:
    """The recipe key of an error location, without pydantic's union-member tags such as 'list[str]'."""
    parts: list[str] = []
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif model is not None and part in model.model_fields:
            parts.append(part)
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif model is not None:  # an unknown key inside a section
            parts.append(str(part))
            model = None
    return parts


def _known_keys(section: list[str]) -> list[str]:
    """Field names of the recipe section at a dotted path."""
    model: type[BaseModel] = Recipe
    for part in section:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def flat_items(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for comparing runs and for tracker hyper-parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_items(value, f"{name}."))
        else:
            flat[name] = value
    return flat
