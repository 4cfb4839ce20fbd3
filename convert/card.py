"""The model card (README.md with Hugging Face front matter) of converted and trained models.

The provenance file is the record of how a model was made; the card is regenerated from it and
from config.json, so the two can never disagree. Writing a card makes no network calls.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from gqa.convert.modeldir import CARD_FILE, CONFIG_FILE, read_provenance, write_text_atomic

GQA_CITATION = """@inproceedings{ainslie2023gqa,
  title     = {GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints},
  author    = {Ainslie, Joshua and Lee-Thorp, James and de Jong, Michiel and Zemlyanskiy, Yury and Lebr{\\'o}n, Federico and Sanghai, Sumit},
  booktitle = {Proceedings of EMNLP},
  year      = {2023},
  url       = {https://arxiv.org/abs/2305.13245}
}"""


def card_metadata(config: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter: what the hub indexes."""
    kv_heads = config.get("num_key_value_heads")
    tags = ["gqa", "grouped-query-attention"]
    if kv_heads == 1:
        tags.append("mqa")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    source = provenance.get("source", {})
    if source.get("hub_id"):
        meta["base_model"] = source["hub_id"]
        # The architecture changed and (usually) training followed: closest hub relation is finetune.
        meta["base_model_relation"] = "finetune"
    datasets = [d for d in training_datasets(provenance.get("training")) if _is_hub_id(d)]
    if datasets:
        meta["datasets"] = datasets
    return meta


def training_datasets(training: dict[str, Any] | None) -> list[str]:
    """Every data source the trainer names: its `data.train` (str or list) and any `datasets` list."""
    if not training:
        return []
    named: list[Any] = []
    for value in ((training.get("data") or {}).get("train"), training.get("datasets")):
        named += value if isinstance(value, list) else [value] if value else []
    out = []
    for item in named:
        if isinstance(item, dict):  # {"hub_id"/"id"/"path"/"name": ...}: take the most specific id
            item = next((item[k] for k in ("hub_id", "id", "path", "name") if isinstance(item.get(k), str)), None)
        if isinstance(item, str) and item not in out:
            out.append(item)
    return out


_FILE_SUFFIX = re.compile(r"\.(txt|jsonl?|parquet|csv|tsv|arrow|md)$", re.IGNORECASE)


def _is_hub_id(name: str) -> bool:
    """Hub dataset ids (owner/name) go in the front matter; local files and directories, which provenance
    names by their name alone, (and stdlib-docs:...) do not."""
    if Path(name).exists() or _FILE_SUFFIX.search(name) or name.startswith((".", "/", "~")) or "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def render_card(config: dict[str, Any], provenance: dict[str, Any], repo_id: str | None = None) -> str:
    """The whole README.md; `repo_id` (set by `gqa publish`) goes into the loading snippet."""
    conv = provenance.get("conversion") or {}
    source = provenance.get("source") or {}
    heads = config.get("num_attention_heads", config.get("n_head"))  # GPT-2-style configs (gpt_bigcode) say n_head
    kv_heads = config.get("num_key_value_heads") or heads
    src_kv = source.get("num_key_value_heads")
    front = yaml.safe_dump(card_metadata(config, provenance), sort_keys=False).strip()
    kind = "multi-query (MQA)" if kv_heads == 1 else "grouped-query (GQA)"
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {source.get('id', 'model')} with {kv_heads} KV heads",
        "",
        f"This model is `{source.get('id', '?')}` converted from {src_kv} to {kv_heads} key/value heads "
        f"({kind} attention, {heads} query heads) with [gqa](https://arxiv.org/abs/2305.13245)-style "
        f"head merging. Its KV cache is {src_kv / kv_heads:g} times smaller than the source's."
        if src_kv and kv_heads and conv  # a model gqa trained but did not convert claims no conversion
        else "",
        "",
        "## How it was made",
        "",
        f"- method: `{conv.get('method', '?')}`, grouping: `{conv.get('grouping', 'contiguous')}`",
        f"- KV heads: {src_kv} -> {kv_heads}",
        f"- gqa version: {provenance.get('gqa_version', '?')}",
    ]
    training = provenance.get("training")
    if training:
        lines += ["", "## Uptraining", "", *training_lines(training)]
    else:
        lines += ["", "No uptraining was done after conversion: quality may be well below the source's."]
    evaluation = provenance.get("eval")
    if evaluation and evaluation.get("markdown"):
        lines += ["", "## Evaluation", "", evaluation["markdown"]]
    lines += [
        "",
        "## Usage",
        "",
        "Loads with plain `transformers`, no custom code:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or "PATH_OR_REPO"}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or "PATH_OR_REPO"}")',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        GQA_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


# Trainer keys shown by training_lines() in their own words; the other scalars are listed as they are.
_TRAINING_SHOWN = {"steps", "tokens_seen", "pretrain_tokens", "pretrain_fraction", "data", "datasets", "method",
                   "final_eval", "global_batch_sequences", "block_size", "recipe_file"}


def training_lines(training: dict[str, Any]) -> list[str]:
    """The uptraining budget, data and result, as card bullet points (keys the trainer writes)."""
    lines = []
    tokens, steps = training.get("tokens_seen"), training.get("steps")
    if tokens is not None or steps is not None:
        budget = f"- budget: {tokens:,} tokens" if isinstance(tokens, int) else "- budget:"
        budget += f" in {steps} optimizer steps" if steps is not None else ""
        fraction, pretrain = training.get("pretrain_fraction"), training.get("pretrain_tokens")
        if fraction is not None and pretrain:
            budget += f" ({fraction:.3%} of the source's {pretrain:,} pre-training tokens)"
        lines.append(budget)
    if training.get("global_batch_sequences") and training.get("block_size"):
        lines.append(f"- batch: {training['global_batch_sequences']} sequences of {training['block_size']} tokens")
    datasets = training_datasets(training)
    if datasets:
        lines.append("- training data: " + ", ".join(f"`{d}`" for d in datasets))
    held_out = (training.get("data") or {}).get("eval")
    if held_out:
        lines.append(f"- held-out data: `{held_out}`")
    if training.get("method"):
        lines.append(f"- objective: {training['method']}")
    final = training.get("final_eval") or {}
    if final.get("perplexity") is not None:
        lines.append(f"- final held-out perplexity: {final['perplexity']:.3f} (loss {final.get('loss', float('nan')):.4f}"
                     + (f" on {final['tokens']:,} tokens" if isinstance(final.get("tokens"), int) else "")
                     + "; training's cut, as gqa eval --convention documents)")
    tasks = final.get("tasks") or {}
    if tasks:
        lines.append("- final task scores (lm-eval, eval.task_limit items): "
                     + ", ".join(f"{key.removeprefix('task/')} {value:.4f}" for key, value in sorted(tasks.items())))
    if training.get("recipe_file"):
        lines.append(f"- recipe: `{Path(str(training['recipe_file'])).name}`")
    lines += [f"- {key}: {value}" for key, value in training.items()
              if key not in _TRAINING_SHOWN and value is not None and not isinstance(value, (dict, list))]
    return lines


def split_front_matter(card: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter, body) of a README.md; ({}, card) when it has none."""
    match = re.match(r"---\n(.*?)\n---\n?", card, re.DOTALL)
    if not match:
        return {}, card
    meta = yaml.safe_load(match.group(1)) or {}
    return (meta if isinstance(meta, dict) else {}), card[match.end():]


def card_problems(card: str, config: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    """Claims of a model card (front matter, KV-head counts, method) that the provenance file contradicts."""
    problems = []
    try:
        meta, body = split_front_matter(card)
    except yaml.YAMLError as err:
        return [f"README.md front matter is not valid YAML ({err})"]
    if not meta:
        problems.append("README.md has no YAML front matter")
    expected = card_metadata(config, provenance)
    for key in ("library_name", "base_model", "base_model_relation", "datasets"):
        if meta.get(key) != expected.get(key):
            problems.append(f"README.md says {key}: {meta.get(key)!r}, the provenance file implies {expected.get(key)!r}")
    tags = meta.get("tags") or []
    for tag in expected["tags"]:
        if tag not in tags:
            problems.append(f"README.md tags lack {tag!r}")
    if "mqa" in tags and "mqa" not in expected["tags"]:
        problems.append("README.md is tagged 'mqa' but the model has more than one KV head")
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    src_kv = (provenance.get("source") or {}).get("num_key_value_heads")
    for claimed in re.findall(r"with (\d+) KV heads", body):
        if int(claimed) != kv_heads:
            problems.append(f"README.md claims {claimed} KV heads; config.json has {kv_heads}")
    for before, after in re.findall(r"KV heads: (\d+) -> (\d+)", body):
        if src_kv is not None and (int(before), int(after)) != (src_kv, kv_heads):
            problems.append(f"README.md claims KV heads {before} -> {after}; the provenance file says {src_kv} -> {kv_heads}")
    method = (provenance.get("conversion") or {}).get("method")
    for claimed in re.findall(r"method: `([^`]+)`", body):
        if method is not None and claimed != method:
            problems.append(f"README.md claims method {claimed!r}; the provenance file says {method!r}")
    return problems + eval_claim_problems(body, provenance.get("eval") or {})


def eval_claim_problems(body: str, evaluation: dict[str, Any]) -> list[str]:
    """Perplexity and task scores the card claims that the provenance file's eval record does not hold."""
    problems = []
    perplexity = evaluation.get("perplexity")
    for claimed in re.findall(r"^\| model: `[^`]*` \|(?:[^|]*\|){3} ([^ |]+) \|", body, re.MULTILINE):
        if claimed != "-" and (perplexity is None or claimed != f"{perplexity:.3f}"):
            problems.append(f"README.md claims perplexity {claimed}; the provenance file's eval says {perplexity}")
    rows = {(r["task"], r["metric"]): r for r in (evaluation.get("tasks") or {}).get("rows", [])}
    for task, metric, claimed in re.findall(r"^\| `([^`]+)` \| ([^ |]+) \| ([0-9.]+)", body, re.MULTILINE):
        row = rows.get((task, metric))
        if row is None or claimed != f"{row['model']:.4f}":
            held = f"{row['model']:.4f}" if row else "no such score"
            problems.append(f"README.md claims {task} {metric} {claimed}; the provenance file's eval holds {held}")
    return problems


def write_model_card(model_dir: str | Path, repo_id: str | None = None) -> Path:
    """Regenerate README.md in `model_dir` from its config.json and provenance file."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    provenance = read_provenance(model_dir) or {}
    return write_text_atomic(model_dir / CARD_FILE, render_card(config, provenance, repo_id))
