"""GPT-2 to multi-query attention as gpt_bigcode: real checkpoints on disk, tiny GPT-2s built here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import load_tensors, save_char_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTBigCodeForCausalLM

from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.modeldir import read_provenance
from gqa.convert.publish import publish
from gqa.train.cli import main

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
CALIBRATION = {"calibration_sequences": 8, "calibration_length": 32}  # enough for a model this small
TOKENS = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % VOCAB


def tiny_gpt2(seed: int = 0, duplicated_kv: bool = False, **overrides) -> GPT2LMHeadModel:
    """A random tiny GPT-2 (its LayerNorms and biases perturbed, so carrying them over is tested).
    With `duplicated_kv`, every layer's K heads are copies of head 0, and its V heads too."""
    torch.manual_seed(seed)
    fields = dict(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                  eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(GPT2Config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
        if duplicated_kv:
            for block in model.transformer.h:
                weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, Q | K | V]
                for start in (HIDDEN, 2 * HIDDEN):  # the K block, then the V block
                    head0 = slice(start, start + HEAD_DIM)
                    for h in range(1, HEADS):
                        head = slice(start + h * HEAD_DIM, start + (h + 1) * HEAD_DIM)
                        weight[:, head] = weight[:, head0]
                        bias[head] = bias[head0]
    return model


def save_gpt2(model: GPT2LMHeadModel, path):
    model.save_pretrained(path)
    save_char_tokenizer(path)
    return path


def source_logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def converted(path) -> GPTBigCodeForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize(
    "method, overrides",
    [("mean", {}), ("first", {}), ("aligned", {}),
     ("mean", {"scale_attn_weights": False, "activation_function": "relu", "n_inner": 48})],
)
def test_duplicated_kv_heads_convert_exactly(method, overrides, tmp_path):
    source = tiny_gpt2(duplicated_kv=True, **overrides)
    src = save_gpt2(source, tmp_path / "src")
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1, method=method, **CALIBRATION)).out_dir
    torch.testing.assert_close(source_logits(converted(out)), source_logits(source), atol=1e-5, rtol=0)


def test_aligned_keeps_more_of_the_function_than_mean_and_says_how_it_was_made(tmp_path):
    """Distinct heads: the aligned merge, fitted on the calibration text, stays closer to the source's logits than
    the paper's mean on other tokens, and the provenance records the calibration."""
    source = tiny_gpt2(seed=1)
    src, reference = save_gpt2(source, tmp_path / "src"), source_logits(source)
    error = {}
    for method in ("mean", "aligned"):
        out = convert(str(src), tmp_path / method, ConvertOptions(kv_heads=1, method=method, **CALIBRATION)).out_dir
        error[method] = (source_logits(converted(out)) - reference).pow(2).mean().item()
    assert error["aligned"] < error["mean"] / 4, error
    provenance = read_provenance(tmp_path / "aligned")
    assert provenance["conversion"]["method"] == "aligned" and provenance["conversion"]["calibration"] == "default"


@pytest.mark.parametrize("tied", [True, False])
def test_output_loads_natively_as_gpt_bigcode_mqa(tied, tmp_path):
    source = tiny_gpt2(seed=1, tie_word_embeddings=tied)
    src = save_gpt2(source, tmp_path / "src")
    result = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1, shard_size="20KB"))
    assert len(list(result.out_dir.glob("model-*.safetensors"))) > 1
    model = converted(result.out_dir)
    assert type(model) is GPTBigCodeForCausalLM
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_bigcode" and config["multi_query"] is True
    assert config["architectures"] == ["GPTBigCodeForCausalLM"]
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "activation_function", "layer_norm_epsilon",
                "initializer_range", "scale_attn_weights", "bos_token_id", "eos_token_id", "tie_word_embeddings"):  # fmt: skip
        assert config[key] == getattr(source.config, key), key
    assert model.config.num_key_value_heads == 1
    assert (model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()) is tied
    # Side files, provenance, the KV cache arithmetic.
    assert (result.out_dir / "tokenizer.json").is_file() and (result.out_dir / "generation_config.json").is_file()
    provenance = read_provenance(result.out_dir)
    assert provenance["source"]["model_type"] == "gpt2" and provenance["conversion"]["model_type"] == "gpt_bigcode"
    assert provenance["conversion"]["groups"] == [[[0, 1, 2, 3]]] * LAYERS
    assert result.kv_bytes_per_token_before == 2 * LAYERS * HEADS * HEAD_DIM * 4
    assert result.kv_bytes_per_token_after == 2 * LAYERS * 1 * HEAD_DIM * 4
    # What gqa writes is publishable as it is.
    publish(result.out_dir, "someone/tiny-gpt2-mqa", dry_run=True)


