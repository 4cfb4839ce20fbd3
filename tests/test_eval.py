"""`gqa eval` on tiny models: a model trained on one text, and a 2-KV-head model pooled from it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import matplotlib.image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gqa.convert.card import write_model_card
from gqa.convert.modeldir import read_provenance, write_provenance
from gqa.train.cli import main
from gqa.convert.errors import GQAError
from gqa.convert.text import chunk_tokens
from gqa.convert.kvcache import head_dim_of
from gqa.train.decode import PeakMemory, measure_kv_cache, peak_of_running_sum
from gqa.train.evaluate import evaluate
from tiny import build_family_model, save_tiny_llama

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue black white").split()
SEQ_LEN = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_text(seed: int, n_words: int = 500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def tiny_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-piece BPE of at most 128 tokens (the tiny model's vocabulary), trained on the test texts."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def mean_pool_kv(model, kv_heads: int) -> None:
    """Test stand-in for the converter: average each group's k/v projection rows, set num_key_value_heads."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.view(kv_heads, -1, head_dim, cfg.hidden_size).mean(1)
            proj.weight = torch.nn.Parameter(w.reshape(kv_heads * head_dim, cfg.hidden_size).contiguous())
    cfg.num_key_value_heads = kv_heads


def provenance_for(source: Path, kv_heads: int) -> dict:
    return {
        "gqa_version": "test",
        "created": "2025-01-01T00:00:00+00:00",
        "source": {"id": str(source), "hub_id": "test-org/tiny-mha", "kind": "local", "model_type": "llama",
                   "num_attention_heads": 8, "num_key_value_heads": 8, "files": ["model.safetensors"]},
        "conversion": {"method": "mean", "grouping": "contiguous", "kv_heads": kv_heads,
                       "groups": [[list(range(g * 8 // kv_heads, (g + 1) * 8 // kv_heads)) for g in range(kv_heads)]] * 2,
                       "dtype": "float32"},
        "training": None,
        "eval": None,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base/: tiny MHA llama trained on a.txt (losses logged); gqa/: base mean-pooled to 2 KV heads."""
    root = tmp_path_factory.mktemp("eval")
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(random_text(0))
    b.write_text(random_text(1))
    tok = tiny_tokenizer([a.read_text(), b.read_text()])

    base = save_tiny_llama(root / "base", seed=0)
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = tok(a.read_text(), add_special_tokens=False)["input_ids"]
    batch = torch.tensor([ids[i : i + SEQ_LEN] for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    metrics = []
    for step in range(1, 41):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics.append({"step": step, "loss": loss.item(), "lr": 3e-3})
    model.eval()
    model.save_pretrained(base)
    tok.save_pretrained(base)

    gqa = root / "gqa"
    mean_pool_kv(model, kv_heads=2)
    model.save_pretrained(gqa)
    tok.save_pretrained(gqa)
    write_provenance(gqa, provenance_for(base, 2))
    write_model_card(gqa)
    (gqa / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return {"root": root, "a": a, "b": b, "base": base, "gqa": gqa, "tok": tok, "metrics": metrics}


@pytest.fixture(scope="module")
def full(setup):
    """One full evaluation of gqa/ against base/, with a report and the card update."""
    report = setup["root"] / "report"
    results = evaluate(setup["gqa"], setup["base"], [setup["a"]], SEQ_LEN, report,
                       contexts=(16, 64), new_tokens=4, kv_context=128, progress=False)
    return results, report


def test_chunking_is_non_overlapping_and_drops_the_short_tail():
    assert chunk_tokens(list(range(10)), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_tokens(list(range(10)), 4, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    # Every window is full, as training's blocks are: no padding enters a perplexity.
    assert chunk_tokens(list(range(9)), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(GQAError, match="too short"):
        chunk_tokens([1, 2, 3], 1)


def test_memorised_text_has_lower_perplexity(setup):
    on_a = evaluate(setup["base"], None, [setup["a"]], SEQ_LEN, contexts=(), update_card=False, progress=False)
    on_b = evaluate(setup["base"], None, [setup["b"]], SEQ_LEN, contexts=(), update_card=False, progress=False)
    ppl_a, ppl_b = on_a["models"][0]["perplexity"], on_b["models"][0]["perplexity"]
    assert ppl_a < 0.5 * ppl_b, (ppl_a, ppl_b)
    assert on_a["models"][0]["top1_accuracy"] > on_b["models"][0]["top1_accuracy"]
    assert on_a["agreement"] is None and len(on_a["models"]) == 1


def test_perplexity_matches_the_models_own_loss(setup):
    """Same windows scored through transformers' built-in loss give the same perplexity."""
    results = evaluate(setup["base"], None, [setup["b"]], SEQ_LEN, convention="documents", contexts=(),
                       update_card=False, progress=False)
    # One document (one paragraph): its tokens, then EOS.
    ids = setup["tok"](setup["b"].read_text(), add_special_tokens=False)["input_ids"] + [setup["tok"].eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    nll, predicted = 0.0, 0
    with torch.no_grad():
        # The tokenizer adds no BOS: windows are plain slices; the tail shorter than a window is not scored.
        for start in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN):
            window = torch.tensor([ids[start : start + SEQ_LEN]])
            nll += model(window, labels=window).loss.item() * (window.shape[1] - 1)
            predicted += window.shape[1] - 1
    assert results["data"]["predicted_tokens"] == predicted
    assert results["data"]["tokens"] == len(ids)
    assert results["models"][0]["perplexity"] == pytest.approx(math.exp(nll / predicted), rel=1e-5)


def test_agreement_with_itself_is_total_and_with_pooled_model_is_not(setup, full):
    same = evaluate(setup["base"], setup["base"], [setup["a"]], SEQ_LEN, contexts=(), update_card=False, progress=False)
    assert same["agreement"]["top1"] == 1.0
    assert abs(same["agreement"]["kl_mean"]) < 1e-6
    assert same["models"][0]["perplexity"] == pytest.approx(same["models"][1]["perplexity"], rel=1e-6)

    results, _ = full
    assert 0.0 < results["agreement"]["top1"] < 1.0
    assert results["agreement"]["kl_mean"] > 1e-3
    model, base = results["models"]
    assert (model["role"], base["role"]) == ("model", "baseline")
    # Mean pooling without uptraining loses some of what base memorised.
    assert model["perplexity"] > base["perplexity"]


@pytest.mark.parametrize("model_type", ["gemma2", "mistral"])
def test_sliding_window_layers_hold_only_their_window(model_type):
    """Gemma-2 alternates sliding and global layers; Mistral slides in every layer. A sliding layer's cache holds
    its last window - 1 tokens, so the bytes at a context longer than the window are not per-token x context."""
    model = build_family_model(model_type, kv=2, sliding_window=6)
    per_layer = 2 * 2 * head_dim_of(model.config) * 4  # K and V, 2 KV heads, float32
    sliding = [min(20, 5), 20] if model_type == "gemma2" else [min(20, 5), min(20, 5)]
    kv = measure_kv_cache(model, torch.randint(0, 128, (1, 12)), pad_id=0, context=20)
    assert kv["bytes_per_token"] == 2 * per_layer
    assert kv["bytes_at_context"] == per_layer * sum(sliding) < kv["bytes_per_token"] * 20
    assert kv["matches_config"]  # what generate's cache held after 13 tokens is what the config says


def test_kv_cache_bytes_match_hand_computation(full):
    results, _ = full
    model, base = results["models"]
    # 2 (K and V) * 2 layers * KV heads * head_dim 8 (64 hidden / 8 heads) * 4 bytes (float32)
    assert model["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 8 * 4 == 256
    assert base["kv_cache"]["bytes_per_token"] == 2 * 2 * 8 * 8 * 4 == 1024
    for m in (model, base):
        kv = m["kv_cache"]
        assert kv["measured_bytes_per_token"] == kv["bytes_per_token"] and kv["matches_config"]
        assert kv["bytes_at_context"] == kv["bytes_per_token"] * 128
        assert [d["context"] for d in m["decode"]] == [16, 64]
        for d in m["decode"]:
            assert d["new_tokens"] == 4 and len(d["generated"]) == 4
            # The cache holds the prompt and every new token but the last (never fed back).
            assert d["cached_tokens"] == d["context"] + 3
            assert d["kv_cache_bytes"] == kv["bytes_per_token"] * d["cached_tokens"]
            assert d["decode_tokens_per_s"] > 0 and d["prefill_s"] > 0
            # The returned cache is allocated inside the measured run and still alive at its end.
            assert d["peak_memory_bytes"] >= d["kv_cache_bytes"]
    assert 0 <= model["decode"][0]["same_greedy_prefix_as_baseline"] <= 4
    # Four times the KV heads: the baseline's cache outweighs the rest of a tiny model's decode.
    assert base["decode"][-1]["peak_memory_bytes"] > model["decode"][-1]["peak_memory_bytes"]


def test_cpu_peak_memory_counts_tensors_exactly():
    assert peak_of_running_sum([4, 4, -4, 12, -12, 3]) == 16
    mib = 1 << 20
    with PeakMemory(torch.device("cpu")) as memory:
        first = torch.empty(4 * mib, dtype=torch.uint8)
        second = torch.empty(4 * mib, dtype=torch.uint8)
        del first
        third = torch.empty(12 * mib, dtype=torch.uint8)
        del second, third
    assert memory.peak == 16 * mib


def test_report_files_exist_and_parse(full, setup):
    results, report = full
    on_disk = json.loads((report / "eval.json").read_text())
    assert on_disk["models"][0]["perplexity"] == results["models"][0]["perplexity"]
    assert on_disk["agreement"] == results["agreement"]
    markdown = (report / "eval.md").read_text()
    assert f"{results['models'][0]['perplexity']:.3f}" in markdown
    assert f"{results['agreement']['top1']:.4f}" in markdown
    assert "256 B" in markdown and "1.00 KiB" in markdown  # per-token KV cache of model and baseline
    for name in ("quality_vs_kv.png", "decode_speed.png", "training_curves.png"):
        path = report / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height > 100 and width > 100
    assert set(on_disk["report_files"]) == {"json", "markdown", "quality_vs_kv", "decode_speed", "training_curves"}


def test_no_training_curves_without_metrics(setup, tmp_path):
    evaluate(setup["base"], None, [setup["a"]], SEQ_LEN, tmp_path, contexts=(), update_card=False, progress=False)
    assert (tmp_path / "quality_vs_kv.png").is_file()
    assert not (tmp_path / "training_curves.png").exists()
    assert not (tmp_path / "decode_speed.png").exists()  # decode was skipped


def test_summary_is_stored_in_provenance_and_card(full, setup):
    results, _ = full
    stored = read_provenance(setup["gqa"])["eval"]
    assert stored["perplexity"] == results["models"][0]["perplexity"]
    assert stored["top1_agreement"] == results["agreement"]["top1"]
    assert stored["kv_bytes_per_token"] == 256 and stored["baseline_kv_bytes_per_token"] == 1024
    assert results["markdown"] in (setup["gqa"] / "README.md").read_text()


def test_cli_prints_table_and_refuses_missing_tokenizer(setup, tmp_path, capsys):
    rc = main(["eval", str(setup["gqa"]), "--baseline", str(setup["base"]), "--data", str(setup["b"]),
               "--seq-len", "32", "--contexts", "16", "--new-tokens", "3", "--no-update-card"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| model: `gqa` | 2 / 8 |" in out and "| baseline: `base` | 8 / 8 |" in out
    assert "generate allocated 256 B/token (matches)" in out

    bare = save_tiny_llama(tmp_path / "bare", num_key_value_heads=2)
    rc = main(["eval", str(bare), "--data", str(setup["a"]), "--seq-len", "32"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no usable tokenizer" in err and "--tokenizer" in err and "Traceback" not in err


def test_refuses_windows_longer_than_the_model(setup):
    with pytest.raises(GQAError, match="longer than the model allows"):
        evaluate(setup["base"], None, [setup["a"]], 1024, contexts=(), progress=False)


def test_refuses_baseline_with_another_tokenizer(setup, tmp_path):
    other = save_tiny_llama(tmp_path / "other")
    tiny_tokenizer([random_text(5, 50).upper()]).save_pretrained(other)
    with pytest.raises(GQAError, match="different tokenizer"):
        evaluate(setup["gqa"], other, [setup["a"]], SEQ_LEN, contexts=(), update_card=False, progress=False)
