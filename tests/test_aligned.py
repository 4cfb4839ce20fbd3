"""Aligned merging and similarity grouping: exact where they must be, better than mean where not."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import (
    ENGLISH,
    FAMILY_TYPES,
    build_family_model,
    expand_kv_heads,
    load_tensors,
    logits_of,
    save_char_tokenizer,
    save_model,
)
from transformers import AutoModelForCausalLM

from gqa.convert.aligned import join_qkvo, split_qkvo
from gqa.convert.modeldir import read_provenance
from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.families import ATTENTION_PREFIX, family_for, geometry_of
from gqa.convert.grouping import head_distances, permute_heads, similarity_groups


def write_source(model, path, calibration_file):
    save_model(model.config, model.state_dict(), path)
    save_char_tokenizer(path)
    return path


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(ENGLISH)
    return path


def aligned_options(kv_heads, calibration_file, **kw):
    return ConvertOptions(
        kv_heads=kv_heads,
        method="aligned",
        calibration=str(calibration_file),
        calibration_sequences=4,
        calibration_length=64,
        **kw,
    )


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_aligned_with_same_kv_heads_is_identity(model_type, tmp_path, calibration_file):
    model = build_family_model(model_type, kv=4, seed=11)
    src = write_source(model, tmp_path / "src", calibration_file)
    out = convert(str(src), tmp_path / "out", aligned_options(4, calibration_file, allow_same=True)).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_aligned_duplicated_heads_exact(model_type, tmp_path, calibration_file):
    gqa_model = build_family_model(model_type, kv=2, seed=12)
    config, state = expand_kv_heads(gqa_model, family_for(model_type), factor=4)
    src = save_model(config, state, tmp_path / "mha")
    save_char_tokenizer(src)
    out = convert(str(src), tmp_path / "out", aligned_options(2, calibration_file)).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(gqa_model), atol=1e-5, rtol=0)


def shuffle_heads(config, state, family, order):
    """Renumber KV heads (with their query heads) in a full state dict: an exact transformation."""
    geometry = geometry_of(config)
    for layer in range(geometry.layers):
        prefix = ATTENTION_PREFIX.format(i=layer)
        rel = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        for k, v in permute_heads(rel, family, geometry, order).items():
            state[prefix + k] = v
    return state


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_similarity_grouping_finds_shuffled_duplicates(model_type, method, tmp_path, calibration_file):
    """KV heads that are duplicates but scattered across the contiguous groups: similarity grouping
    finds the true groups and the conversion is exact; contiguous grouping is not."""
    gqa_model = build_family_model(model_type, kv=2, seed=13)
    family = family_for(model_type)
    config, state = expand_kv_heads(gqa_model, family, factor=4)
    state = shuffle_heads(config, state, family, [0, 4, 1, 5, 2, 6, 3, 7])  # heads now alternate A, B, A, B
    src = save_model(config, state, tmp_path / "mha")
    save_char_tokenizer(src)
    expected = logits_of(gqa_model)
    torch.testing.assert_close(logits_of(src), expected, atol=1e-5, rtol=0)

    options = aligned_options(2, calibration_file, grouping="similarity") if method == "aligned" else None
    options = options or ConvertOptions(kv_heads=2, method="mean", grouping="similarity")
    out = convert(str(src), tmp_path / "similar", options).out_dir
    torch.testing.assert_close(logits_of(out), expected, atol=1e-5, rtol=0)
    assert read_provenance(out)["conversion"]["groups"][0] == [[0, 2, 4, 6], [1, 3, 5, 7]]

    contiguous = convert(str(src), tmp_path / "contiguous", ConvertOptions(kv_heads=2)).out_dir
    assert (logits_of(contiguous) - expected).abs().max() > 1e-3


def test_similarity_groups_partition():
    distances = torch.tensor(
        [[0, 5, 1, 5, 9, 9], [5, 0, 5, 1, 9, 9], [1, 5, 0, 5, 9, 9], [5, 1, 5, 0, 9, 9], [9, 9, 9, 9, 0, 2], [9, 9, 9, 9, 2, 0]],
        dtype=torch.float64,
    )
    assert similarity_groups(distances, 3) == [[0, 2], [1, 3], [4, 5]]
    assert similarity_groups(distances, 6) == [[0], [1], [2], [3], [4], [5]]
    heads = torch.randn(4, 8, 16)
    d = head_distances(heads, heads, None)
    assert torch.allclose(d.diagonal(), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def fold_random_transforms(model, seed=0, unrotated_layers=()):
    """Apply the alignment transforms alone, with no merge: random complex scales on every key's
    rotary pairs (conj folded into q), a random linear map on unrotated key dims (folded into q)
    and on every value head (folded into o_proj). In `unrotated_layers` (no RoPE) every key dim is
    unrotated."""
    gen = torch.Generator().manual_seed(seed)
    family = family_for(model.config.model_type)
    geometry = geometry_of(model.config)
    d = geometry.head_dim
    per_kv = geometry.heads // geometry.kv_heads
    state = model.state_dict()
    for layer in range(geometry.layers):
        rot = 0 if layer in unrotated_layers else geometry.rotary_dims
        half = rot // 2
        prefix = ATTENTION_PREFIX.format(i=layer)
        rel = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        parts = split_qkvo(rel, family, geometry)
        q, k, v = (parts[p].reshape(-1, d, parts[p].shape[-1]).clone() for p in "qkv")
        o = parts["o"].reshape(parts["o"].shape[0], -1, d).clone()
        for j in range(geometry.kv_heads):
            # well-conditioned draws, so float32 round-off stays far below the tolerance
            radius = 0.5 + 1.5 * torch.rand(half, generator=gen, dtype=torch.float64)
            c = torch.polar(radius, 6.3 * torch.rand(half, generator=gen, dtype=torch.float64))
            key = c[:, None] * torch.complex(k[j, :half], k[j, half:rot])
            k[j, :half], k[j, half:rot] = key.real, key.imag
            a = 0.2 * torch.randn(d - rot, d - rot, generator=gen, dtype=torch.float64) + torch.eye(d - rot, dtype=torch.float64)
            k[j, rot:] = a @ k[j, rot:]
            m = 0.2 * torch.randn(d, d, generator=gen, dtype=torch.float64) + torch.eye(d, dtype=torch.float64)
            v[j] = m @ v[j]
            for h in range(j * per_kv, (j + 1) * per_kv):
                z = torch.complex(q[h, :half], q[h, half:rot]) / c.conj()[:, None]
                q[h, :half], q[h, half:rot] = z.real, z.imag
                q[h, rot:] = torch.linalg.inv(a).T @ q[h, rot:]
                o[:, h] = o[:, h] @ torch.linalg.inv(m)
        new = {"q": q.reshape(-1, q.shape[-1]), "k": k.reshape(-1, k.shape[-1]), "v": v.reshape(-1, v.shape[-1])}
        new["o"] = o.reshape(parts["o"].shape)
        for name, tensor in join_qkvo(new, rel, family).items():
            state[prefix + name] = tensor
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "phi3", "olmo", "phi", "stablelm", "gemma2"])
def test_each_fold_alone_preserves_logits(model_type):
    """The transforms aligned merging relies on change nothing before any merge. Phi and StableLM
    without their q/k LayerNorm have partial rotary, so unrotated key dims are covered too; Gemma-2
    soft-caps and rescales q·k after them."""
    model = build_family_model(model_type, kv=4, seed=14, qk_layernorm=False)
    assert not any("layernorm" in n and "self_attn" in n for n in model.state_dict())
    expected = logits_of(model)
    folded = fold_random_transforms(model)
    torch.testing.assert_close(logits_of(folded), expected, atol=1e-5, rtol=0)


def nope_layers(config) -> list[int]:
    """SmolLM3's layers without RoPE, read from its config here rather than from the family table."""
    return [i for i, uses_rope in enumerate(config.no_rope_layers) if not uses_rope]


