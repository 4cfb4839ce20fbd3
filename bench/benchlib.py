"""What the benchmarks share: a BPE tokenizer trained on real text for their random-weight models, and
the set-up of a bare PyTorch training loop that `gqa train` is held against."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def train_tokenizer(documents: Iterable[str], vocab: int):
    """A byte-level BPE tokenizer of `vocab` tokens (<unk>, <eos> among them) trained on `documents`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


def bare_training(recipe, model_dir: Path, steps: int, global_batch: int, micro: int, device="cpu"):
    """What a hand-written loop needs to train on the blocks `gqa train` reads, in the same order: the micro
    batches, the model, AdamW with the loop's parameter groups, and the micro batches per step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa.train.dataset import prepare_data, training_order

    data = prepare_data(recipe.data, AutoTokenizer.from_pretrained(model_dir), model_dir, recipe.seed)  # cached
    order = training_order(len(data.train), steps * global_batch, recipe.seed)
    blocks = torch.tensor(data.train.select(order)["input_ids"], dtype=torch.long).split(micro)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.optimizer.lr, betas=recipe.optimizer.betas, eps=recipe.optimizer.eps,
    )
    return blocks, model, optimizer, global_batch // micro


def save_random_llama(model_dir: Path, shape: tuple[int, int, int, int, int, int], documents: Iterable[str],
                      tokenizer_vocab: int) -> Path:
    """A seeded random-weight Llama of shape (hidden, layers, heads, kv_heads, intermediate, vocab), tied
    embeddings, with a tokenizer trained on `documents`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv_heads, intermediate, vocab = shape
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    train_tokenizer(documents, tokenizer_vocab).save_pretrained(model_dir)
    return model_dir


def bare_step(model, optimizer, scheduler, micro_batches, device, bf16: bool, max_grad_norm: float | None):
    """One optimizer step of the bare loop: the micro batches' mean loss backpropagated, clipped, stepped."""
    import torch

    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss / len(micro_batches)
        loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
