"""Where a converted checkpoint serves as GQA: the table covers every family and engine, `gqa inspect`
shows it, and `gqa convert` warns before it reads any weight."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpt2 import HIDDEN, save_gpt2, tiny_gpt2
from tiny import build_family_model, save_model

from gqa.convert.families import FAMILIES, GPT2_MODEL_TYPES, output_family
from gqa.convert.serving import ENGINES, NO, SERVING, STATUSES, Serving
from gqa.train.cli import main


ACCEPTED = [t for family in FAMILIES for t in family.model_types] + list(GPT2_MODEL_TYPES)


def test_every_family_has_a_record_for_every_engine():
    """Every model type the converter accepts (GPT-2 by its gpt_bigcode output) has its output's records, one
    per engine: a family added without its serving records fails here, naming what is missing."""
    engines = [engine.key for engine in ENGINES]
    for model_type in ACCEPTED:
        output = output_family(model_type).model_types[0]
        assert output in SERVING, f"{model_type} converts to {output}, which has no serving records"
        records = SERVING[output]
        assert [r.engine for r in records] == engines, f"{output}: one record per engine, in ENGINES order"
        for record in records:
            assert record.status in STATUSES and record.evidence and record.version, (output, record)
            if record.status != "yes":
                assert record.remedy, f"{output} on {record.engine}: say what the user can do"
    assert set(SERVING) == {output_family(t).model_types[0] for t in ACCEPTED}, "records of no output"


def _tiny(model_type: str, path: Path, kv: int = 8) -> Path:
    model = build_family_model(model_type, kv=kv)
    return save_model(model.config, model.state_dict(), path)


def test_inspect_shows_where_the_family_serves(tmp_path, capsys):
    src = _tiny("phi", tmp_path / "src")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    block = out[out.index("  Serves as GQA in:") :]
    assert "vLLM       yes (vllm 0.34.0)" in block
    assert "SGLang     no (sglang 0.5.23)" in block and "sglang/srt/models/phi.py PhiAttention" in block
    assert "llama.cpp  no (llama.cpp 0c1e570" in block and "Phi2Model.set_gguf_parameters" in block
    assert "what to do:" in block


def test_inspect_shows_where_a_gpt2_output_serves(tmp_path, capsys):
    """A GPT-2 source's lines are gpt_bigcode's: its output is a gpt_bigcode checkpoint with one KV head."""
    assert main(["inspect", str(save_gpt2(tiny_gpt2(), tmp_path / "src"))]) == 0
    out = capsys.readouterr().out
    block = out[out.index("  Serves as GQA in:") :]
    assert "vLLM       yes (vllm 0.34.0)" in block and "maps GPTBigCodeForCausalLM to the Transformers backend" in block
    assert "SGLang     yes (sglang 0.5.23)" in block and "sglang/srt/models/gpt_bigcode.py GPTBigCodeAttention" in block
    assert "llama.cpp  yes (llama.cpp 0c1e570" in block and "StarCoderModel" in block and "head_count_kv(1)" in block


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "will not serve as GQA" in r.getMessage()]


def test_convert_warns_before_reading_weights(tmp_path, caplog):
    """The warning comes from the config alone: with the weights gone the conversion fails when it
    first looks for them, and the warning has already been given; nothing is written."""
    src = _tiny("olmoe", tmp_path / "src")
    for weights in src.glob("*.safetensors"):
        weights.unlink()
    caplog.set_level(logging.WARNING)
    assert main(["convert", str(src), str(tmp_path / "out"), "--kv-heads", "2"]) != 0
    warned = _warnings(caplog)
    assert len(warned) == 2, warned  # SGLang and llama.cpp
    assert "in SGLang" in warned[0] and "olmoe.py OlmoeAttention" in warned[0] and "What to do:" in warned[0]
    assert "in llama.cpp" in warned[1] and "serves as GQA in vLLM" in warned[1]
    assert not (tmp_path / "out").exists()


def test_convert_warns_on_stderr_and_still_converts(tmp_path):
    """From the command line, the warning is on stderr and the conversion still completes."""
    src = _tiny("phi", tmp_path / "src")
    gqa = str(Path(sys.executable).with_name("gqa"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([gqa, "convert", str(src), str(tmp_path / "out"), "--kv-heads", "4"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "will not serve as GQA in SGLang" in run.stderr and "will not serve as GQA in llama.cpp" in run.stderr
    assert "converted" in run.stdout and (tmp_path / "out" / "config.json").exists()


def test_a_gpt2_source_warns_by_its_gpt_bigcode_records(tmp_path, caplog, capsys, monkeypatch):
    """With one engine's gpt_bigcode record made "no", converting a GPT-2 source warns on that record, from the
    config alone: the source converts with the warning, and with its weights gone the conversion still warns
    before it fails, writing nothing."""
    records = SERVING["gpt_bigcode"]
    monkeypatch.setitem(SERVING, "gpt_bigcode", (*records[:2], Serving("llama.cpp", NO, "its reason", "its remedy")))
    src = save_gpt2(tiny_gpt2(), tmp_path / "src")
    caplog.set_level(logging.WARNING)
    assert main(["convert", str(src), str(tmp_path / "out"), "--kv-heads", "1"]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    for weights in src.glob("*.safetensors"):
        weights.unlink()
    assert main(["convert", str(src), str(tmp_path / "none"), "--kv-heads", "1"]) != 0
    assert "no weights in" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    warned = _warnings(caplog)
    assert len(warned) == 2 and warned[0] == warned[1], warned
    assert warned[0].startswith("warning: a GPTBigCode checkpoint with 1 KV heads for 4 query heads will not serve "
                                "as GQA in llama.cpp (no; read from llama.cpp 0c1e570")  # fmt: skip
    assert "its reason. What to do: its remedy." in warned[0] and "serves as GQA in vLLM, SGLang" in warned[0]


@pytest.mark.parametrize("n_inner", [48, None, 4 * HIDDEN])
def test_a_gpt2_of_another_feed_forward_width_is_warned_of_llama_cpp(n_inner, tmp_path, caplog):
    """llama.cpp's converter writes 4 x n_embd as the feed-forward width: a GPT-2 whose n_inner says otherwise
    converts with a warning naming it; unset, or 4 x n_embd, no warning."""
    src = save_gpt2(tiny_gpt2(n_inner=n_inner), tmp_path / "src")
    caplog.set_level(logging.WARNING)
    assert main(["convert", str(src), str(tmp_path / "out"), "--kv-heads", "1"]) == 0
    warned = [r.getMessage() for r in caplog.records if "feed-forward width" in r.getMessage()]
    if n_inner == 48:
        assert len(warned) == 1 and "n_inner=48 is not 4 x n_embd (128)" in warned[0], warned
        assert "will not load in llama.cpp" in warned[0] and (tmp_path / "out" / "config.json").exists()
    else:
        assert warned == []


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_no_warning_for_a_family_that_serves_everywhere(model_type, tmp_path, caplog):
    from gqa.convert.convert import ConvertOptions, convert

    src = save_gpt2(tiny_gpt2(), tmp_path / "src") if model_type == "gpt2" else _tiny(model_type, tmp_path / "src")
    caplog.set_level(logging.WARNING)
    convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1 if model_type == "gpt2" else 2))
    assert _warnings(caplog) == []


def test_no_warning_for_an_mha_output(tmp_path, caplog):
    """KV heads equal to query heads is no GQA checkpoint: Phi, which warns at fewer, does not warn."""
    from gqa.convert.convert import ConvertOptions, convert

    caplog.set_level(logging.WARNING)
    convert(str(_tiny("phi", tmp_path / "src")), tmp_path / "out", ConvertOptions(kv_heads=8, allow_same=True))
    assert _warnings(caplog) == []
