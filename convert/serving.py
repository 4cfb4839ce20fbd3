"""Where a converted checkpoint serves with its smaller KV cache: one record per family and engine.

A GQA checkpoint that transformers loads is only worth its smaller cache where an engine builds the
attention from `num_key_value_heads`. Some engine model files build full multi-head attention from
`num_attention_heads` instead, or size a key norm for every query head; such a checkpoint then fails
to load there (the K/V weights are smaller than the engine expects). Each record below was read from
the named engine file of the version given; a new family gets its records with its Family entry.
"""

from __future__ import annotations

from dataclasses import dataclass

YES = "yes"  # serves, KV projections and KV cache sized from num_key_value_heads (gpt_bigcode: multi_query)
NO = "no"  # the engine has the architecture but builds K/V (or a key norm) for every query head
NOT_SUPPORTED = "not supported"  # the engine lacks the architecture altogether
UNKNOWN = "unknown"  # the engine code did not settle it
STATUSES = (YES, NO, NOT_SUPPORTED, UNKNOWN)


@dataclass(frozen=True)
class Engine:
    key: str
    name: str
    version: str  # the release whose code the records were read from


ENGINES: tuple[Engine, ...] = (
    Engine("vllm", "vLLM", "vllm 0.34.0"),
    Engine("sglang", "SGLang", "sglang 0.5.23"),
    Engine("llama.cpp", "llama.cpp", "llama.cpp 0c1e570 (vendored by llama-cpp-python 0.3.36)"),
)
ENGINE_BY_KEY = {engine.key: engine for engine in ENGINES}


@dataclass(frozen=True)
class Serving:
    engine: str  # an ENGINES key
    status: str  # one of STATUSES
    evidence: str  # the engine file and function or class that decides it
    remedy: str = ""  # what a user can do where status is not "yes"

    @property
    def version(self) -> str:
        return ENGINE_BY_KEY[self.engine].version

    @property
    def serves_as_gqa(self) -> bool:
        return self.status == YES


# Shared evidence: the engine paths several families take.
_VLLM = "vllm/model_executor/models/"
_VLLM_HF = (
    f"{_VLLM}registry.py maps {{arch}} to the Transformers backend (_TRANSFORMERS_SUPPORTED_MODELS); "
    f"{_VLLM}transformers/base.py _create_attention_instances sizes each layer's Attention with "
    "num_kv_heads=model_config.get_num_kv_heads() (num_key_value_heads, via CONFIG_FIELD_ALIASES), and the "
    "k/v projections are transformers' own modules, sized from num_key_value_heads"
)
_SGL = "sglang/srt/models/"
_LCPP_TEXT = (
    "conversion/base.py TextModel.set_gguf_parameters writes head_count_kv from num_key_value_heads; "
)


def _vllm_native(file: str, cls: str) -> Serving:
    return Serving("vllm", YES, f"{_VLLM}{file} {cls} passes config.num_key_value_heads as num_kv_heads "
                                "(QKVParallelLinear total_num_kv_heads, Attention num_kv_heads)")


def _vllm_hf(arch: str) -> Serving:
    return Serving("vllm", YES, _VLLM_HF.format(arch=arch))


def _sgl(file: str, cls: str) -> Serving:
    return Serving("sglang", YES, f"{_SGL}{file} {cls} takes num_kv_heads from config.num_key_value_heads "
                                  "(QKVParallelLinear, RadixAttention num_kv_heads)")


def _lcpp(converter: str, runtime: str, extra: str = "") -> Serving:
    return Serving("llama.cpp", YES, f"convert_hf_to_gguf.py {converter}: {extra or _LCPP_TEXT}"
                                     f"src/models/{runtime} load_arch_tensors sizes wk/wv from n_embd_k_gqa/n_embd_gqa "
                                     "(head_count_kv)")


_SGL_HF_REMEDY = (
    "SGLang's Transformers backend (--model-impl transformers) sizes attention from num_key_value_heads "
    "(sglang/srt/models/transformers.py _create_attention_instances); or serve with vLLM"
)

