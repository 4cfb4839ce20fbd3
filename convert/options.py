"""What a conversion is asked to do: `ConvertOptions`, and the vocabularies its fields take.

`ConvertOptions` is the one description of a conversion's options: each field's type, default,
help text and choices live here, and `gqa convert`'s flags are generated from it
(gqa.convert.commands), so the library and the command line cannot disagree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gqa.convert.errors import GQAError
from gqa.convert.modeldir import DTYPES as DTYPE_BY_NAME
from gqa.convert.heads import METHOD_HELP, METHODS
from gqa.convert.sizes import format_size, parse_size

GROUPINGS = ("contiguous", "similarity")
DTYPES = {"auto": None, **{name: DTYPE_BY_NAME[name] for name in ("bf16", "fp16", "fp32")}}  # --dtype's choices
@dataclass(frozen=True)
class Flag:
    """How a ConvertOptions field appears as a `gqa convert` flag. The flag is --NAME (the field's
    name with dashes); a bool that defaults to False is a switch, and one that defaults to True is
    the switch --no-NAME. Help is the field's description, with the default appended."""

    metavar: str | None = None
    choices: tuple[str, ...] = ()  # the values the field accepts; checked by the model, offered by the flag
    type: Callable[[str], Any] | None = None  # what the flag's text is parsed with; None: the field's type
    show: Callable[[Any], str] = str  # how the help shows the default
    cli: bool = True  # False: a library-only option, with no flag


def _size(value: Any) -> Any:
    return parse_size(value, "--shard-size") if isinstance(value, str) else value


def _path(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class ConvertOptions(BaseModel):
    """What one conversion is asked to do. Built with ConvertOptions(kv_heads=G, ...); a bad value
    raises GQAError (never pydantic's ValidationError) before anything is read or written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_heads: Annotated[int, Flag(metavar="G")] = Field(description="number of KV heads to keep")
    method: Annotated[str, Flag(choices=METHODS)] = Field(
        "mean", description="how heads of a group are merged: " + "; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items())
    )
    dtype: Annotated[str, Flag(choices=tuple(DTYPES))] = Field("auto", description="output dtype; auto keeps the source's")
    shard_size: Annotated[int, BeforeValidator(_size), Flag(type=str, show=format_size)] = Field(
        5_000_000_000, description="largest output shard, in bytes or with a unit: MB, GB (10^9 bytes), GiB (2^30 bytes)"
    )
    copy_tokenizer: bool = Field(True, description="copy tokenizer files to OUT")
    force: bool = Field(False, description="replace OUT if it exists (only once OUT is complete)")
    seed: int = Field(0, description="seed for --method random")
    grouping: Annotated[str, Flag(choices=GROUPINGS)] = Field(
        "contiguous",
        description="contiguous: heads 0..r-1 form group 0; similarity: group similar KV heads per layer "
        "(by calibration activations with --method aligned, else by weights) and renumber heads to match",
    )
    calibration: Annotated[str | None, BeforeValidator(_path), Flag(metavar="FILE")] = Field(
        None,
        description="text file for --method aligned, or stdlib-docs:train (the recipes' training text, about 280K "
        "SmolLM2 tokens: enough for 512 sequences of 512); default: docstrings of 22 Python standard-library modules",
    )
    calibration_sequences: int = Field(
        128,
        description="calibration sequences for --method aligned; fewer are faster and take less memory, "
        "and merge less well",
    )
    calibration_length: int = Field(512, description="tokens per calibration sequence")
    refine_steps: int = Field(
        0,
        description="aligned: after each layer's merge, Adam steps on its attention weights to match the source "
        "attention's output on the calibration tokens (0: none); each step runs the layer's attention forward and "
        "backward on --refine-batch sequences, so time grows with steps x batch",
    )
    refine_lr: float = Field(1e-3, description="learning rate of --refine-steps, cosine-decayed to 0")
    refine_batch: int = Field(
        4,
        description="calibration sequences per --refine-steps step; more fit held-out text better and cost "
        "proportionally more time",
    )
    device: str = Field(
        "auto",
        description="where --method aligned runs its calibration pass: auto (the GPU when torch sees one, "
        "else the CPU), cpu, cuda or cuda:N",
    )
    skip_space_check: bool = Field(
        False,
        description="write even when OUT's file system reports less free space than the output needs (as a "
        "compressing one may); a disk that fills up still stops the conversion and leaves nothing behind",
    )
    allow_same: Annotated[bool, Flag(cli=False)] = Field(
        False, description="allow G equal to the source's KV heads: an identity conversion"
    )

    @model_validator(mode="wrap")
    @classmethod
    def _as_gqa_error(cls, data: Any, handler) -> ConvertOptions:
        try:
            return handler(data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors())
            raise GQAError(f"bad conversion options: {problems}.") from None

    @model_validator(mode="after")
    def _checked(self) -> ConvertOptions:
        self.check()
        return self

    def check(self) -> None:
        """Raise GQAError for values no conversion can use. Construction runs it; convert() runs it
        again for options that skipped validation (model_construct, model_copy)."""
        for name, info in type(self).model_fields.items():
            choices = flag_of(info).choices
            value = getattr(self, name)
            if choices and value not in choices:
                raise GQAError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}.")
        if self.refine_steps < 0 or self.refine_lr <= 0 or self.refine_batch < 1:
            raise GQAError("--refine-steps must be at least 0, --refine-lr greater than 0 and --refine-batch at least 1.")
        if self.refine_steps and self.method != "aligned":
            raise GQAError("--refine-steps refines the calibration pass of --method aligned; add --method aligned.")


def flag_of(info) -> Flag:
    """The Flag of a ConvertOptions field (its FieldInfo); a field without one gets the plain flag."""
    return next((m for m in info.metadata if isinstance(m, Flag)), Flag())
