"""The converter on tiny models of every supported family: exactness, files on disk, loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import ENGLISH, FAMILY_TYPES, build_family_model, expand_kv_heads, logits_of, save_char_tokenizer, save_model
from transformers import AutoModelForCausalLM

from gqa.convert import modeldir, writer
from gqa.convert.modeldir import read_provenance
from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.sizes import parse_size
from gqa.convert.families import family_for


def read_all_tensors(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_duplicated_heads_convert_back_exactly(model_type, tmp_path):
    """A GQA model whose KV heads are repeated into an MHA checkpoint (an exact transformation)
    converts back with `mean` to the original function."""
    gqa_model = build_family_model(model_type, kv=2)
    config, state = expand_kv_heads(gqa_model, family_for(model_type), factor=4)
    mha_dir = save_model(config, state, tmp_path / "mha")
    expected = logits_of(gqa_model)
    assert torch.allclose(logits_of(mha_dir), expected, atol=1e-5), "the MHA fixture itself is not exact"

    result = convert(str(mha_dir), tmp_path / "gqa", ConvertOptions(kv_heads=2, method="mean"))
    out = result.out_dir
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits_of(model), expected, atol=1e-5, rtol=0)
    generated = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_same_kv_heads_is_bit_identical(model_type, tmp_path):
    model = build_family_model(model_type, kv=4, seed=1)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    result = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=4, allow_same=True))
    before = read_all_tensors_single(src)
    after = read_all_tensors(result.out_dir)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert torch.equal(logits_of(result.out_dir), logits_of(model))


def read_all_tensors_single(model_dir):
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_methods_merge_as_documented(method, tmp_path):
    model = build_family_model("qwen2", kv=4, seed=2)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=2, method=method, seed=3)).out_dir
    after = read_all_tensors(out)
    d = 8  # head_dim of the tiny models
    k = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].reshape(4, d, 64)
    kb = model.state_dict()["model.layers.1.self_attn.k_proj.bias"].reshape(4, d)
    new_k = after["model.layers.1.self_attn.k_proj.weight"].reshape(2, d, 64)
    new_kb = after["model.layers.1.self_attn.k_proj.bias"].reshape(2, d)
    if method == "mean":
        torch.testing.assert_close(new_k, torch.stack([k[0:2].mean(0), k[2:4].mean(0)]))
        torch.testing.assert_close(new_kb, torch.stack([kb[0:2].mean(0), kb[2:4].mean(0)]))
    elif method == "first":
        assert torch.equal(new_k, torch.stack([k[0], k[2]])) and torch.equal(new_kb, torch.stack([kb[0], kb[2]]))
    else:
        assert torch.equal(new_kb, torch.zeros_like(new_kb))
        # Fresh draws at the source's scale (1,024 entries: the std is within a few percent) ...
        assert 0.9 < new_k.std() / k.std() < 1.1 and new_k.mean().abs() < 0.1 * k.std()
        # ... that owe nothing to the source's heads or their mean ...
        mean_k = torch.stack([k[0:2].mean(0), k[2:4].mean(0)])
        assert abs(torch.corrcoef(torch.stack([new_k.flatten(), mean_k.flatten()]))[0, 1]) < 0.2
        assert not any(torch.allclose(new_k[g], k[h]) for g in range(2) for h in range(4))
        # ... set by --seed: the same seed draws the same heads, another seed others.
        again = read_all_tensors(convert(str(src), tmp_path / "again", ConvertOptions(kv_heads=2, method=method, seed=3)).out_dir)
        other = read_all_tensors(convert(str(src), tmp_path / "other", ConvertOptions(kv_heads=2, method=method, seed=4)).out_dir)
        name = "model.layers.1.self_attn.k_proj.weight"
        assert torch.equal(again[name], after[name]) and not torch.allclose(other[name], after[name])
    # q, o and everything outside attention pass through untouched
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight", "lm_head.weight"):
        assert torch.equal(after[name], model.state_dict()[name])
    provenance = read_provenance(out)
    assert provenance["conversion"]["method"] == method
    assert provenance["conversion"]["groups"][0] == [[0, 1], [2, 3]]
    assert provenance["source"]["num_key_value_heads"] == 4


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_a_bf16_source_is_merged_in_float32(method, tmp_path):
    """With --dtype fp32 the merged heads are the exact float32 result, not one rounded to the
    source's bf16 on the way."""
    model = build_family_model("llama", kv=4, seed=20).to(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    save_char_tokenizer(src)
    (tmp_path / "calibration.txt").write_text(ENGLISH)
    options = ConvertOptions(kv_heads=2, method=method, dtype="fp32", calibration=str(tmp_path / "calibration.txt"),
                             calibration_sequences=2, calibration_length=32)  # fmt: skip
    after = read_all_tensors(convert(str(src), tmp_path / "out", options).out_dir)
    state = model.state_dict()
    assert all(t.dtype == torch.float32 for t in after.values())
    assert torch.equal(after["lm_head.weight"], state["lm_head.weight"].float())
    new_k = after["model.layers.1.self_attn.k_proj.weight"]
    if method == "mean":
        k = state["model.layers.1.self_attn.k_proj.weight"].float().reshape(4, 8, 64)
        assert torch.equal(new_k, torch.cat([k[0:2].mean(0), k[2:4].mean(0)]))
    else:  # computed in float64: most merged values fall between two bf16 numbers
        assert (new_k != new_k.bfloat16().float()).float().mean() > 0.5


def test_sharded_input_and_output_round_trip(tmp_path):
    gqa_model = build_family_model("llama", kv=2, seed=4)
    config, state = expand_kv_heads(gqa_model, family_for("llama"), factor=4)
    src = save_model(config, state, tmp_path / "mha", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=2, shard_size=parse_size("30KB"))).out_dir
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_all_tensors(out).values())
    torch.testing.assert_close(logits_of(out), logits_of(gqa_model), atol=1e-5, rtol=0)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="page-cache hints are Linux/POSIX only")
