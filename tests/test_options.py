"""ConvertOptions is the one source of `gqa convert`'s flags: names, defaults, help and checks."""

from __future__ import annotations

import argparse

import pytest
from tiny import build_family_model, save_model

import gqa.convert.commands as commands
from gqa.convert.convert import convert
from gqa.convert.errors import GQAError
from gqa.convert.options import ConvertOptions, flag_of
from gqa.convert.sizes import format_size
from gqa.train.cli import main

# The command line's contract: the flag each field has had since before the flags were generated.
FLAGS = {
    "kv_heads": "--kv-heads",
    "method": "--method",
    "dtype": "--dtype",
    "shard_size": "--shard-size",
    "copy_tokenizer": "--no-copy-tokenizer",
    "force": "--force",
    "seed": "--seed",
    "grouping": "--grouping",
    "calibration": "--calibration",
    "calibration_sequences": "--calibration-sequences",
    "calibration_length": "--calibration-length",
    "refine_steps": "--refine-steps",
    "refine_lr": "--refine-lr",
    "refine_batch": "--refine-batch",
    "device": "--device",
    "skip_space_check": "--skip-space-check",
}
LIBRARY_ONLY = {"allow_same"}


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gqa convert")
    commands.add_arguments(parser, "convert")
    return parser


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.fixture
def source(tmp_path):
    model = build_family_model("llama", kv=4)
    return save_model(model.config, model.state_dict(), tmp_path / "src")


@pytest.fixture
def captured(monkeypatch):
    """Replaces convert() in `gqa convert` with one that records its options and stops the run."""

    class Captured(Exception):
        pass

    seen: list[ConvertOptions] = []

    def fake_convert(source, out, options):
        seen.append(options)
        raise Captured

    monkeypatch.setattr(commands, "convert", fake_convert)
    return seen, Captured


def test_every_field_but_the_library_only_ones_has_exactly_one_flag_with_its_default():
    actions = option_actions(convert_parser())
    fields = ConvertOptions.model_fields
    assert set(fields) == set(FLAGS) | LIBRARY_ONLY, "a new field needs its flag named in FLAGS, or to be library-only"
    for name, info in fields.items():
        mine = [a for a in actions if a.dest == name]
        if name in LIBRARY_ONLY:
            assert not mine and not flag_of(info).cli, name
            continue
        assert len(mine) == 1, (name, [a.option_strings for a in mine])
        (action,) = mine
        assert action.option_strings == [FLAGS[name]], name
        assert action.required == info.is_required(), name
        if not info.is_required():
            assert action.default == info.default and type(action.default) is type(info.default), name
    assert sorted(a.dest for a in actions) == sorted(FLAGS), "a flag with no field behind it"


def test_help_shows_each_fields_default_and_choices():
    actions = {a.dest: a for a in option_actions(convert_parser())}
    for name, info in ConvertOptions.model_fields.items():
        if name in LIBRARY_ONLY:
            continue
        flag, action = flag_of(info), actions[name]
        assert action.help, name
        if flag.choices:
            assert action.metavar == "{" + ",".join(flag.choices) + "}", name
        if not info.is_required() and not isinstance(info.default, bool) and info.default is not None:
            assert action.help.endswith(f"(default {flag.show(info.default)})"), name
    assert actions["shard_size"].help.endswith("(default 5GB)")
    assert format_size(5_000_000_000) == "5GB" and format_size(2**31) == "2GiB" and format_size(1234) == "1234B"


def test_no_flags_build_the_default_options(source, tmp_path, captured):
    seen, stop = captured
    with pytest.raises(stop):
        main(["convert", str(source), str(tmp_path / "out"), "--kv-heads", "2"])
    assert seen == [ConvertOptions(kv_heads=2)]


