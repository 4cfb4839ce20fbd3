"""`gqa eval --tasks` (lm-evaluation-harness on the loaded model) and the stream perplexity convention,
held against lm-eval's own figures on local tasks the tests write."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import build_family_model, expand_kv_heads, save_model
from train_helpers import EVAL_MODULES, TRAIN_MODULES, docs_text, make_model, save_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.errors import GQAError
from gqa.convert.families import family_for
from gqa.convert.modeldir import read_provenance
from gqa.train.cli import main
from gqa.train.evaluate import evaluate
from gqa.train.tasks import TaskSettings

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by the test command (gqa[eval])")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SEQ_LEN = 32


def write_choice_task(folder: Path, name: str = "tiny_choice", items: int = 24) -> Path:
    """A multiple-choice task in lm-eval's YAML format over a local jsonl file: which word follows?"""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["parser", "archive", "header", "value", "stream", "record"]
    rows = [{"question": f"The {words[i % 6]} reads the", "choices": [" line", " file", " value", " header"],
             "answer": i % 4} for i in range(items)]  # fmt: skip
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n"
    )
    return folder


def write_rolling_task(folder: Path, text_file: Path, name: str = "tiny_rolling") -> Path:
    """A perplexity task as lm-eval's wikitext is built: one document, scored by loglikelihood_rolling."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text(json.dumps({"text": text_file.read_text()}) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tasks")
    heldout = root / "heldout.txt"
    heldout.write_text(docs_text(EVAL_MODULES)[:6000])
    return SimpleNamespace(root=root, model=make_model(root, kv_heads=2), heldout=heldout,
                           tasks=write_choice_task(root / "tasks"))  # fmt: skip


def settings(ws, **extra) -> TaskSettings:
    return TaskSettings(("tiny_choice",), include_paths=(str(ws.tasks),), bootstrap_iters=100, **extra)


def test_task_scores_are_lm_evals_own(ws):
    """gqa's figures equal lm-eval's when lm-eval loads the same model itself, by its own `hf` loader."""
    ours = evaluate(ws.model, tasks=settings(ws), contexts=(), update_card=False, progress=False)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={ws.model},dtype=float32", device="cpu", batch_size=8,
        tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(ws.tasks)), bootstrap_iters=100,
        log_samples=False,
    )["results"]["tiny_choice"]  # fmt: skip
    metrics = ours["models"][0]["tasks"]["tiny_choice"]["metrics"]
    assert metrics == {"acc": theirs["acc,none"], "acc_stderr": theirs["acc_stderr,none"],
                       "acc_norm": theirs["acc_norm,none"], "acc_norm_stderr": theirs["acc_norm_stderr,none"]}
    assert ours["models"][0]["tasks"]["tiny_choice"]["samples"] == 24
    assert [(r["task"], r["metric"]) for r in ours["tasks"]["rows"]] == [("tiny_choice", "acc"), ("tiny_choice", "acc_norm")]
    assert ours["data"] is None and "perplexity" not in ours["models"][0]  # no --data: no perplexity claimed


def test_limit_and_fewshot_reach_lm_eval(ws):
    ours = evaluate(ws.model, tasks=settings(ws, limit=8, num_fewshot=2), contexts=(), update_card=False,
                    progress=False)  # fmt: skip
    task = ours["models"][0]["tasks"]["tiny_choice"]
    assert (task["samples"], task["num_fewshot"]) == (8, 2)


def test_duplicated_head_conversion_scores_exactly_as_its_source(ws, tmp_path):
    """KV heads repeated into an MHA checkpoint convert back exactly: the task figures are the source's
    (accuracy to the item, and a perplexity task, which would show any change in the function)."""
    gqa_model = build_family_model("llama", kv=2)
    config, state = expand_kv_heads(gqa_model, family_for("llama"), factor=4)
    source = save_model(config, state, tmp_path / "mha")
    save_tokenizer(source, docs_text(TRAIN_MODULES))
    out = convert(str(source), tmp_path / "gqa", ConvertOptions(kv_heads=2, method="mean")).out_dir
    tasks = write_rolling_task(write_choice_task(tmp_path / "tasks"), ws.heldout)
    both = TaskSettings(("tiny_choice", "tiny_rolling"), include_paths=(str(tasks),), bootstrap_iters=0)
    results = evaluate(out, source, tasks=both, contexts=(), update_card=False, progress=False)
    model, base = (m["tasks"] for m in results["models"])
    assert model["tiny_choice"]["metrics"] == base["tiny_choice"]["metrics"]
    for metric in ("word_perplexity", "bits_per_byte"):
        assert model["tiny_rolling"]["metrics"][metric] == pytest.approx(base["tiny_rolling"]["metrics"][metric], rel=1e-6)
    assert {r["metric"]: r["ratio"] for r in results["tasks"]["rows"] if r["task"] == "tiny_choice"} == {
        "acc": 1.0, "acc_norm": 1.0}


def lm_eval_rolling(model_dir: Path, text_file: Path, folder: Path) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    wrapped = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=1, max_length=SEQ_LEN)
    out = lm_eval.simple_evaluate(wrapped, tasks=["tiny_rolling"], bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_path=str(write_rolling_task(folder, text_file))))
    return {key.split(",")[0]: value for key, value in out["results"]["tiny_rolling"].items() if key.endswith(",none")}


@pytest.mark.parametrize("tokenizer", ["no-bos", "bos"])
def test_stream_perplexity_is_lm_evals_loglikelihood_rolling(ws, tmp_path, tokenizer):
    """The default convention scores a .txt file as lm-eval's wikitext task scores a document."""
    model_dir = ws.model
    if tokenizer == "bos":
        from test_one_perplexity import save_bos_tokenizer

        model_dir = make_model(tmp_path, "bos")
        save_bos_tokenizer(model_dir, docs_text(TRAIN_MODULES))
    ours = evaluate(model_dir, None, [ws.heldout], SEQ_LEN, contexts=(), update_card=False, progress=False)
    theirs = lm_eval_rolling(model_dir, ws.heldout, tmp_path / "rolling")
    figures = ours["models"][0]
    assert ours["data"]["convention"] == "stream"
    assert ours["data"]["bytes"] == len(ws.heldout.read_bytes())
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert figures[metric] == pytest.approx(theirs[metric], rel=1e-6), metric