def test_cached_decoding_matches_full_forward(tmp_path):
    src = save_gpt2(tiny_gpt2(seed=2), tmp_path / "src")
    model = converted(convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1)).out_dir)
    prompt = torch.tensor([[1, 5, 7, 11]])
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (1, 12)
    with torch.no_grad():
        full = model(cached).logits
        step = model(cached[:, :4], use_cache=True)
        decoded = [step.logits]
        for position in range(4, cached.shape[1]):
            step = model(cached[:, position : position + 1], cache=step.cache, use_cache=True)
            decoded.append(step.logits)
    assert step.cache.layers[0].keys.shape[1] == 1  # one KV head in the cache
    torch.testing.assert_close(torch.cat(decoded, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_tensors_are_carried_over_exactly_and_kv_heads_merged(method, tmp_path):
    source = tiny_gpt2(seed=3, tie_word_embeddings=False)
    src = save_gpt2(source, tmp_path / "src")
    after = load_tensors(convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1, method=method)).out_dir)
    before = source.state_dict()
    for name, tensor in before.items():
        layout = tensor.T if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else tensor
        if ".c_attn." not in name:  # everything outside c_attn: Conv1D transposed, the rest as it was
            assert torch.equal(after[name], layout), name
            continue
        q, k, v = layout.split(HIDDEN)
        new_q, new_k, new_v = after[name].split([HIDDEN, HEAD_DIM, HEAD_DIM])
        assert torch.equal(new_q, q), name
        for merged, heads in ((new_k, k), (new_v, v)):
            heads = heads.reshape(HEADS, HEAD_DIM, *heads.shape[1:])
            if method == "random":  # fresh draws at the source's scale, biases at zero
                if name.endswith(".bias"):
                    assert torch.equal(merged, torch.zeros_like(merged)), name
                else:
                    assert 0.5 < merged.std() / heads.std() < 2 and not torch.allclose(merged, heads.mean(0), atol=1e-3)
                continue
            torch.testing.assert_close(merged, heads.mean(0) if method == "mean" else heads[0], atol=1e-7, rtol=0)
    assert set(after) == set(before)


def test_a_bf16_source_keeps_its_dtype_or_takes_the_one_asked_for(tmp_path):
    source = tiny_gpt2(seed=5).to(torch.bfloat16)
    src = save_gpt2(source, tmp_path / "src")
    kept = convert(str(src), tmp_path / "kept", ConvertOptions(kv_heads=1)).out_dir
    cast = convert(str(src), tmp_path / "cast", ConvertOptions(kv_heads=1, dtype="fp32")).out_dir
    assert json.loads((kept / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((cast / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_tensors(kept).values()} == {torch.bfloat16}
    assert {t.dtype for t in load_tensors(cast).values()} == {torch.float32}
    # The merged K head is computed in float32 and cast once: with fp32 output, it is not rounded to bf16.
    k = source.state_dict()["transformer.h.0.attn.c_attn.weight"].T[HIDDEN : 2 * HIDDEN].float()
    merged = load_tensors(cast)["transformer.h.0.attn.c_attn.weight"][HIDDEN : HIDDEN + HEAD_DIM]
    torch.testing.assert_close(merged, k.reshape(HEADS, HEAD_DIM, HIDDEN).mean(0), atol=1e-7, rtol=0)


def test_an_original_style_checkpoint_converts(tmp_path):
    """The original GPT-2 checkpoints were saved from GPT2Model: no `transformer.` prefix, no lm_head (tied),
    and each layer's causal-mask buffers attn.bias and attn.masked_bias stored."""
    source = tiny_gpt2(seed=4, duplicated_kv=True)
    src = save_gpt2(source, tmp_path / "src")
    state = {name.removeprefix("transformer."): t.contiguous() for name, t in source.state_dict().items() if name != "lm_head.weight"}
    for layer in range(LAYERS):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    result = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=1))
    buffers = sorted(f"h.{i}.attn.{b}" for i in range(LAYERS) for b in ("bias", "masked_bias"))
    assert sorted(result.dropped) == buffers
    assert sorted(read_provenance(result.out_dir)["source"]["dropped_tensors"]) == buffers
    torch.testing.assert_close(source_logits(converted(result.out_dir)), source_logits(source), atol=1e-5, rtol=0)


def assert_refused(args, message, capsys, tmp_path):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".gqa-tmp-" in p.name]


