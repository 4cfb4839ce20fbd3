"""Which parameters train: all of them (the paper's choice), the attention blocks, only keys and values,
or low-rank adapters (LoRA, through peft) with the merged key/value projections trained fully.

Where the attention blocks are and which of their modules serve keys and values alone is asked of
the family table (gqa.convert.families), the one place that knows architectures.

Under `lora`, the frozen base weights of a 16-bit checkpoint stay in its dtype (half the memory of fp32
master weights) and only the trainable parameters are fp32; the adapters are merged into the weights
before the final model is saved, so the output is a plain checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gqa.convert.errors import GQAError
from gqa.convert.families import Family, trained_family_for

if TYPE_CHECKING:
    from gqa.train.recipe import LoraSection, TrainSection

logger = logging.getLogger(__name__)


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """The names of the parameters that train under `train.params=which` (all, attention or kv)."""
    names = {name for name, _ in model.named_parameters()}
    if which == "all":
        return names
    if which == "lora":
        raise GQAError("train.params=lora: the adapters are built by gqa.train.params.apply_lora, not chosen by name")
    if which not in ("attention", "kv"):
        raise GQAError(f"train.params={which}: not supported by this build; use all, attention, kv or lora")
    family = trained_family_for(model.config.model_type)
    if which == "kv" and family.fused_qkv:
        raise GQAError(
            f"train.params=kv: {family.name} fuses queries, keys and values into one '{family.fused_qkv[0]}' matrix, "
            "so keys and values cannot train alone; use train.params=attention"
        )
    prefixes = []
    for layer in range(model.config.num_hidden_layers):
        attention = family.attention_prefix.format(i=layer)
        prefixes += [attention] if which == "attention" else [f"{attention}{module}." for module in family.kv_modules]
    chosen = {name for name in names if name.startswith(tuple(prefixes))}
    if not chosen:
        raise GQAError(f"train.params={which}: no parameters matched in {type(model).__name__}; use train.params=all")
    return chosen


def select_trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze everything outside the chosen set; return the trainable parameters."""
    chosen = trainable_names(model, which)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if param.requires_grad:
            trainable.append(param)
    _log_trainable(model, which)
    return trainable


def prepare_model(model: nn.Module, train: TrainSection, seed: int) -> nn.Module:
    """The model set up as training runs it: no KV cache, gradient checkpointing when train asks for it, and
    the trained parameter set (train.params) requiring gradients, under lora the peft model. The loop and
    the memory plan both build their model through here, so the plan measures the model that trains.

    The adapters' initial values come from `seed` alone, whatever drew random numbers before; the global
    generator is left as it was.
    """
    model.config.use_cache = False
    if train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.params != "lora":
        select_trainable(model, train.params)
        return model
    # With gradient checkpointing and frozen embeddings, the checkpointed layers' inputs must still carry
    # gradients to the adapters: transformers' activation_checkpointing_enable and peft's get_peft_model
    # both hook the input embeddings for that (enable_input_require_grads).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_lora(model, train.lora)


# --- LoRA -----------------------------------------------------------------------------------------


def weights_dtype(params: str, stored: torch.dtype | None) -> torch.dtype:
    """The dtype the model's weights are loaded in: fp32 master weights, except under lora, where the
    frozen base keeps a 16-bit checkpoint's own dtype (half of fp32, and never rounded: the frozen
    tensors come out as they went in); apply_lora turns the trainable parameters to fp32."""
    if params == "lora" and stored in (torch.bfloat16, torch.float16):
        return stored
    return torch.float32


def _module(rel: str) -> str:
    """'qkv_proj.weight' -> 'qkv_proj': the attention submodule a family-table tensor belongs to."""
    return rel.rsplit(".", 1)[0]


def kv_modules(family: Family) -> tuple[str, ...]:
    """Attention submodules that train fully under train.lora.train_kv: the ones the merge changed.

    Separate projections: the key and value projections (and a key norm). Fused (Phi-3's qkv_proj):
    the fused matrix, its query rows included, since one matrix cannot train only in part.
    """
    return tuple(_module(rel) for rel in family.fused_qkv) if family.fused_qkv else family.kv_modules


