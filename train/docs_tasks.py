"""Multiple-choice tasks for lm-evaluation-harness built from text that ships with Python, so they run
offline: no dataset is downloaded.

- `gqa_docstrings`: the held-out docstrings (`stdlib-docs:heldout`, which no recipe trains on).
- `gqa_pyref`: the language reference that ships in `pydoc_data.topics` (the text of `help("if")`),
  prose that is not docstrings; neither stdlib-docs split contains it.

Each item is a HellaSwag-style cloze: the context is the opening words of a prose paragraph, the
choices are its true continuation and three continuations of the same word count and a similar
length, taken at the same place in paragraphs of other documents of the same task. The model scores
each choice by its log-likelihood after the context; acc and acc_norm (log-likelihood per
character, the figure HellaSwag reports) are 25% by chance.

    python -m gqa.train.docs_tasks runs/tasks    # writes the YAML and jsonl files lm-eval reads
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gqa.convert.corpus import corpus_documents, corpus_tag

TASK_NAMES = ("gqa_docstrings", "gqa_pyref")
ITEMS = 160  # per task; a multiple of CHOICES, so each answer position is right equally often
CHOICES = 4
CONTEXT_WORDS = (8, 16)  # the fewest and most opening words of a paragraph given as the context
CONTINUATION_WORDS = 6
NEAREST = 8  # false continuations are drawn from this many candidates nearest in length to the true one
PROSE_FRACTION = 0.75  # of a paragraph's words that must be plain words (not code, markup or grammar)

_WORD = re.compile(r"""^[(\"'“‘*]*[A-Za-z][A-Za-z'’-]*[.,;:!?)\"'”’*]*$""")
_NOT_PROSE = (">>>", "::=", "***", "===", "---", "~~~", "|", "{", "}")


@dataclass(frozen=True)
class Cloze:
    """One candidate item: a paragraph's opening words and the words that follow them."""

    document: int  # index of the document it comes from; false choices come from other documents
    context: str
    continuation: str

    @property
    def ends_sentence(self) -> bool:
        """False choices share this with the true one, so that its last character does not give it away."""
        return self.continuation[-1] in ".!?:"


def prose_paragraphs(text: str) -> list[list[str]]:
    """The paragraphs of a text that are plain prose, as words: no indented lines (code, grammar,
    literal blocks), no headings or tables, mostly plain words."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.strip("\n").split("\n")
        if any(line[:1].isspace() for line in lines) or any(marker in block for marker in _NOT_PROSE):
            continue
        words = block.split()
        if words and sum(bool(_WORD.match(w)) for w in words) >= PROSE_FRACTION * len(words):
            paragraphs.append(words)
    return paragraphs


def clozes(documents: list[str], excluded_text: str) -> list[Cloze]:
    """One cloze per prose paragraph long enough for a context and a continuation, each paragraph
    once; a cloze whose context or continuation occurs in `excluded_text` (whitespace-normalised) is
    left out."""
    shortest = CONTEXT_WORDS[0] + CONTINUATION_WORDS
    excluded = " ".join(excluded_text.split())
    seen: set[str] = set()
    result = []
    for index, document in enumerate(documents):
        for words in prose_paragraphs(document):
            if len(words) < shortest:
                continue
            cut = _mid_sentence_cut(words)
            if cut is None:
                continue
            context, continuation = " ".join(words[:cut]), " ".join(words[cut : cut + CONTINUATION_WORDS])
            if context in seen or context in excluded or continuation in excluded:
                continue
            seen.add(context)
            result.append(Cloze(index, context, continuation))
    return result


def _mid_sentence_cut(words: list[str]) -> int | None:
    """The most opening words (within CONTEXT_WORDS) after which the paragraph goes on in lower
    case, so the continuation carries on a sentence rather than starting one; None if there is none."""
    for cut in range(min(len(words) - CONTINUATION_WORDS, CONTEXT_WORDS[1]), CONTEXT_WORDS[0] - 1, -1):
        if words[cut][0].islower():
            return cut
    return None


def build_items(candidates: list[Cloze], items: int, rng: random.Random) -> list[dict]:
    """`items` multiple-choice items: true continuations from a seeded sample of the candidates, false
    ones from the other candidates, answer positions a seeded shuffle of equal counts."""
    if items % CHOICES:
        raise ValueError(f"items must be a multiple of {CHOICES} so that answer positions balance, got {items}")
    if len(candidates) < items:
        raise ValueError(f"only {len(candidates)} paragraphs can make items; asked for {items}")
    chosen = rng.sample(candidates, items)
    labels = [i % CHOICES for i in range(items)]
    rng.shuffle(labels)
    result = []
    for number, (cloze, label) in enumerate(zip(chosen, labels)):
        others = sorted(
            {c.continuation: c for c in candidates
             if c.document != cloze.document and c.ends_sentence == cloze.ends_sentence and c.continuation != cloze.continuation}.values(),
            key=lambda c: (abs(len(c.continuation) - len(cloze.continuation)), c.continuation),
        )  # fmt: skip
        false = [c.continuation for c in rng.sample(others[:NEAREST], CHOICES - 1)]
        choices = false[:label] + [cloze.continuation] + false[label:]
        result.append({"id": number, "document": cloze.document, "context": cloze.context, "choices": choices, "label": label})
    return result


def task_documents(name: str) -> tuple[list[str], str]:
    """A task's documents and the text its items must not contain."""
    if name == "gqa_docstrings":
        return corpus_documents("heldout"), "\n".join(corpus_documents("train"))
    if name == "gqa_pyref":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)], "\n".join(corpus_documents("train") + corpus_documents("heldout"))
    raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")


def task_config(name: str, data_file: Path, seed: int) -> dict:
    """The lm-eval task YAML, as a dict."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "corpus": corpus_tag(), "seed": seed},
    }


def write_tasks(dest: str | Path, seed: int = 0, items: int = ITEMS) -> list[str]:
    """Write each task's `NAME.yaml` and `NAME.jsonl` into dest and return the task names, for
    `lm_eval.tasks.TaskManager(include_path=dest)`. The same seed writes the same bytes for a given
    Python version (the text is Python's own); the YAML names its data file by absolute path."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for name in TASK_NAMES:
        documents, excluded = task_documents(name)
        rows = build_items(clozes(documents, excluded), items, random.Random(f"{name}:{seed}"))
        data_file = dest / f"{name}.jsonl"
        _write_atomic(data_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        _write_atomic(dest / f"{name}.yaml", yaml.safe_dump(task_config(name, data_file, seed), sort_keys=False))
    return list(TASK_NAMES)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gqa.train.docs_tasks DIR")
    for task in write_tasks(sys.argv[1]):
        print(f"{task}: {Path(sys.argv[1]).resolve() / task}.yaml")
