"""One text-to-tokens path and one perplexity: the training loop's held-out perplexity and
`gqa eval`'s are the same number for the same model, text and window length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gqa.convert.text import chunk_tokens, document_window, encode_documents, leading_bos, token_stream
from gqa.train.api import run_recipe
from gqa.train.dataset import prepare_data
from gqa.train.evaluate import evaluate
from gqa.train.heldout import read_documents
from gqa.train.recipe import DataSection
from train_helpers import REPO, TRAIN_MODULES, docs_text, make_model, tiny_overrides, write_texts

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
BLOCK = 64  # the tiny-cpu recipe's data.block_size


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def save_bos_tokenizer(model_dir, text: str) -> None:
    """Like train_helpers.save_tokenizer, but the tokenizer puts BOS in front of text, as Llama's does."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>", "<bos>"], limit_alphabet=80)
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    wrapped.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("one-perplexity")
    train_file, eval_file = write_texts(root)
    bos_model = make_model(root, "bos")
    save_bos_tokenizer(bos_model, docs_text(TRAIN_MODULES))
    return SimpleNamespace(
        root=root, models={"no-bos": make_model(root), "bos": bos_model}, train=train_file, eval=eval_file,
        cache=root / "cache",
    )


def test_documents_tokens_and_windows_follow_one_convention(ws):
    tokenizer = AutoTokenizer.from_pretrained(ws.models["bos"])
    bos, eos = leading_bos(tokenizer), tokenizer.eos_token_id
    assert bos == tokenizer.bos_token_id and leading_bos(AutoTokenizer.from_pretrained(ws.models["no-bos"])) is None
    text = ws.root / "three.txt"
    text.write_text("first line\nsame document\n\n\nsecond\n\n  \n\nthird\n")
    documents = read_documents([text])
    assert documents == ["first line\nsame document", "\nsecond", "third\n"]
    encoded = encode_documents(tokenizer, documents)
    assert all(ids[-1] == eos and bos not in ids for ids in encoded)  # EOS ends a document; BOS starts windows
    stream = token_stream(tokenizer, documents)
    assert stream == [t for ids in encoded for t in ids]
    assert token_stream(tokenizer, documents, max_tokens=5) == stream[:5]
    windows = chunk_tokens(stream, 4, bos)
    assert windows.tolist() == [[bos, *stream[i : i + 3]] for i in range(0, len(stream) - 2, 3)]
    assert document_window(encoded[0], 4, bos) == [bos, *encoded[0][:3]]


@pytest.mark.parametrize("tokenizer", ["no-bos", "bos"])
def test_the_loops_held_out_perplexity_is_gqa_evals(ws, tmp_path, tokenizer):
    """Train a few steps, then score the trained model on the held-out file with `gqa eval`'s API:
    the perplexity the loop reported at its end is the one `gqa eval` measures."""
    out = tmp_path / "out"
    extra = {"budget__steps": 3, "eval__every": 0, "eval__max_blocks": "null", "checkpoint__every": 0}
    result = run_recipe(RECIPE, tiny_overrides(ws.models[tokenizer], ws.train, ws.eval, out, ws.cache, **extra))
    scored = evaluate(out, None, [ws.eval], BLOCK, convention="documents", contexts=(), update_card=False,
                      progress=False)

    data = scored["data"]
    assert data["documents"] > 1 and data["bos_per_window"] == (tokenizer == "bos")
    assert data["predicted_tokens"] == result.final_eval["tokens"] == data["chunks"] * (BLOCK - 1)
    assert scored["models"][0]["perplexity"] == pytest.approx(result.final_eval["perplexity"], rel=1e-5)


def test_the_held_out_split_is_cut_as_one_stream_of_the_documents_gqa_eval_reads(ws, tmp_path):
    """Training blocks are cut per map batch of 4,000 documents; held-out text is cut as one stream,
    as `gqa eval` cuts it, and datasets' reading of a .txt file is read_documents'."""
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(f"note {i}: the parser reads a line" for i in range(4100)) + "\n\n\n\nlast  \n")
    tokenizer = AutoTokenizer.from_pretrained(ws.models["bos"])
    section = DataSection(train=str(ws.train), eval=str(held), cache_dir=str(tmp_path / "cache"), block_size=32)
    data = prepare_data(section, tokenizer, ws.models["bos"], seed=0)
    documents = read_documents([held])
    assert data.stats["eval_documents"] == len(documents) == 4101
    expected = chunk_tokens(token_stream(tokenizer, documents), 32, leading_bos(tokenizer))
    assert data.eval["input_ids"] == expected.tolist()