@pytest.mark.parametrize(
    "overrides, flags, message",
    [
        ({}, ["--kv-heads", 2], "only multi-head attention or one KV head"),
        ({}, ["--kv-heads", 1, "--method", "aligned", "--refine-steps", 5], "--refine-steps 5 is not available for GPT-2"),
        ({"scale_attn_by_inverse_layer_idx": True}, ["--kv-heads", 1], "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, ["--kv-heads", 1], "reorder_and_upcast_attn"),
    ],
)
def test_what_gpt_bigcode_cannot_express_is_refused(overrides, flags, message, tmp_path, capsys):
    src = save_gpt2(tiny_gpt2(**overrides), tmp_path / "src")
    assert_refused(["convert", src, tmp_path / "out", *flags], message, capsys, tmp_path)


def test_inspect_shows_the_gpt_bigcode_target(tmp_path, capsys):
    src = save_gpt2(tiny_gpt2(), tmp_path / "src")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    # 2 (k and v) x 2 layers x 4 heads x 8 dims x 4 bytes = 512 B per token now; one KV head: 128 B
    assert "GPT-2" in out and "gpt_bigcode" in out and "512 B per token now" in out and "1  128 B  (4x smaller)" in out
    src = save_gpt2(tiny_gpt2(scale_attn_by_inverse_layer_idx=True), tmp_path / "scaled")
    assert main(["inspect", str(src)]) == 0
    assert "cannot be converted" in capsys.readouterr().out


def test_a_non_finite_value_in_a_head_that_merging_drops_is_still_named(tmp_path, capsys):
    """`first` keeps head 0 alone, so a NaN in head 3's keys would vanish from the output: the source
    tensor is checked before merging."""
    source = tiny_gpt2(seed=6)
    with torch.no_grad():
        source.transformer.h[1].attn.c_attn.weight[0, HIDDEN + 3 * HEAD_DIM] = float("nan")
    src = save_gpt2(source, tmp_path / "src")
    flags = ["--kv-heads", 1, "--method", "first"]
    assert_refused(["convert", src, tmp_path / "out", *flags], "transformer.h.1.attn.c_attn.weight contains NaN", capsys, tmp_path)


def test_the_output_uptrains_with_attention_alone_or_lora(tmp_path):
    """train.params and LoRA find gpt_bigcode's attention: c_attn (q, k and v fused) and the attention's c_proj,
    never the MLP's c_proj; kv alone is refused, since one matrix holds the queries too."""
    from gqa.convert.errors import GQAError
    from gqa.train.params import lora_plan, trainable_names
    from gqa.train.recipe import LoraSection

    out = tmp_path / "mqa"
    convert(str(save_gpt2(tiny_gpt2(), tmp_path / "gpt2")), out, ConvertOptions(kv_heads=1))
    model = converted(out)
    attention = {name for name, _ in model.named_parameters() if ".attn." in name}
    assert attention and trainable_names(model, "attention") == attention
    with pytest.raises(GQAError, match="fuses queries, keys and values"):
        trainable_names(model, "kv")
    adapted, full = lora_plan(model, LoraSection())
    assert adapted == [f"transformer.h.{i}.attn.c_proj" for i in range(LAYERS)]
    assert full == [f"transformer.h.{i}.attn.c_attn" for i in range(LAYERS)]
    adapted, full = lora_plan(model, LoraSection(train_kv=False))
    assert sorted(adapted) == sorted(f"transformer.h.{i}.attn.{m}" for i in range(LAYERS) for m in ("c_attn", "c_proj"))
    assert full == []


def test_a_training_run_on_the_output_changes_only_its_attention(tmp_path):
    from gqa.train.api import run_recipe

    out = tmp_path / "mqa"
    convert(str(save_gpt2(tiny_gpt2(), tmp_path / "gpt2")), out, ConvertOptions(kv_heads=1))
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "abcdefgh " * (8 + i % 5) for i in range(60)) + "\n")
    run_recipe("tiny-cpu", [
        f"model.path={out}", f"data.train={text}", f"data.cache_dir={tmp_path / 'cache'}",
        f"output.dir={tmp_path / 'trained'}", "precision=fp32", "logging.trackers=[]", "train.params=attention",
        "budget.steps=2", "data.block_size=32", "batch.global_sequences=4", "batch.micro=2", "eval.every=0",
        "eval.at_start=false", "checkpoint.every=0", "optimizer.lr=1e-2",
    ])  # fmt: skip
    before, after = load_tensors(out), load_tensors(tmp_path / "trained")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".attn." in name for name in changed)
    assert converted(tmp_path / "trained").config.multi_query