SERVING: dict[str, tuple[Serving, ...]] = {
    "llama": (
        _vllm_native("llama.py", "LlamaDecoderLayer"),
        _sgl("llama.py", "LlamaDecoderLayer"),
        _lcpp("LlamaModel (conversion/llama.py)", "llama.cpp",
              _LCPP_TEXT + "LlamaModel.modify_tensors permutes k_proj with num_key_value_heads; "),
    ),
    "mistral": (
        _vllm_native("mistral.py", "MistralDecoderLayer (LlamaDecoderLayer with MistralAttention)"),
        Serving("sglang", YES, f"{_SGL}mistral.py MistralForCausalLM subclasses llama.py LlamaForCausalLM, whose "
                               "LlamaDecoderLayer takes num_kv_heads from config.num_key_value_heads"),
        _lcpp("LlamaModel (conversion/llama.py, registered for MistralForCausalLM)", "llama.cpp"),
    ),
    "qwen2": (
        _vllm_native("qwen2.py", "Qwen2DecoderLayer"),
        _sgl("qwen2.py", "Qwen2DecoderLayer"),
        _lcpp("Qwen2Model (conversion/qwen.py)", "qwen2.cpp"),
    ),
    "gemma": (
        _vllm_hf("GemmaForCausalLM"),
        _sgl("gemma.py", "GemmaDecoderLayer"),
        _lcpp("GemmaModel.set_gguf_parameters (conversion/gemma.py)", "gemma.cpp",
              "GemmaModel.set_gguf_parameters writes head_count_kv from num_key_value_heads; "),
    ),
    "phi3": (
        Serving("vllm", YES, f"{_VLLM}phi3.py Phi3ForCausalLM subclasses llama.py LlamaForCausalLM: LlamaDecoderLayer "
                             "passes config.num_key_value_heads; the fused qkv_proj loads into QKVParallelLinear"),
        Serving("sglang", YES, f"{_SGL}llama.py Phi3ForCausalLM subclasses LlamaForCausalLM (num_kv_heads from "
                               "config.num_key_value_heads)"),
        _lcpp("Phi3MiniModel.set_gguf_parameters (conversion/phi.py)", "phi3.cpp",
              "Phi3MiniModel.set_gguf_parameters writes head_count_kv from num_key_value_heads; "),
    ),
    "stablelm": (
        _vllm_hf("StableLmForCausalLM"),
        Serving("sglang", YES, f"{_SGL}stablelm.py StablelmAttention sizes qkv_proj and RadixAttention from "
                               "config.num_key_value_heads (its model has no q/k LayerNorm: qk_layernorm checkpoints "
                               "do not load there, whatever their KV heads)"),
        _lcpp("StableLMModel (conversion/stablelm.py)", "stablelm.cpp",
              "StableLMModel.set_gguf_parameters writes head_count_kv from num_key_value_heads (a qk_layernorm "
              "checkpoint does not convert, MHA or GQA: modify_tensors never writes the stacked per-head norms, "
              "'Unprocessed norms'); "),
    ),
    "olmo": (
        _vllm_hf("OlmoForCausalLM"),
        Serving("sglang", NO, f"{_SGL}olmo.py OlmoAttention builds MHA: QKVParallelLinear and RadixAttention "
                              "num_kv_heads from num_attention_heads, ignoring num_key_value_heads",
                _SGL_HF_REMEDY),
        _lcpp("OlmoModel (conversion/olmo.py)", "olmo.cpp",
              _LCPP_TEXT + "OlmoModel.modify_tensors permutes k_proj with num_key_value_heads; "),
    ),
    "olmo2": (
        _vllm_hf("Olmo2ForCausalLM"),
        Serving("sglang", YES, f"{_SGL}olmo2.py Olmo2Attention takes total_num_kv_heads from config.num_key_value_heads "
                               "(QKVParallelLinear, k_norm over num_kv_heads*head_dim, RadixAttention)"),
        _lcpp("Olmo2Model (conversion/olmo.py)", "olmo2.cpp",
              _LCPP_TEXT + "olmo2.cpp sizes attn_k_norm {n_head_kv * n_embd_head}; "),
    ),
    "qwen3": (
        _vllm_native("qwen3.py", "Qwen3DecoderLayer"),
        _sgl("qwen3.py", "Qwen3DecoderLayer"),
        _lcpp("Qwen3Model (conversion/qwen.py)", "qwen3.cpp"),
    ),
    "phi": (
        _vllm_hf("PhiForCausalLM"),
        Serving("sglang", NO, f"{_SGL}phi.py PhiAttention builds MHA: QKVParallelLinear and RadixAttention num_kv_heads "
                              "from num_attention_heads, ignoring num_key_value_heads",
                _SGL_HF_REMEDY),
        Serving("llama.cpp", NO, "convert_hf_to_gguf.py conversion/phi.py Phi2Model.set_gguf_parameters writes "
                                 "head_count_kv(n_head), the query head count, so src/models/phi2.cpp load_arch_tensors "
                                 "expects K/V of every query head and the smaller k/v tensors fail to load",
                "phi2.cpp itself sizes K/V from head_count_kv: write the config's num_key_value_heads into the GGUF "
                "(gguf-py's gguf_set_metadata.py FILE phi2.attention.head_count_kv G) and it loads; or serve with vLLM"),
    ),
    "gemma2": (
        _vllm_native("gemma2.py", "Gemma2DecoderLayer"),
        _sgl("gemma2.py", "Gemma2DecoderLayer"),
        _lcpp("Gemma2Model.set_gguf_parameters (conversion/gemma.py)", "gemma2.cpp",
              "Gemma2Model.set_gguf_parameters writes head_count_kv from num_key_value_heads; "),
    ),
    "gemma3_text": (
        _vllm_native("gemma3.py", "Gemma3DecoderLayer"),
        Serving("sglang", YES, f"{_SGL}gemma3_causal.py Gemma3Attention takes total_num_kv_heads from "
                               "config.num_key_value_heads (QKVParallelLinear, RadixAttention)"),
        _lcpp("Gemma3Model.set_gguf_parameters (conversion/gemma.py)", "gemma3.cpp",
              "Gemma3Model.set_gguf_parameters writes head_count_kv from num_key_value_heads; "),
    ),
    "granite": (
        _vllm_native("granite.py", "GraniteDecoderLayer"),
        _sgl("granite.py", "GraniteDecoderLayer"),
        _lcpp("GraniteModel (conversion/granite.py, a LlamaModel)", "granite.cpp"),
    ),
    "starcoder2": (
        _vllm_hf("Starcoder2ForCausalLM"),
        Serving("sglang", YES, f"{_SGL}starcoder2.py Starcoder2Attention takes total_num_kv_heads from "
                               "config.num_key_value_heads (QKVParallelLinear, RadixAttention)"),
        _lcpp("StarCoder2Model (conversion/starcoder.py)", "starcoder2.cpp"),
    ),
    "smollm3": (
        _vllm_hf("SmolLM3ForCausalLM"),
        Serving("sglang", YES, "no native model: sglang/srt/model_loader/utils.py get_model_architecture falls back to "
                               f"the Transformers backend, whose {_SGL}transformers.py _create_attention_instances sets "
                               "RadixAttention num_kv_heads from num_key_value_heads"),
        _lcpp("SmolLM3Model (conversion/llama.py, a LlamaModel)", "smollm3.cpp"),
    ),
    "mixtral": (
        _vllm_native("mixtral.py", "MixtralDecoderLayer"),
        _sgl("mixtral.py", "MixtralDecoderLayer"),
        _lcpp("LlamaModel (conversion/llama.py, registered for MixtralForCausalLM)", "llama.cpp"),
    ),
    "qwen2_moe": (
        _vllm_native("qwen2_moe.py", "Qwen2MoeDecoderLayer"),
        _sgl("qwen2_moe.py", "Qwen2MoeDecoderLayer"),
        _lcpp("Qwen2MoeModel (conversion/qwen.py)", "qwen2moe.cpp"),
    ),
    "qwen3_moe": (
        _vllm_native("qwen3_moe.py", "Qwen3MoeDecoderLayer"),
        _sgl("qwen3_moe.py", "Qwen3MoeDecoderLayer"),
        _lcpp("Qwen3MoeModel (conversion/qwen.py)", "qwen3moe.cpp"),
    ),
    "olmoe": (
        _vllm_hf("OlmoeForCausalLM"),
        Serving("sglang", NO, f"{_SGL}olmoe.py OlmoeAttention sizes k_norm = RMSNorm(hidden_size), every query head's "
                              "width, while a GQA checkpoint's k_norm and keys are num_key_value_heads*head_dim wide: "
                              "default_weight_loader's size check refuses it",
                _SGL_HF_REMEDY),
        Serving("llama.cpp", NO, "src/models/olmoe.cpp llama_model_olmoe::load_arch_tensors creates attn_k_norm "
                                 "{n_embd} (every query head) though wk is n_embd_gqa wide: the converted k_norm "
                                 "(num_key_value_heads*head_dim) fails to load",
                "serve with vLLM (its Transformers backend sizes OLMoE's k_norm from num_key_value_heads)"),
    ),
    # What a GPT-2 source converts to (gqa.convert.gpt2): one KV head, set by multi_query.
    "gpt_bigcode": (
        Serving("vllm", YES, f"{_VLLM}registry.py maps GPTBigCodeForCausalLM to the Transformers backend "
                             "(_TRANSFORMERS_SUPPORTED_MODELS); transformers' GPTBigCodeConfig.__post_init__ sets "
                             "num_key_value_heads = 1 for multi_query (transformers 5.16.1 and 5.22.2, the ends of the "
                             f"range vllm 0.34.0 requires), which {_VLLM}transformers/base.py _create_attention_instances "
                             "gives each layer's Attention as num_kv_heads (get_num_kv_heads, via CONFIG_FIELD_ALIASES); "
                             f"{_VLLM}transformers/fusers/packed_qkv.py PackedQKVFuser builds c_attn's (q, kv, kv) split as a "
                             "QKVParallelLinear of one KV head"),
        Serving("sglang", YES, f"{_SGL}gpt_bigcode.py GPTBigCodeAttention takes one KV head from config.multi_query "
                               "(QKVParallelLinear total_num_kv_heads, RadixAttention num_kv_heads), and "
                               "sglang/srt/configs/model_config.py ModelConfig.get_total_num_kv_heads returns 1 for "
                               "multi_query (the KV cache pool)"),
        Serving("llama.cpp", YES, "convert_hf_to_gguf.py StarCoderModel (conversion/starcoder.py, registered for "
                                  "GPTBigCodeForCausalLM): set_gguf_parameters writes head_count_kv(1); "
                                  "src/models/starcoder.cpp load_arch_tensors sizes wqkv {n_embd, n_embd + 2*n_embd_gqa} "
                                  "and src/llama-kv-cache.cpp the cache from n_embd_k_gqa/n_embd_v_gqa (head_count_kv). "
                                  "StarCoderModel writes feed_forward_length 4*n_embd: a GPT-2 that sets n_inner to "
                                  "another width does not load, whatever its KV heads"),
    ),
}


