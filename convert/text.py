"""Text to tokens, one way for calibration, training data and `gqa eval`.

Documents. A plain text holds documents separated by blank lines (the blocks of lines between
them), as datasets' text loader reads a .txt file for training (`sample_by="paragraph"`).

Tokens. A document is its text tokenised without special tokens, then EOS (when the tokenizer has
one). Documents follow each other in one stream. (Unpacked training blocks, one padded document
each, end where their padding begins and carry no EOS.)

Windows. The stream is cut into consecutive, non-overlapping windows of one length. When the
tokenizer puts BOS in front of text by itself (Llama does, GPT-2 does not), every window starts
with BOS and holds length - 1 stream tokens, so a window always begins the way the tokenizer
begins any input. The tail shorter than a window is dropped: every window has the same length, so
no padding enters a loss. Every token of a window but the first is predicted (gqa.convert.perplexity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gqa.convert.errors import GQAError


def text_documents(text: str) -> list[str]:
    """The documents of a plain text: blocks of lines between blank lines; blank ones dropped."""
    return [block for block in text.split("\n\n") if block.strip()]


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS in front of text by itself, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode_documents(tokenizer, texts: Sequence[str], eos: bool = True) -> list[list[int]]:
    """Each document's tokens: its text without special tokens, then EOS (when there is one and
    `eos` asks for it)."""
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if not eos or tokenizer.eos_token_id is None:
        return encoded
    return [ids + [tokenizer.eos_token_id] for ids in encoded]


def token_stream(tokenizer, documents: Sequence[str], max_tokens: int | None = None) -> list[int]:
    """The documents' tokens back to back; the first max_tokens of them when that is given."""
    stream: list[int] = []
    for doc in documents:
        if max_tokens is not None and len(stream) >= max_tokens:
            break  # long texts: tokenise no more than is used
        stream.extend(encode_documents(tokenizer, [doc])[0])
    return stream[:max_tokens] if max_tokens is not None else stream


def chunk_tokens(stream: Sequence[int] | np.ndarray, length: int, bos_id: int | None = None) -> np.ndarray:
    """Consecutive, non-overlapping windows of `length` tokens, BOS first when bos_id is given;
    a (windows, length) array. The tail shorter than a window is dropped."""
    if length < 2:
        raise GQAError(f"windows of {length} token(s) are too short: a window needs at least 2 tokens to predict one")
    body = length - (bos_id is not None)
    stream = np.asarray(stream, dtype=np.int64)
    count = len(stream) // body
    windows = stream[: count * body].reshape(count, body)
    if bos_id is None:
        return windows
    return np.concatenate([np.full((count, 1), bos_id, dtype=np.int64), windows], axis=1)


def document_window(ids: Sequence[int], length: int, bos_id: int | None = None) -> list[int]:
    """A document alone in one window: its first tokens, BOS first when bos_id is given."""
    if bos_id is None:
        return list(ids[:length])
    return [bos_id, *ids[: length - 1]]


# The stream convention: lm-evaluation-harness' loglikelihood_rolling (its wikitext task), the one other
# tools report. Each document (a whole file, or a .jsonl record) is one token stream, nothing inserted;
# every token is predicted exactly once, in disjoint windows of at most `length` inputs.


def stream_prefix(tokenizer) -> int:
    """The token a stream's first prediction is made from: BOS, else EOS, as lm-eval's HFLM uses."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise GQAError("the tokenizer has neither a BOS nor an EOS token to start a stream from; use --convention documents")
    return prefix


def stream_tokens(tokenizer, text: str) -> list[int]:
    """A document's tokens as lm-eval encodes it: the tokenizer's defaults (BOS first where the tokenizer
    adds one), none added when the text already starts with the BOS token's text."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"]


def rolling_windows(tokens: Sequence[int], length: int, prefix: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that predict every token once: the last len(targets) positions of
    `inputs` predict `targets`. The first window starts from `prefix`; each later one predicts the next
    `length` tokens (fewer at the end) from the `length` tokens before its last target."""
    if length < 1:
        raise GQAError(f"windows of {length} token(s) are too short")
    tokens = list(tokens)
    windows = []
    done = 0
    while done < len(tokens):
        end = min(done + length, len(tokens))
        inputs = [prefix, *tokens[: end - 1]] if done == 0 else tokens[max(end - length - 1, 0) : end - 1]
        windows.append((inputs, tokens[done:end]))
        done = end
    return windows
