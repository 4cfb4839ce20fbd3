"""Every family x method x grouping x target, and the config variants users meet: each conversion
runs, passes `gqa publish`'s checks, loads with plain AutoModelForCausalLM, and decodes with a KV
cache exactly as without one. The sources have duplicated KV heads, so every method but `random`
must also give back the source's function.

The families come from the family table, so a new family joins the matrix by itself. The cells
marked `matrix` (everything beyond one method and one target per family) are the slow part: the
full suite runs them; `pytest -m "not matrix"` leaves them out for a quick run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import ENGLISH, FAMILY_TYPES, build_family_model, expand_kv_heads, load_tensors, logits_of, save_char_tokenizer
from transformers import AutoModelForCausalLM

from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.errors import GQAError
from gqa.convert.families import ATTENTION_PREFIX, family_for, geometry_of
from gqa.convert.grouping import permute_heads
from gqa.convert.publish import publish

SOURCE_KV = 4
TARGETS = {"half": 2, "one": 1}
CALIBRATION = dict(calibration_sequences=2, calibration_length=32)
METHODS = {
    "mean": dict(method="mean"),
    "first": dict(method="first"),
    "random": dict(method="random", seed=7),
    "aligned": dict(method="aligned", **CALIBRATION),
    "aligned+refine": dict(method="aligned", refine_steps=3, refine_batch=2, **CALIBRATION),
}
NOT_EXACT = {"random"}  # re-initialised heads: nothing to compare with
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Source:
    path: Path
    expected: torch.Tensor  # the source's logits on logits_of()'s tokens
    dtype: torch.dtype


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    (root / "calibration.txt").write_text(ENGLISH)
    return root


_sources: dict[tuple, Source] = {}


def duplicated_source(root: Path, model_type: str, target: int, scattered: bool = False, tied: bool = False,
                      dtype: str = "fp32", storage: str = "safetensors", config_file: dict | None = None,
                      **config) -> Source:  # fmt: skip
    """An MHA-like checkpoint with SOURCE_KV KV heads that are copies of `target` distinct heads
    (consecutive copies, or scattered across the contiguous groups), with a character tokenizer so
    calibration can run. `storage` is safetensors, sharded, bin, inv_freq (per-layer rotary
    buffers stored the way older transformers saved them) or model-layout (tensors as the model holds
    them, experts fused, instead of as save_pretrained splits them); `config_file` sets fields of the
    saved config.json (None removes one), to write a config the way hub checkpoints do. Built once per
    combination."""
    key = (model_type, target, scattered, tied, dtype, storage, json.dumps([config_file, config], sort_keys=True))
    if key in _sources:
        return _sources[key]
    base = build_family_model(model_type, kv=target, seed=len(_sources), tied=tied, **config)
    family = family_for(model_type)
    mha_config, state = expand_kv_heads(base, family, SOURCE_KV // target)
    if scattered:  # copies of head A and head B alternate: A, B, A, B
        order = [j for start in range(SOURCE_KV // target) for j in range(start, SOURCE_KV, SOURCE_KV // target)]
        state = _renumber_heads(mha_config, state, family, order)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    path = Path(tempfile.mkdtemp(prefix="src-", dir=root))
    if storage == "bin":
        mha_config.save_pretrained(path)
        torch.save(state, path / "pytorch_model.bin")
    else:
        model = AutoModelForCausalLM.from_config(mha_config, dtype=DTYPES[dtype])
        model.load_state_dict(state, strict=True)
        model.save_pretrained(path, max_shard_size="40KB" if storage == "sharded" else "5GB",
                              save_original_format=storage != "model-layout")  # fmt: skip
    if storage == "inv_freq":
        stored = load_file(path / "model.safetensors")
        geometry = geometry_of(mha_config)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, geometry.rotary_dims, 2, dtype=torch.float32) / geometry.rotary_dims)
        for layer in range(geometry.layers):
            stored[ATTENTION_PREFIX.format(i=layer) + "rotary_emb.inv_freq"] = inv_freq.clone()
        (path / "model.safetensors").unlink()
        save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    if config_file:
        written = {**json.loads((path / "config.json").read_text()), **config_file}
        written = {k: v for k, v in written.items() if v is not None}
        (path / "config.json").write_text(json.dumps(written, indent=2))
        assert torch.equal(logits_of(path), logits_of(base)), "the rewritten config.json changes the model"
    save_char_tokenizer(path)
    base = base.to(DTYPES[dtype]).float()  # the source's function at the precision it is stored in
    _sources[key] = Source(path, logits_of(base), DTYPES[dtype])
    return _sources[key]


def _renumber_heads(config, state, family, order):
    geometry = geometry_of(config)
    for layer in range(geometry.layers):
        prefix = ATTENTION_PREFIX.format(i=layer)
        rel = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in permute_heads(rel, family, geometry, order).items()})
    return state


def check_cell(root: Path, source: Source, name: str, options: ConvertOptions, exact: bool, atol: float = 1e-5):
    """Convert, publish --dry-run, load natively, decode with and without a cache, compare."""
    out = convert(str(source.path), root / name, options).out_dir
    publish(out, "gqa-tests/cell", dry_run=True)  # raises GQAError naming every failed check
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_key_value_heads == options.kv_heads
    assert_cached_decoding_matches(model)
    if exact:
        torch.testing.assert_close(logits_of(model), source.expected, atol=atol, rtol=0)
    return out


def assert_cached_decoding_matches(model) -> None:
    """Greedy decoding with the KV cache gives the tokens decoding without it gives, and each cached
    step's logits are the full forward pass's at that position."""
    prompt = torch.tensor([[1, 5, 7, 9, 11]])
    steps = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cached = model.generate(prompt, **steps, use_cache=True, output_logits=True, return_dict_in_generate=True)
    uncached = model.generate(prompt, **steps, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    with torch.no_grad():
        full = model(cached.sequences).logits[0, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.cat(cached.logits), full, atol=1e-4, rtol=0)


def options_for(method: str, target: int, root: Path, **extra) -> ConvertOptions:
    kw = dict(METHODS[method])
    if kw["method"] == "aligned":
        kw["calibration"] = str(root / "calibration.txt")
    return ConvertOptions(kv_heads=target, **kw, **extra)


def _marked(cells, fast: set):
    return [pytest.param(*cell, marks=() if cell in fast else pytest.mark.matrix) for cell in cells]


CELLS = [(f, m, g, t) for f in FAMILY_TYPES for m in METHODS for g in ("contiguous", "similarity") for t in TARGETS]
# Per commit: each family once with the richest method, scattered heads found by similarity.
FAST = {(f, "aligned+refine", "similarity", "half") for f in FAMILY_TYPES}


@pytest.mark.parametrize("model_type, method, grouping, target", _marked(CELLS, FAST))
def test_matrix(model_type, method, grouping, target, workspace):
    kv = TARGETS[target]
    # Similarity grouping must find heads the contiguous groups would split.
    source = duplicated_source(workspace, model_type, kv, scattered=grouping == "similarity")
    name = f"{model_type}-{method}-{grouping}-{target}"
    options = options_for(method, kv, workspace, grouping=grouping)
    check_cell(workspace, source, name, options, exact=method not in NOT_EXACT)


ROPE_SCALING = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=128),
    "longrope": dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[2.0, 2.1, 2.2, 2.3],
                     original_max_position_embeddings=128),  # fmt: skip
    "llama3": dict(rope_type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=128),  # fmt: skip
}
# name -> (family, source options). Each converts with mean and with aligned + refine.
VARIANTS = {
    "stablelm-without-qk-layernorm": ("stablelm", dict(qk_layernorm=False)),
    "phi-without-qk-layernorm": ("phi", dict(qk_layernorm=False)),
    "qwen2-sliding-window-layer": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=4)),
    "phi3-partial-rotary": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5})),  # fmt: skip
    **{
        f"llama-rope-{kind}": ("llama", dict(rope_parameters={"rope_theta": 10000.0, **rope}))
        for kind, rope in ROPE_SCALING.items()
    },
    **{f"{f}-tied-embeddings": (f, dict(tied=True)) for f in ("llama", "gemma", "qwen3")},
    "llama-stored-inv-freq": ("llama", dict(storage="inv_freq")),
    "stablelm-stored-inv-freq": ("stablelm", dict(storage="inv_freq")),
    "mistral-bin": ("mistral", dict(storage="bin")),
    "qwen2-sharded": ("qwen2", dict(storage="sharded")),
    # Gemma-2 and Gemma-3: the tiny configs soft-cap and slide a 4-token window; these vary that.
    "gemma2-without-softcapping": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma2-window-longer-than-the-sequences": ("gemma2", dict(sliding_window=64)),
    "gemma3_text-final-softcapping": ("gemma3_text", dict(final_logit_softcapping=0.5)),
    "gemma3_text-hub-rope-fields": ("gemma3_text", dict(config_file={  # how Gemma-3's hub config.json says it
        "rope_parameters": None, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}})),  # fmt: skip
    **{f"{f}-tied-embeddings": (f, dict(tied=True)) for f in ("gemma2", "gemma3_text")},
    # Granite, Starcoder2, SmolLM3 and the mixture-of-experts families.
    "granite-multipliers": ("granite", dict(attention_multiplier=0.0078125, embedding_multiplier=12.0,
                                            residual_multiplier=0.22, logits_scaling=8.0)),  # fmt: skip
    "granite-default-multipliers": ("granite", dict(attention_multiplier=1.0, embedding_multiplier=1.0,
                                                    residual_multiplier=1.0, logits_scaling=1.0)),  # fmt: skip
    "starcoder2-without-bias": ("starcoder2", dict(use_bias=False)),
    "starcoder2-sliding-window": ("starcoder2", dict(sliding_window=4)),
    "smollm3-no-rope-at-all": ("smollm3", dict(no_rope_layers=[0, 0])),
    "smollm3-rope-in-every-layer": ("smollm3", dict(no_rope_layers=[1, 1])),
    "smollm3-sliding-window-nope-layer": ("smollm3", dict(use_sliding_window=True, sliding_window=4)),
    **{f"{f}-tied-embeddings": (f, dict(tied=True)) for f in ("granite", "starcoder2", "smollm3")},
    "mixtral-sliding-window": ("mixtral", dict(sliding_window=4)),
    "mixtral-experts-stored-fused": ("mixtral", dict(storage="model-layout")),
    "qwen2_moe-dense-layer": ("qwen2_moe", dict(mlp_only_layers=[1])),
    "qwen2_moe-sliding-window-layer": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3_moe-dense-layer-sparse-step": ("qwen3_moe", dict(decoder_sparse_step=2)),
    "olmoe-experts-stored-fused": ("olmoe", dict(storage="model-layout")),
}
VARIANT_CELLS = [(v, m, t) for v in VARIANTS for m in ("mean", "aligned+refine") for t in TARGETS]
FAST_VARIANTS = {(v, "aligned+refine", "one") for v in VARIANTS}


@pytest.mark.parametrize("variant, method, target", _marked(VARIANT_CELLS, FAST_VARIANTS))
def test_config_variants(variant, method, target, workspace):
    model_type, source_options = VARIANTS[variant]
    kv = TARGETS[target]
    source = duplicated_source(workspace, model_type, kv, **source_options)
    out = check_cell(workspace, source, f"{variant}-{method}-{target}", options_for(method, kv, workspace), exact=True)
    if "storage" in source_options:
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert not any("inv_freq" in name for name in weight_map)
    if source_options.get("storage") == "model-layout":  # the output keeps the source's layout
        assert set(weight_map) == set(load_tensors(source.path))


@pytest.mark.parametrize("model_type", ["olmo", "olmoe"])
def test_clipped_qkv_merges_exactly_with_mean_and_refuses_aligned(model_type, workspace):
    """clip_qkv clamps queries, keys and values elementwise after the projection: pooling duplicated
    heads stays exact, but no aligned transform passes through the clamp, so aligned is refused up
    front, before anything is written."""
    source = duplicated_source(workspace, model_type, 1, clip_qkv=0.05)
    check_cell(workspace, source, f"{model_type}-clip-mean", options_for("mean", 1, workspace), exact=True)
    out = workspace / f"{model_type}-clip-aligned"
    with pytest.raises(GQAError, match="sets clip_qkv \\(0.05\\).*Use --method mean"):
        convert(str(source.path), out, options_for("aligned", 1, workspace))
    assert not out.exists()


# Source dtype x --dtype: the output holds the chosen dtype (auto: the source's) and the function
# of the source at that precision. Folding alignment transforms into q and o rounds at the output's
# precision, so aligned cells compare at that precision's tolerance.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}
DTYPE_CELLS = [(s, o, m) for s in DTYPES for o in ("auto", *DTYPES) for m in ("mean", "aligned+refine")]
FAST_DTYPES = {("bf16", "fp32", "mean"), ("fp32", "bf16", "aligned+refine"), ("fp16", "auto", "aligned+refine")}


@pytest.mark.parametrize("source_dtype, out_dtype, method", _marked(DTYPE_CELLS, FAST_DTYPES))
def test_dtypes(source_dtype, out_dtype, method, workspace):
    source = duplicated_source(workspace, "qwen2", 1, dtype=source_dtype)
    expected_dtype = source.dtype if out_dtype == "auto" else DTYPES[out_dtype]
    options = options_for(method, 1, workspace, dtype=out_dtype)
    name = f"dtype-{source_dtype}-{out_dtype}-{method}"
    exact_merge = method == "mean"
    # The expected logits: the source's weights at the output's precision.
    if expected_dtype != source.dtype:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        reference = Source(source.path, logits_of(model.to(expected_dtype).float()), source.dtype)
    else:
        reference = source
    atol = 1e-5 if exact_merge else TOLERANCE[expected_dtype]
    out = check_cell(workspace, reference, name, options, exact=True, atol=atol)
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            assert all(f.get_slice(n).get_dtype() == _safetensors_dtype(expected_dtype) for n in f.keys())


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
