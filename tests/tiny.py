"""Tiny models built in code, saved as real checkpoints on disk, for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gqa.convert.families import FAMILIES


def tiny_llama_config(**overrides) -> LlamaConfig:
    config = family_config("llama", kv=8)
    config.attention_bias = False
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_llama(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised tiny Llama (MHA by default) as a safetensors checkpoint."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**overrides), dtype=torch.float32)
    model.save_pretrained(path)
    return Path(path)


# One tiny config per supported family, each exercising its quirk (biases, head_dim, fused qkv,
# partial rotary, per-head and all-head norms). `kv` is the number of KV heads; 8 query heads.
# `overrides` go to the config's constructor, so derived fields (Qwen2's layer_types) follow them.
def family_config(model_type: str, kv: int, **overrides):
    import transformers as tf

    common = dict(  # hidden 64, 8 query heads of 8 dims, 2 layers, vocab 128
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    partial = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    factories = {
        "llama": (tf.LlamaConfig, dict(attention_bias=True)),
        "mistral": (tf.MistralConfig, {}),
        "qwen2": (tf.Qwen2Config, {}),
        "gemma": (tf.GemmaConfig, dict(head_dim=16)),
        "phi3": (tf.Phi3Config, dict(pad_token_id=0)),
        "stablelm": (tf.StableLmConfig, dict(use_qkv_bias=True, qk_layernorm=True, rope_parameters=partial)),
        "olmo": (tf.OlmoConfig, dict(pad_token_id=0)),
        "olmo2": (tf.Olmo2Config, dict(pad_token_id=0)),
        "qwen3": (tf.Qwen3Config, dict(head_dim=16)),
        "phi": (tf.PhiConfig, dict(qk_layernorm=True, rope_parameters=partial)),
        # Gemma-2 and Gemma-3: a sliding-window layer then a global one, the window shorter than the
        # tests' sequences; query_pre_attn_scalar is not head_dim; the soft-caps are small enough to
        # bend the tiny model's logits; Gemma-3's global layers use their own, scaled, RoPE.
        "gemma2": (tf.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=4, sliding_window=4,
                                         attn_logit_softcapping=0.1, final_logit_softcapping=0.5)),  # fmt: skip
        "gemma3_text": (tf.Gemma3TextConfig, dict(
            head_dim=16, query_pre_attn_scalar=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        )),  # fmt: skip
    }
    # Granite (non-default multipliers), Starcoder2, SmolLM3 (layer 1 without RoPE) and the MoE families
    # (4 experts, 2 per token: attention is all that changes).
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    factories.update(
        {
            "granite": (tf.GraniteConfig, dict(attention_multiplier=0.25, residual_multiplier=0.5, embedding_multiplier=6.0,
                                               logits_scaling=2.0, attention_bias=True)),  # fmt: skip
            "starcoder2": (tf.Starcoder2Config, dict(use_bias=True)),
            "smollm3": (tf.SmolLM3Config, dict(no_rope_layer_interval=2, pad_token_id=0)),
            "mixtral": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
            "qwen2_moe": (tf.Qwen2MoeConfig, dict(num_experts=4, shared_expert_intermediate_size=64, **moe)),
            "qwen3_moe": (tf.Qwen3MoeConfig, dict(num_experts=4, head_dim=16, **moe)),
            "olmoe": (tf.OlmoeConfig, dict(num_experts=4, pad_token_id=0, **moe)),
        }
    )
    if model_type not in factories:
        raise KeyError(f"tests/tiny.py has no tiny config for the supported family '{model_type}': add one")
    config_class, quirks = factories[model_type]
    return config_class(**{**common, **quirks, **overrides})


# Every family gqa supports, read from its family table: a new family joins every test by itself.
FAMILY_TYPES = tuple(fam.model_types[0] for fam in FAMILIES)


def build_family_model(model_type: str, kv: int, seed: int = 0, tied: bool = False, **overrides):
    torch.manual_seed(seed)
    config = family_config(model_type, kv, tie_word_embeddings=tied, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so merging them is really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def expand_kv_heads(model, family, factor: int):
    """An exact MHA (or larger-GQA) copy of a GQA model: each KV head repeated `factor` times, the
    way HF's repeat_kv lets query heads share it. Returns (config, state_dict)."""
    import copy

    from gqa.convert.families import ATTENTION_PREFIX, geometry_of

    config = copy.deepcopy(model.config)
    geometry = geometry_of(config)
    kv, d = geometry.kv_heads, geometry.head_dim
    config.num_key_value_heads = kv * factor
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in range(geometry.layers):
        prefix = ATTENTION_PREFIX.format(i=layer)

        def repeat_rows(t):
            return t.reshape(kv, d, *t.shape[1:]).repeat_interleave(factor, 0).reshape(kv * factor * d, *t.shape[1:])

        for rel in family.kv_stacked:
            if prefix + rel in state:
                state[prefix + rel] = repeat_rows(state[prefix + rel])
        for rel in family.fused_qkv:
            q, k, v = state[prefix + rel].split([geometry.heads * d, kv * d, kv * d])
            state[prefix + rel] = torch.cat([q, repeat_rows(k), repeat_rows(v)])
        for pattern in family.kv_per_head:
            if prefix + pattern.format(j=0) not in state:  # StableLM without q/k LayerNorm
                continue
            heads = [state.pop(prefix + pattern.format(j=j)) for j in range(kv)]
            for j in range(kv * factor):
                state[prefix + pattern.format(j=j)] = heads[j // factor].clone()
    return config, state


def save_model(config, state_dict, path, max_shard_size="5GB") -> Path:
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def logits_of(model_or_path, tokens: torch.Tensor | None = None) -> torch.Tensor:
    model = model_or_path
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    model.eval()
    if tokens is None:
        tokens = torch.arange(3, 3 + 24).reshape(2, 12) % 128
    with torch.no_grad():
        return model(tokens).logits


def save_char_tokenizer(path) -> None:
    """A character-level tokenizer whose ids fit the tiny models' vocabulary of 128: one id per
    printable ASCII character, so any English text tokenises without training anything."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    vocab.update({chr(c): c - 28 for c in range(32, 127)})  # ids 4..98
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


ENGLISH = (
    "Attention lets every position of a sequence look at every earlier position. Each head projects the "
    "input into queries, keys and values; a query scores the keys, the scores become weights, and the "
    "weights mix the values. Grouped-query attention lets several query heads share one key and value "
    "head, so the cache that holds past keys and values while a model generates text becomes smaller. "
) * 40


def load_tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor in a model directory's safetensors files."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