def test_a_layer_without_rope_admits_any_key_map():
    """In SmolLM3's NoPE layer (layer 1 of the tiny model) a general linear map on the whole key,
    folded into q, changes nothing; in its RoPE layer only the rotation-commuting scales do."""
    model = build_family_model("smollm3", kv=4, seed=14)
    assert nope_layers(model.config) == [1] and geometry_of(model.config).unrotated_layers == (1,)
    expected = logits_of(model)
    folded = fold_random_transforms(copy.deepcopy(model), unrotated_layers=[1])
    torch.testing.assert_close(logits_of(folded), expected, atol=1e-5, rtol=0)
    wrong = fold_random_transforms(copy.deepcopy(model), unrotated_layers=[0, 1])  # a general map in a RoPE layer
    assert (logits_of(wrong) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {}), ("phi", dict(qk_layernorm=False)), ("smollm3", {}), ("smollm3", dict(no_rope_layers=[0, 0]))],
    ids=["llama", "phi-partial-rotary", "smollm3", "smollm3-no-rope-at-all"],
)
def test_aligned_merges_heads_that_differ_by_the_transforms_each_layer_admits(model_type, overrides, tmp_path, calibration_file):
    """Duplicated KV heads, each then given its own random transform (complex scales on rotary pairs,
    any linear map on unrotated dims, which in a layer without RoPE is the whole key, and any map on
    values), are still one head each: the aligned merge finds that and converts back exactly."""
    gqa_model = build_family_model(model_type, kv=2, seed=21, **overrides)
    family = family_for(model_type)
    config, state = expand_kv_heads(gqa_model, family, factor=4)
    source = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source.load_state_dict(state)
    unrotated = nope_layers(config) if model_type == "smollm3" else []
    src = save_model(config, fold_random_transforms(source, seed=3, unrotated_layers=unrotated).state_dict(), tmp_path / "src")
    save_char_tokenizer(src)
    expected = logits_of(gqa_model)
    torch.testing.assert_close(logits_of(src), expected, atol=1e-5, rtol=0)
    out = convert(str(src), tmp_path / "out", aligned_options(2, calibration_file)).out_dir
    torch.testing.assert_close(logits_of(out), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen3"])  # plain, fused qkv, per-head q/k norms
def test_refinement_keeps_exact_merges_exact(model_type, tmp_path, calibration_file):
    gqa_model = build_family_model(model_type, kv=2, seed=12)
    config, state = expand_kv_heads(gqa_model, family_for(model_type), factor=4)
    src = save_model(config, state, tmp_path / "mha")
    save_char_tokenizer(src)
    out = convert(str(src), tmp_path / "out", aligned_options(2, calibration_file, refine_steps=20)).out_dir
    torch.testing.assert_close(logits_of(out), logits_of(gqa_model), atol=1e-5, rtol=0)


def test_refinement_brings_a_lossy_merge_closer_to_the_source(tmp_path, calibration_file):
    model = build_family_model("llama", kv=4, seed=15)
    src = write_source(model, tmp_path / "src", calibration_file)
    text = torch.tensor([[ord(c) - 28 for c in ENGLISH[100:164]]])  # ids of save_char_tokenizer
    expected = logits_of(model, text)

    def error(out):
        return float((logits_of(out, text) - expected).pow(2).mean())

    plain = convert(str(src), tmp_path / "plain", aligned_options(1, calibration_file)).out_dir
    refined = convert(
        str(src), tmp_path / "refined", aligned_options(1, calibration_file, refine_steps=40, refine_batch=2)
    ).out_dir
    assert error(refined) < 0.9 * error(plain)
    assert read_provenance(refined)["conversion"]["refine"] == {"steps": 40, "lr": 1e-3, "batch": 2}
    assert read_provenance(plain)["conversion"]["refine"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--refine-steps", "5"], "add --method aligned"),
        (["--method", "aligned", "--refine-steps", "-1"], "at least 0"),
        (["--method", "aligned", "--refine-steps", "5", "--refine-batch", "0"], "--refine-batch at least 1"),
        (["--method", "aligned", "--device", "gpu0"], "is not a torch device"),
        (["--method", "aligned", "--calibration", "stdlib-docs:tests"], "the corpus splits are stdlib-docs:train"),
        (["--method", "aligned", "--device", "meta"], "runs on cpu or cuda only"),
    ],
)
def test_refinement_flags_are_checked(flags, message, tmp_path, capsys):
    from gqa.train.cli import main

    src = save_model(*_llama_state(), tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "out"), "--kv-heads", "1", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused(tmp_path, capsys):
    from gqa.train.cli import main

    src = save_model(*_llama_state(), tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "out"), "--kv-heads", "1", "--method", "aligned", "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_on_the_gpu_matches_the_cpu(tmp_path, calibration_file):
    model = build_family_model("llama", kv=4, seed=15)
    src = write_source(model, tmp_path / "src", calibration_file)
    for steps, tolerance in ((0, 1e-4), (20, 1e-2)):  # Adam's normalised steps amplify rounding differences
        outs = {
            device: convert(
                str(src), tmp_path / f"{device}-{steps}", aligned_options(1, calibration_file, refine_steps=steps, device=device)
            ).out_dir
            for device in ("cpu", "cuda")
        }
        torch.testing.assert_close(logits_of(outs["cuda"]), logits_of(outs["cpu"]), atol=tolerance, rtol=0)