def serving_of(model_type: str) -> tuple[Serving, ...]:
    """The records of a family (by any of its model types), one per engine in ENGINES order."""
    return SERVING[model_type]


def engines_not_serving(model_type: str) -> list[Serving]:
    """The records of the engines where a GQA checkpoint of this family does not serve as GQA."""
    return [record for record in serving_of(model_type) if not record.serves_as_gqa]


def serving_warnings(model_type: str, family: str, heads: int, kv_heads: int) -> list[str]:
    """One message per engine where a `family` checkpoint with `kv_heads` KV heads for `heads` query heads
    will not serve as GQA, saying why and what to do instead; none for an MHA output (kv_heads == heads)."""
    if kv_heads >= heads:
        return []
    serving = [ENGINE_BY_KEY[r.engine].name for r in serving_of(model_type) if r.serves_as_gqa]
    elsewhere = f", and serves as GQA in {', '.join(serving)}" if serving else ""
    messages = []
    for record in engines_not_serving(model_type):
        engine = ENGINE_BY_KEY[record.engine]
        remedy = f" What to do: {record.remedy}." if record.remedy else ""
        messages.append(
            f"warning: a {family} checkpoint with {kv_heads} KV heads for {heads} query heads will not serve as GQA "
            f"in {engine.name} ({record.status}; read from {engine.version}): {record.evidence}.{remedy} The output "
            f"loads in transformers{elsewhere}. The conversion goes on."
        )
    return messages


def config_warnings(config) -> list[str]:
    """Warnings that the output's own config settles, beside its family's records (see serving_warnings):
    llama.cpp's GPTBigCode converter writes the feed-forward width as 4 * n_embd whatever n_inner says, so
    an output of another width does not load there, whatever its KV heads."""
    if config.model_type != "gpt_bigcode" or config.n_inner in (None, 4 * config.n_embd):
        return []
    return [
        f"warning: this GPTBigCode checkpoint's feed-forward width n_inner={config.n_inner} is not 4 x n_embd "
        f"({4 * config.n_embd}); llama.cpp's convert_hf_to_gguf.py StarCoderModel ({ENGINE_BY_KEY['llama.cpp'].version}) "
        "writes feed_forward_length 4*n_embd whatever n_inner says, so the output will not load in llama.cpp. It "
        "loads in transformers. The conversion goes on."
    ]