def test_page_cache_release_leaves_the_output_bit_identical(tmp_path, monkeypatch):
    """The converter hands the source's pages behind its read position, and the output's written
    pages, back to the kernel. With the thresholds at zero every read and every write does so,
    while tensors are still mapped or in flight: the output must not change by a bit."""
    model = build_family_model("llama", kv=4, seed=4)
    src = save_model(model.config, model.state_dict(), tmp_path / "src", max_shard_size="40KB")
    released: list[str] = []
    real_fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            released.append(Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name)
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(modeldir, "RELEASE_LAG_BYTES", 0)
    monkeypatch.setattr(modeldir, "RELEASE_STEP_BYTES", 1)
    monkeypatch.setattr(writer, "RELEASE_STEP_BYTES", 1)
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=4, allow_same=True, shard_size=parse_size("30KB"))).out_dir
    assert {"src", "out"} <= set(released)  # the source's shards and the staged output's
    before = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            before.update({name: f.get_tensor(name) for name in f.keys()})
    after = read_all_tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_tensor_byte_offsets_match_the_safetensors_header(tmp_path):
    model = build_family_model("qwen2", kv=2, seed=4)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    raw = (src / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    index = modeldir.CheckpointIndex(src)
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        info = index.tensors[name]
        assert info.offset == 8 + header_len + start, name
        assert bytes(index.read(name).contiguous().view(torch.uint8).reshape(-1).numpy()) == raw[8 + header_len + start : 8 + header_len + end]


def test_bin_checkpoint_is_read(tmp_path):
    gqa_model = build_family_model("mistral", kv=2, seed=5)
    config, state = expand_kv_heads(gqa_model, family_for("mistral"), factor=4)
    src = tmp_path / "bin"
    src.mkdir()
    config.save_pretrained(src)
    torch.save(state, src / "pytorch_model.bin")
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=2)).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(gqa_model), atol=1e-5, rtol=0)