def test_every_flag_reaches_its_field(source, tmp_path, captured):
    seen, stop = captured
    flags = ["--kv-heads", "1", "--method", "aligned", "--dtype", "bf16", "--shard-size", "20MB",
             "--no-copy-tokenizer", "--force", "--seed", "7", "--grouping", "similarity", "--calibration", "c.txt",
             "--calibration-sequences", "16", "--calibration-length", "64", "--refine-steps", "3",
             "--refine-lr", "0.01", "--refine-batch", "2", "--device", "cpu", "--skip-space-check"]  # fmt: skip
    with pytest.raises(stop):
        main(["convert", str(source), str(tmp_path / "out"), *flags])
    expected = ConvertOptions(
        kv_heads=1, method="aligned", dtype="bf16", shard_size=20_000_000, copy_tokenizer=False, force=True, seed=7,
        grouping="similarity", calibration="c.txt", calibration_sequences=16, calibration_length=64, refine_steps=3,
        refine_lr=0.01, refine_batch=2, device="cpu", skip_space_check=True,
    )  # fmt: skip
    assert seen == [expected]
    changed = {name for name in ConvertOptions.model_fields if getattr(expected, name) != getattr(ConvertOptions(kv_heads=2), name)}
    assert changed == set(FLAGS), "every flag is exercised with a value other than its default"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "bogus"], "unknown method 'bogus'; choose one of mean, first, random, aligned."),
        (["--grouping", "bogus"], "unknown grouping 'bogus'; choose one of contiguous, similarity."),
        (["--dtype", "fp8"], "unknown dtype 'fp8'; choose one of auto, bf16, fp16, fp32."),
        (["--shard-size", "lots"], "--shard-size: cannot read 'lots' as a size"),
        (["--shard-size", "0"], "--shard-size: '0' must be more than zero bytes"),
        (["--method", "aligned", "--refine-steps", "-1"], "--refine-steps must be at least 0"),
        (["--method", "aligned", "--refine-lr", "0"], "--refine-lr greater than 0"),
        (["--method", "aligned", "--refine-batch", "0"], "--refine-batch at least 1"),
        (["--refine-steps", "5"], "--refine-steps refines the calibration pass of --method aligned; add --method aligned."),
    ],
)
def test_a_bad_value_is_a_gqa_error_and_writes_nothing(flags, message, source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--kv-heads", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa convert: error: ") and message in err
    assert "Traceback" not in err and "validation error" not in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".gqa-tmp-" in p.name]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "bogus"}, "unknown method 'bogus'"),
        ({"refine_batch": 0}, "--refine-batch at least 1"),
        ({"kv_heads": "two"}, "kv_heads"),
        ({"colour": "red"}, "colour"),
        ({"kv_heads": None}, "kv_heads"),
    ],
)
def test_the_library_gets_gqa_errors_never_validation_errors(settings, message):
    with pytest.raises(GQAError, match=message):
        ConvertOptions(**{"kv_heads": 2, **settings})


def test_sizes_and_paths_are_read_as_the_command_line_reads_them(tmp_path):
    assert ConvertOptions(kv_heads=1, shard_size="2GiB").shard_size == 2**31
    assert ConvertOptions(kv_heads=1, calibration=tmp_path / "c.txt").calibration == str(tmp_path / "c.txt")


def test_convert_checks_options_that_skipped_validation(source, tmp_path):
    unchecked = ConvertOptions(kv_heads=2).model_copy(update={"grouping": "bogus"})
    with pytest.raises(GQAError, match="unknown grouping 'bogus'"):
        convert(str(source), tmp_path / "out", unchecked)
    assert not (tmp_path / "out").exists()


def test_the_demo_builds_its_options_from_the_model():
    from gqa.train.demo import conversion_options

    assert conversion_options(1, "mean", None, gpu=True) == ConvertOptions(kv_heads=1, method="mean", force=True)
    cpu = conversion_options(1, "aligned", None, gpu=False)
    assert cpu == ConvertOptions(kv_heads=1, method="aligned", force=True, refine_steps=400, calibration_length=256)
    with pytest.raises(GQAError, match="add --method aligned"):
        conversion_options(1, "mean", 5, gpu=False)