def test_calibration_can_name_the_training_corpus(tmp_path):
    from safetensors.torch import load_file

    from gqa.convert.corpus import corpus_text

    model = build_family_model("llama", kv=4, seed=18)
    src = save_model(model.config, model.state_dict(), tmp_path / "src")
    save_char_tokenizer(src)
    (tmp_path / "train.txt").write_text(corpus_text("train"))
    outs = [
        convert(str(src), tmp_path / name, aligned_options(1, calibration, refine_steps=2)).out_dir
        for name, calibration in (("named", "stdlib-docs:train"), ("file", tmp_path / "train.txt"))
    ]
    weights = [load_file(next(out.glob("*.safetensors"))) for out in outs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=0, rtol=0)
    assert read_provenance(outs[0])["conversion"]["calibration"] == "stdlib-docs:train"


def _llama_state():
    model = build_family_model("llama", kv=4, seed=16)
    return model.config, model.state_dict()


def test_calibration_longer_than_the_context_is_cut_to_it(tmp_path, calibration_file, caplog):
    model = build_family_model("llama", kv=4, seed=17)  # max_position_embeddings 256
    src = write_source(model, tmp_path / "src", calibration_file)
    outs = {}
    for length in (1000, 256):
        options = ConvertOptions(kv_heads=2, method="aligned", calibration=str(calibration_file), calibration_sequences=2,
                                 calibration_length=length)  # fmt: skip
        with caplog.at_level("WARNING", logger="gqa.convert.convert"):
            outs[length] = load_tensors(convert(str(src), tmp_path / f"out-{length}", options).out_dir)
    assert "--calibration-length 1000 is longer than the model's context; using 256" in caplog.text
    # The cut conversion is the one calibrated on 256-token sequences, bit for bit.
    assert outs[1000].keys() == outs[256].keys()
    for name, tensor in outs[256].items():
        assert torch.equal(outs[1000][name], tensor), name