def default_targets(family: Family, train_kv: bool) -> tuple[str, ...]:
    """The attention projections that get adapters when train.lora.targets is null."""
    projections = tuple(_module(rel) for rel in family.fused_qkv) or family.projections
    chosen = (*projections, _module(family.o_proj))
    return tuple(m for m in chosen if not (train_kv and m in kv_modules(family)))


def lora_plan(model: nn.Module, lora: LoraSection) -> tuple[list[str], list[str]]:
    """(modules that get adapters, modules that train fully), as full module names of `model`."""
    family = trained_family_for(model.config.model_type)
    modules = dict(model.named_modules())
    layers = range(model.config.num_hidden_layers)

    def in_attention(names) -> list[str]:
        found = [f"{family.attention_prefix.format(i=i)}{m}" for i in layers for m in names]
        return [name for name in found if name in modules]

    full = in_attention(kv_modules(family)) if lora.train_kv else []
    if lora.targets is None:
        targets = in_attention(default_targets(family, lora.train_kv))
    else:
        targets = []
        for target in lora.targets:
            matched = [name for name in modules if name == target or name.endswith(f".{target}")]
            if not matched:
                examples = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, nn.Linear)})
                raise GQAError(
                    f"train.lora.targets: '{target}' matches no module of {type(model).__name__}; "
                    f"its linear modules are named {', '.join(examples)}"
                )
            targets += [name for name in matched if name not in targets]
        inside_full = [name for name in targets if any(name == f or name.startswith(f"{f}.") for f in full)]
        overlap = sorted({name.rsplit(".", 1)[-1] for name in inside_full})
        if overlap:
            raise GQAError(
                f"train.lora.targets names {', '.join(overlap)}, which train.lora.train_kv trains fully (without "
                "adapters); remove it from train.lora.targets, or set train.lora.train_kv: false"
            )
    if not targets:
        raise GQAError(
            f"train.params=lora: no module of {type(model).__name__} to put adapters on; set train.lora.targets"
        )
    return targets, full


def apply_lora(model: nn.Module, lora: LoraSection, trainable_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The peft model of `model` with adapters on the LoRA targets, and (train_kv) the merged key/value
    modules trainable in full; everything else frozen. Trainable parameters are turned to
    `trainable_dtype`, the frozen ones keep the model's dtype. Works on meta-device models too.

    Adapter initialisation draws random numbers: seed the generator first for a reproducible run.
    """
    from peft import LoraConfig, get_peft_model

    targets, full = lora_plan(model, lora)
    fully_trained = [p for name, p in model.named_parameters() if name.startswith(tuple(f"{f}." for f in full))]
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. a target peft cannot adapt
        raise GQAError(f"train.lora.targets: peft cannot put adapters on {lora.targets}: {err}") from None
    for param in fully_trained:
        param.requires_grad_(True)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != trainable_dtype:
            param.data = param.data.to(trainable_dtype)
    if full:
        family = trained_family_for(model.config.model_type)
        if family.fused_qkv:
            logger.info("train.lora.train_kv: %s fuses q, k and v in %s, which trains fully (its query rows too)",
                        family.name, ", ".join(kv_modules(family)))
    _log_trainable(peft_model, "lora")
    return peft_model


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters merged into its weights (in place)."""
    return model.merge_and_unload()


def lora_record(model: nn.Module, lora: LoraSection) -> dict[str, Any]:
    """What the provenance says about a LoRA run (`model` as apply_lora made it, before merging)."""
    targets, full = lora_plan(model.get_base_model() if is_lora(model) else model, lora)

    def kinds(names: list[str]) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in names})

    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": kinds(targets),
        "train_kv": lora.train_kv,
        "fully_trained": kinds(full),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "merged": True,
    }


def _log_trainable(model: nn.Module, which: str) -> None:
    # Under ZeRO-3 (zero.Init) a parameter's own data is an empty placeholder; ds_numel is its real size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    logger.info("training %s parameters: %s of %s (%.1f%%)", which, f"{count:,}", f"{total:,}", 100 * count / total)