def test_stream_predicts_every_token_once_and_documents_does_not(ws):
    tok = AutoTokenizer.from_pretrained(ws.model)
    text = ws.heldout.read_text()
    tokens = len(tok(text)["input_ids"])
    stream = evaluate(ws.model, None, [ws.heldout], SEQ_LEN, contexts=(), update_card=False, progress=False)
    documents = evaluate(ws.model, None, [ws.heldout], SEQ_LEN, convention="documents", contexts=(),
                         update_card=False, progress=False)  # fmt: skip
    assert stream["data"]["predicted_tokens"] == tokens  # nothing inserted, nothing dropped
    assert documents["data"]["predicted_tokens"] < documents["data"]["tokens"]  # window starts and the tail
    assert documents["models"][0]["bits_per_byte"] is None  # bytes are not all scored: no per-byte figure
    cut = evaluate(ws.model, None, [ws.heldout], SEQ_LEN, max_tokens=100, contexts=(), update_card=False, progress=False)
    assert cut["data"]["predicted_tokens"] == 100 and cut["models"][0]["bits_per_byte"] is None
    assert "stream convention" in stream["markdown"] and "documents convention" in documents["markdown"]


def test_report_card_and_publish_carry_the_task_table(ws, tmp_path):
    report = tmp_path / "report"
    results = evaluate(ws.model, ws.model, [ws.heldout], SEQ_LEN, report, tasks=settings(ws), contexts=(),
                       progress=False)  # fmt: skip
    assert (report / "tasks.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((report / "eval.json").read_text())
    assert on_disk["tasks"]["rows"] == results["tasks"]["rows"]
    acc = results["tasks"]["rows"][0]
    assert acc["ratio"] == 1.0 and acc["model"] == acc["baseline"]
    line = f"| `tiny_choice` | acc | {acc['model']:.4f} ± {acc['model_stderr']:.4f} |"
    assert line in (report / "eval.md").read_text()
    stored = read_provenance(ws.model)["eval"]
    assert stored["tasks"]["rows"] == results["tasks"]["rows"] and stored["convention"] == "stream"
    card = (ws.model / "README.md").read_text()
    assert line in card and "lm-evaluation-harness" in card

    provenance = json.loads((ws.model / "gqa_provenance.json").read_text())
    provenance["conversion"]["groups"] = [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2  # per layer, as gqa convert writes
    (ws.model / "gqa_provenance.json").write_text(json.dumps(provenance))
    assert main(["publish", str(ws.model), "--repo", "someone/tiny-gqa", "--dry-run"]) == 0
    # A card whose task figure no longer matches the provenance is refused when kept as it is.
    (ws.model / "README.md").write_text(card.replace(f"| acc | {acc['model']:.4f}", "| acc | 0.9999"))
    assert main(["publish", str(ws.model), "--repo", "someone/tiny-gqa", "--dry-run", "--keep-card"]) == 2


def test_task_errors_are_clear(ws, monkeypatch, capsys):
    with pytest.raises(GQAError, match="did you mean tiny_choice"):
        evaluate(ws.model, tasks=TaskSettings(("tiny_choise",), include_paths=(str(ws.tasks),)), progress=False)
    with pytest.raises(GQAError, match="nothing to evaluate"):
        evaluate(ws.model, progress=False)
    assert main(["eval", str(ws.model), "--data", str(ws.heldout), "--limit", "5"]) == 2
    assert "--limit applies to tasks: add --tasks" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["eval", str(ws.model), "--tasks", "tiny_choice", "--task-path", str(ws.tasks)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'gqa[eval]'" in err and "Traceback" not in err


def test_the_demo_shows_answers_of_the_original_the_converted_and_the_uptrained_model(ws, tmp_path):
    from gqa.train.demo import answers_table

    other = make_model(tmp_path, "other", seed=1)
    trained = evaluate(other, ws.model, tasks=settings(ws), contexts=(), update_card=False, progress=False)
    converted = evaluate(ws.model, tasks=settings(ws), contexts=(), update_card=False, progress=False)
    table = answers_table(trained, converted)
    acc = {m["role"]: m["tasks"]["tiny_choice"]["metrics"]["acc"] for m in trained["models"]}
    assert table[2] == (f"| `tiny_choice` | acc | {acc['baseline']:.3f} | "
                        f"{converted['models'][0]['tasks']['tiny_choice']['metrics']['acc']:.3f} | {acc['model']:.3f} |")
    assert "tiny_choice: 24 items" in table[-1]


def test_the_offline_tasks_run_by_name(ws, tmp_path, monkeypatch):
    """gqa_docstrings and gqa_pyref need no --task-path: they are written once into gqa's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    results = evaluate(ws.model, tasks=TaskSettings(("gqa_docstrings", "gqa_pyref"), limit=4, bootstrap_iters=0),
                       contexts=(), update_card=False, progress=False)  # fmt: skip
    assert {r["task"] for r in results["tasks"]["rows"]} == {"gqa_docstrings", "gqa_pyref"}
    assert all(r["samples"] == 4 for r in results["tasks"]["rows"])
    assert sorted(p.name for p in (tmp_path / "cache" / "gqa" / "tasks").glob("*/*.yaml")) == [
        "gqa_docstrings.yaml", "gqa_pyref.yaml"]