@pytest.mark.parametrize("lr", [0.3, 1e3])  # worse but finite; diverged to NaN
def test_refinement_that_does_not_help_is_put_back(lr, tmp_path, calibration_file):
    """Refinement at an absurd learning rate makes every layer worse: its weights must be put back,
    leaving exactly the unrefined conversion."""
    model = build_family_model("llama", kv=4, seed=15)
    src = write_source(model, tmp_path / "src", calibration_file)
    plain = convert(str(src), tmp_path / "plain", aligned_options(1, calibration_file)).out_dir
    wild = convert(str(src), tmp_path / "wild", aligned_options(1, calibration_file, refine_steps=5, refine_lr=lr)).out_dir
    before, after = (load_tensors(out) for out in (plain, wild))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_each_layer_calibrates_under_its_own_attention_mask(tmp_path, calibration_file):
    """Layer 1 of this Qwen2 model attends through a 4-token sliding window, layer 0 to everything.
    Against the same weights with full attention in both layers, layer 0 converts the same and
    layer 1's refitted o_proj, fitted to what the layer's own attention outputs, does not."""
    converted = {}
    for name, overrides in (("full", {}), ("sliding", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1))):
        model = build_family_model("qwen2", kv=4, seed=19, **overrides)
        assert model.config.layer_types == (["full_attention"] * 2 if name == "full" else ["full_attention", "sliding_attention"])
        src = write_source(model, tmp_path / name, calibration_file)
        converted[name] = load_tensors(convert(str(src), tmp_path / f"out-{name}", aligned_options(1, calibration_file)).out_dir)
    full, sliding = converted["full"], converted["sliding"]
    for name in full:
        if name.startswith("model.layers.0."):
            assert torch.equal(full[name], sliding[name]), name
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert (full[o_proj] - sliding[o_proj]).abs().max() > 1e-3


