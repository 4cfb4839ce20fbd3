"""Held-out text scored as `gqa eval` scores it, under one of two conventions.

- `stream` (the default): lm-evaluation-harness' `loglikelihood_rolling`, the convention of its wikitext
  task and of the Hugging Face perplexity guide. Each document (a whole plain-text file, or one .jsonl
  record) is one token stream with nothing inserted; every token is predicted exactly once, in disjoint
  windows of at most --seq-len inputs (gqa.convert.text.rolling_windows). Bits per byte and word
  perplexity are reported as lm-eval reports them; they do not depend on the tokenizer.
- `documents`: the training data's cut. A plain file holds documents separated by blank lines, each
  followed by EOS, in one stream cut into windows of --seq-len tokens (BOS first when the tokenizer adds
  one), the short tail dropped; every token of a window but its first is predicted. This is the figure
  `gqa train` reports for held-out blocks of the same length.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqa.convert.errors import GQAError
from gqa.convert.perplexity import IGNORE_INDEX, perplexity
from gqa.convert.text import (
    chunk_tokens,
    leading_bos,
    rolling_windows,
    stream_prefix,
    stream_tokens,
    text_documents,
    token_stream,
)

CONVENTIONS = {
    "stream": "each document one token stream, no EOS inserted, every token predicted once "
    "(lm-eval loglikelihood_rolling)",
    "documents": "documents separated by blank lines, EOS after each, cut into windows as training data is",
}


@dataclass
class HeldOut:
    """Scored windows of held-out text: the last len(targets) positions of `inputs` predict `targets`."""

    convention: str
    windows: list[tuple[list[int], list[int]]]
    stream: list[int]  # the tokens in reading order, for prompts
    documents: int
    seq_len: int
    bos_per_window: bool
    text_bytes: int | None  # UTF-8 bytes and words of the scored text, when every document is scored whole
    words: int | None

    @property
    def predicted_tokens(self) -> int:
        return sum(len(targets) for _, targets in self.windows)


def read_documents(paths: Sequence[str | Path], convention: str = "documents") -> list[str]:
    """The documents of the --data files. A .jsonl file holds one per line in its "text" field. A plain
    file is one document under `stream`, and its blocks of lines between blank lines under `documents`
    (as `gqa train` reads a .txt file)."""
    if convention not in CONVENTIONS:
        raise GQAError(f"--convention {convention}: unknown; use one of {', '.join(CONVENTIONS)}")
    if not paths:
        raise GQAError("no evaluation text: pass --data FILE (plain text, or .jsonl with a 'text' field)")
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise GQAError(f"--data {path}: no such file; pass held-out text files the model was not trained on")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise GQAError(f"--data {path}: not UTF-8 text ({err}); convert it to UTF-8 first") from err
        if path.suffix == ".jsonl":
            documents.extend(_jsonl_texts(path, text))
        elif convention == "stream":
            documents.append(text)
        else:
            documents.extend(text_documents(text))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise GQAError(f"the --data files {', '.join(map(str, paths))} hold no text")
    return documents


def _jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GQAError(f"--data {path} line {number}: not JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise GQAError(f"--data {path} line {number}: no string 'text' field")
        texts.append(record["text"])
    return texts


def held_out(tokenizer, documents: list[str], seq_len: int, convention: str, max_tokens: int | None = None) -> HeldOut:
    """The documents cut into scored windows under `convention`; the first max_tokens tokens only, when given."""
    if convention == "documents":
        scored = windows_of(token_stream(tokenizer, documents, max_tokens), seq_len, leading_bos(tokenizer))
        scored.documents = len(documents)
    else:
        scored = _stream_held_out(tokenizer, documents, seq_len, max_tokens)
    if not scored.windows:
        raise GQAError(
            f"the --data text holds {len(scored.stream)} tokens, fewer than one window of --seq-len {seq_len}; "
            "pass more held-out text or a smaller --seq-len"
        )
    return scored


def _stream_held_out(tokenizer, documents: list[str], seq_len: int, max_tokens: int | None) -> HeldOut:
    prefix = stream_prefix(tokenizer)
    windows, stream, whole = [], [], True
    text_bytes = words = 0
    for doc in documents:
        if max_tokens is not None and len(stream) >= max_tokens:
            whole = False
            break
        tokens = stream_tokens(tokenizer, doc)
        if max_tokens is not None and len(stream) + len(tokens) > max_tokens:
            tokens, whole = tokens[: max_tokens - len(stream)], False
        stream.extend(tokens)
        windows.extend(rolling_windows(tokens, seq_len, prefix))
        # lm-eval's counts (its wikitext task): UTF-8 bytes, and words split on whitespace.
        text_bytes += len(doc.encode("utf-8"))
        words += len(re.split(r"\s+", doc))
    return HeldOut("stream", windows, stream, len(documents), seq_len, False,
                   text_bytes if whole else None, words if whole else None)  # fmt: skip


def _batch(windows: list[tuple[list[int], list[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs padded on the right (causal attention: padding changes no earlier position) and labels
    aligned with them, IGNORE_INDEX where nothing is predicted."""
    width = max(len(inputs) for inputs, _ in windows)
    ids = torch.zeros((len(windows), width), dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(windows):
        ids[row, : len(inputs)] = torch.as_tensor(inputs)
        labels[row, len(inputs) - len(targets) : len(inputs)] = torch.as_tensor(targets)
    return ids.to(device), labels.to(device)


@torch.inference_mode()
def score_windows(model, held: HeldOut, device: torch.device, baseline=None, batch_size: int = 1,
                  progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """NLL and top-1 accuracy of model (and baseline) on the windows, and their agreement."""
    sums = {"nll": 0.0, "correct": 0, "base_nll": 0.0, "base_correct": 0, "agree": 0, "kl": 0.0, "tokens": 0}
    windows = held.windows
    bar = tqdm(range(0, len(windows), batch_size), desc="perplexity" + (" + agreement" if baseline is not None else ""),
               unit="batch", disable=not progress)  # fmt: skip
    for start in bar:
        ids, labels = _batch(windows[start : start + batch_size], device)
        counted = labels != IGNORE_INDEX
        targets = labels[counted]
        logits = model(input_ids=ids).logits[counted].float()  # (predicted tokens, vocab)
        sums["nll"] += F.cross_entropy(logits, targets, reduction="sum").double().item()
        sums["tokens"] += int(targets.numel())
        top1 = logits.argmax(-1)
        sums["correct"] += (top1 == targets).sum().item()
        if baseline is not None:
            base_logits = baseline(input_ids=ids).logits[counted].float()
            if base_logits.shape[-1] != logits.shape[-1]:
                raise GQAError(
                    f"model and baseline have different vocabularies ({logits.shape[-1]} vs {base_logits.shape[-1]} "
                    "logits); agreement needs the same tokenizer: pass the source the model was converted from"
                )
            sums["base_nll"] += F.cross_entropy(base_logits, targets, reduction="sum").double().item()
            base_logp = torch.log_softmax(base_logits, dim=-1)
            base_top1 = base_logp.argmax(-1)
            sums["base_correct"] += (base_top1 == targets).sum().item()
            sums["agree"] += (base_top1 == top1).sum().item()
            # KL(baseline || model): how much of the baseline's next-token distribution the model loses.
            sums["kl"] += (base_logp.exp() * (base_logp - torch.log_softmax(logits, dim=-1))).sum().item()
        bar.set_postfix(ppl=f"{perplexity(sums['nll'] / sums['tokens']):.3g}")
    n = sums["tokens"]
    out = {"model": _figures(sums["nll"], sums["correct"], n, held), "predicted_tokens": n}
    if baseline is not None:
        out["baseline"] = _figures(sums["base_nll"], sums["base_correct"], n, held)
        out["agreement"] = {"top1": sums["agree"] / n, "kl_mean": sums["kl"] / n}
    return out


def _figures(nll: float, correct: int, tokens: int, held: HeldOut) -> dict[str, float | None]:
    """Token perplexity, and the tokenizer-independent figures where every document is scored whole."""
    out: dict[str, float | None] = {"nll": nll / tokens, "perplexity": perplexity(nll / tokens),
                                    "top1_accuracy": correct / tokens}  # fmt: skip
    bpb = nll / held.text_bytes / math.log(2) if held.text_bytes else None
    out["bits_per_byte"] = bpb
    out["byte_perplexity"] = 2.0**bpb if bpb is not None else None
    out["word_perplexity"] = perplexity(nll / held.words) if held.words else None
    return out


def describe(held: HeldOut, paths: Sequence[str | Path]) -> dict[str, Any]:
    """The data entry of eval.json: what was scored, and how."""
    return {
        "files": [str(p) for p in paths],
        "names": [Path(p).name for p in paths],
        "convention": held.convention,
        "convention_text": CONVENTIONS[held.convention],
        "documents": held.documents,
        "tokens": len(held.stream),
        "seq_len": held.seq_len,
        "bos_per_window": held.bos_per_window,
        "chunks": len(held.windows),
        "predicted_tokens": held.predicted_tokens,
        "bytes": held.text_bytes,
        "words": held.words,
    }


def windows_of(tokens: Sequence[int] | np.ndarray, seq_len: int, bos: int | None) -> HeldOut:
    """Equal windows of a token stream under the documents convention (for callers that cut their own)."""
    windows = [(w[:-1].tolist(), w[1:].tolist()) for w in chunk_tokens(tokens, seq_len, bos)]
    return HeldOut("documents", windows, list(tokens), 1, seq_len, bos is not None, None, None)
