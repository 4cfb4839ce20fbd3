"""Bad input through the real CLI: a clear message, a non-zero exit, nothing written, nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import build_family_model, save_model
from transformers import OPTConfig, OPTForCausalLM

from gqa.train.cli import main


@pytest.fixture
def source(tmp_path):
    model = build_family_model("llama", kv=4)
    return save_model(model.config, model.state_dict(), tmp_path / "src")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_nothing_written(parent: Path, out: Path):
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if ".gqa-tmp-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize(
    "kv, message",
    [(3, "does not divide"), (4, "not smaller"), (8, "not smaller"), (0, "at least 1")],
)
def test_illegal_kv_heads(source, tmp_path, capsys, kv, message):
    before = snapshot(source)
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", kv], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert_nothing_written(tmp_path, tmp_path / "out")
    assert snapshot(source) == before


def test_missing_tensor(source, tmp_path, capsys):
    state = load_file(source / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", 2], capsys)
    assert code != 0 and "model.layers.1.self_attn.v_proj.weight is missing" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("cut", [100, 5000])
def test_truncated_safetensors(source, tmp_path, capsys, cut):
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut < 1000 else data[:-cut])
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", 2], capsys)
    assert code != 0 and "not a valid safetensors file" in err and "model.safetensors" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "name, value",
    [("model.layers.1.mlp.up_proj.weight", float("nan")), ("model.layers.0.self_attn.k_proj.weight", float("-inf"))],
)
def test_non_finite_tensor_is_named(source, tmp_path, capsys, name, value):
    """Passed-through and merged tensors alike."""
    state = load_file(source / "model.safetensors")
    state[name][3, 5] = value
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", 2], capsys)
    assert code != 0 and f"{name} contains NaN or inf" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_failing_disk_write_is_an_error_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    """A write that fails on the background writer thread (here: the 3rd, as a full disk would)
    stops the run with a message naming OUT, and the staging directory is removed (on a real full disk:
    test_full_disk.py)."""
    from gqa.convert.writer import ShardedSafetensorsWriter

    real_append, calls = ShardedSafetensorsWriter._append, []

    def failing_append(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_append(self, data)

    monkeypatch.setattr(ShardedSafetensorsWriter, "_append", failing_append)
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", 2], capsys)
    assert code != 0 and f"no space left on the device while writing the converted model {tmp_path / 'out'}" in err
    assert "Traceback" not in err
    assert len(calls) >= 3
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_out_is_kept_without_force_and_replaced_with_it(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(["convert", source, out, "--kv-heads", 2], capsys)
    assert code != 0 and "already exists" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _ = run_cli(["convert", source, out, "--kv-heads", 2, "--force"], capsys)
    assert code == 0 and not (out / "precious.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_overlapping_source(source, tmp_path, capsys, where):
    before = snapshot(source)
    out = {"same": source, "inside": source / "converted", "contains": tmp_path}[where]
    code, err = run_cli(["convert", source, out, "--kv-heads", 2, "--force"], capsys)
    assert code != 0 and ("inside" in err or "contains the source" in err)
    assert snapshot(source) == before


def test_unsupported_family_lists_supported(tmp_path, capsys):
    config = OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, vocab_size=64,
                       word_embed_proj_dim=32)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    code, err = run_cli(["convert", tmp_path / "opt", tmp_path / "out", "--kv-heads", 1], capsys)
    assert code != 0 and "'opt' is not supported" in err and "Llama" in err and "Phi-3" in err and "GPT-2" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_shape_mismatch_between_config_and_weights(source, tmp_path, capsys):
    state = load_file(source / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(["convert", source, tmp_path / "out", "--kv-heads", 2], capsys)
    assert code != 0 and "model.layers.0.mlp.up_proj.weight has shape" in err


def test_debug_shows_traceback(source, tmp_path):
    with pytest.raises(Exception, match="does not divide"):
        main(["--debug", "convert", str(source), str(tmp_path / "out"), "--kv-heads", "3"])


def test_killed_mid_write_leaves_no_out(tmp_path):
    """SIGKILL while shards are being written: no OUT appears, only a hidden temp directory."""
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")  # about 200 MB in fp32
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gqa.train.cli", "convert", str(tmp_path / "src"), str(out), "--kv-heads", "2"]
    cmd += ["--shard-size", "20MB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_while_writing = False
    while time.time() < deadline and proc.poll() is None:
        shards = list(tmp_path.glob(".out.gqa-tmp-*/out/model-*.safetensors"))
        if len(shards) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            killed_while_writing = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_while_writing, "the conversion finished before it could be killed; make the model larger"
    assert not out.exists()