def test_demo_refines_harder_only_on_a_gpu():
    from gqa.train.demo import conversion_options

    cpu, gpu = (conversion_options(1, "aligned", None, gpu=on_gpu) for on_gpu in (False, True))
    assert (cpu.refine_steps, cpu.refine_batch, cpu.calibration, cpu.calibration_sequences, cpu.calibration_length) == (
        400, 4, None, 128, 256)  # fmt: skip
    assert (gpu.refine_steps, gpu.refine_batch, gpu.calibration, gpu.calibration_sequences, gpu.calibration_length) == (
        1600, 32, "stdlib-docs:train", 512, 512)  # fmt: skip
    assert conversion_options(1, "aligned", 0, gpu=True).refine_steps == 0  # --refine-steps 0 still skips it
    assert conversion_options(1, "mean", None, gpu=True).refine_steps == 0


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_calibration_fits_the_attention_transformers_computes(model_type, tmp_path, calibration_file, monkeypatch):
    """The o_proj refit (and refinement, whose target is made of the same outputs) fits each source
    layer's attention as plain transformers computes it on the calibration tokens: Gemma-2's
    attention-logit soft-capping and query_pre_attn_scalar, each layer's window and RoPE base. A merge
    of duplicated heads stays exact even when these targets are wrong, so this compares them directly."""
    from transformers import AutoModelForCausalLM

    from gqa.convert import calibration

    fitted = []
    real_refit = calibration.refit_output_projection

    def recording_refit(source_heads, *args):
        fitted.append(source_heads.clone())
        return real_refit(source_heads, *args)

    monkeypatch.setattr(calibration, "refit_output_projection", recording_refit)
    model = build_family_model(model_type, kv=4, seed=21)
    src = write_source(model, tmp_path / "src", calibration_file)
    options = aligned_options(2, calibration_file)
    convert(str(src), tmp_path / "out", options)

    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    o_proj = family_for(model_type).o_proj.rsplit(".", 1)[0]
    computed = []
    for layer in range(loaded.config.num_hidden_layers):
        module = loaded.get_submodule(ATTENTION_PREFIX.format(i=layer) + o_proj)
        module.register_forward_pre_hook(lambda mod, args: computed.append(args[0]))
    tokens = calibration.calibration_tokens(src, ENGLISH, options.calibration_sequences, options.calibration_length)
    with torch.no_grad():
        loaded(tokens)
    assert len(fitted) == len(computed) == loaded.config.num_hidden_layers
    for layer, (target, expected) in enumerate(zip(fitted, computed)):
        torch.testing.assert_close(target, expected, atol=1e-6, rtol=0, msg=f"layer {layer}")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text"])
def test_rotary_frequencies_are_each_layers_own(model_type):
    """The rotary angles the key alignment weights pairs by are the ones each layer rotates with:
    Gemma-3's sliding-window layers use the local base, its global layers the scaled global one."""
    from gqa.convert.families import rotary_frequencies

    model = build_family_model(model_type, kv=2)
    geometry = geometry_of(model.config)
    rotary = model.model.rotary_emb
    for layer in range(geometry.layers):
        layer_type = getattr(model.config, "layer_types", None)
        own = getattr(rotary, f"{layer_type[layer]}_inv_freq", None) if layer_type else None
        own = rotary.inv_freq if own is None else own
        torch.testing.assert_close(rotary_frequencies(model.config, geometry, layer), own.double(), rtol=1e-6, atol=0)
    if model_type == "gemma3_text":
        local, full = (rotary_frequencies(model.config, geometry, layer) for layer in (0, 1))
        assert not torch.allclose(local, full)