def test_dtype_cast_and_tied_embeddings(tmp_path):
    model = build_family_model("llama", kv=4, seed=6, tied=True)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers stores tied weights once
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1, dtype="bf16")).out_dir
    tensors = read_all_tensors(out)
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_side_files_card_and_provenance(tmp_path):
    model = build_family_model("llama", kv=4)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "README.md").write_text("the source's own card")
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1)).out_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers"
    assert "gqa" in meta["tags"] and "mqa" in meta["tags"]
    provenance = read_provenance(out)
    assert provenance["conversion"]["kv_heads"] == 1
    assert provenance["source"]["files"][0]["bytes"] == (src / "model.safetensors").stat().st_size

    out2 = convert(str(src), tmp_path / "out2", ConvertOptions(kv_heads=1, copy_tokenizer=False)).out_dir
    assert not (out2 / "tokenizer.json").exists() and (out2 / "generation_config.json").exists()


def test_inspect_reports_geometry_and_kv_cache(tmp_path, capsys):
    import shutil
    import subprocess
    import sys

    from gqa.train.cli import main

    model = build_family_model("olmo2", kv=4)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "OLMo-2" in out and "KV heads      4" in out and "head_dim      8" in out
    # 2 (k and v) x 2 layers x 4 KV heads x 8 dims x 4 bytes = 512 B per token; G=2 and G=1 are legal
    assert "512 B per token now" in out and "2  256 B" in out and "1  128 B" in out
    assert "normalises over fewer" in out
    gqa = shutil.which("gqa") or str(Path(sys.executable).with_name("gqa"))
    version = subprocess.run([gqa, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("gqa ")


def test_inspect_names_the_layers_without_rope(tmp_path, capsys):
    from gqa.train.cli import main

    model = build_family_model("smollm3", kv=4)  # no_rope_layers [1, 0]: layer 1 has no RoPE
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    assert main(["inspect", str(src)]) == 0
    assert "rotary dims   8 of 8; none in layers 1 (no RoPE)" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["saved", "model"])
def test_expert_tensors_are_checked_as_the_checkpoint_stores_them(layout, tmp_path):
    """transformers 5 holds a layer's experts fused in 3D tensors and save_pretrained splits them
    into one tensor per expert (the hub's layout): the converter expects the names and shapes of
    whichever layout the checkpoint has, refuses a missing or misshapen expert tensor, and reads
    either back into the model's own tensors."""
    from safetensors.torch import load_file, save_file

    from gqa.convert.errors import GQAError

    model = build_family_model("mixtral", kv=4, seed=7)
    src = tmp_path / "src"
    model.save_pretrained(src, save_original_format=layout == "saved")
    stored = load_file(src / "model.safetensors")
    expert = "model.layers.1.block_sparse_moe.experts.3.w1.weight" if layout == "saved" else "model.layers.1.mlp.experts.gate_up_proj"
    assert expert in stored
    expected = modeldir.meta_tensors(model.config, stored)
    assert expected.shapes == {name: tuple(t.shape) for name, t in stored.items()}
    own = model.state_dict()
    back = modeldir.model_layout(model, stored)
    assert back.keys() == own.keys() and all(torch.equal(back[n], own[n]) for n in own)

    for name, broken in (("missing", {k: v for k, v in stored.items() if k != expert}),
                         ("misshapen", {**stored, expert: stored[expert][..., :-1].contiguous()})):  # fmt: skip
        bad = tmp_path / name
        bad.mkdir()
        model.config.save_pretrained(bad)
        save_file(broken, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(GQAError, match=f"tensor {expert} (is missing|has shape)"):
            convert(str(bad), tmp_path / f"out-{name}", ConvertOptions(kv_heads=2))
