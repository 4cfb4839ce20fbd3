"""`gqa publish` against a recording stand-in for the hub client: checks, card, and what goes up."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM

import gqa.convert.publish as publish_module
from gqa.convert.card import GQA_CITATION, split_front_matter, write_model_card
from gqa.convert.modeldir import write_provenance
from gqa.train.cli import main
from gqa.convert.errors import GQAError
from gqa.convert.publish import publish
from tiny import save_tiny_llama

SECRET = "hf_testTOKENthatMustNeverBePrinted0123"
EVAL_TABLE = "| | KV heads | perplexity |\n|---|---|---|\n| model: `tiny` | 2 / 8 | 12.345 |"


class RecordingHub:
    """Stands in for HfApi: records each call and its arguments, contacts nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")


def provenance(kv_heads: int, layers: int = 2) -> dict:
    return {
        "gqa_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
        "source": {"id": "test-org/tiny-mha", "hub_id": "test-org/tiny-mha", "kind": "hub", "model_type": "llama",
                   "num_attention_heads": 8, "num_key_value_heads": 8, "files": [{"name": "model.safetensors", "bytes": 1}]},
        "conversion": {"method": "mean", "grouping": "contiguous", "kv_heads": kv_heads,
                       "groups": [[list(range(g * 8 // kv_heads, (g + 1) * 8 // kv_heads)) for g in range(kv_heads)]] * layers,
                       "dtype": "float32"},
        "training": {  # the keys gqa train writes
            "steps": 300, "tokens_seen": 1_234_567, "pretrain_tokens": 2_000_000_000, "pretrain_fraction": 1_234_567 / 2e9,
            "global_batch_sequences": 8, "block_size": 512, "method": "language modelling",
            "data": {"train": ["HuggingFaceFW/fineweb-edu", "/data/local-notes.txt"], "eval": "held.txt", "train_tokens": 10**7},
            "final_eval": {"loss": 2.5, "perplexity": 12.18, "tokens": 4096},
        },
        "eval": {"perplexity": 12.345, "markdown": EVAL_TABLE},
    }


def make_model_dir(path: Path, kv_heads: int = 2, shard: bool = False) -> Path:
    save_tiny_llama(path, num_key_value_heads=kv_heads)
    if shard:  # re-save as several shards with an index
        model = AutoModelForCausalLM.from_pretrained(path)
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, max_shard_size="100KB")
    write_provenance(path, provenance(kv_heads))
    write_model_card(path)
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    # Training leftovers that must stay home.
    (path / "optimizer.pt").write_bytes(b"\0" * 16)
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"\0" * 16)
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "tiny-gqa")


def uploaded_names(call: dict) -> set[str]:
    """The files the real client would send for these upload_folder arguments (its own filter)."""
    folder = Path(call["folder_path"])
    relative = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    return set(filter_repo_objects(relative, allow_patterns=call["allow_patterns"], ignore_patterns=call.get("ignore_patterns")))


EXPECTED_FILES = {"README.md", "config.json", "generation_config.json", "gqa_provenance.json", "model.safetensors", "metrics.jsonl"}


def test_dry_run_writes_card_and_contacts_nothing(model_dir):
    hub = RecordingHub()
    (model_dir / "README.md").write_text("stale card\n")
    result = publish(model_dir, "someone/tiny-gqa", dry_run=True, api=hub)
    assert hub.calls == []
    assert {f["name"] for f in result["files"]} == EXPECTED_FILES
    assert result["total_bytes"] == sum((model_dir / n).stat().st_size for n in EXPECTED_FILES)
    assert any("tokenizer" in w for w in result["warnings"])

    card = (model_dir / "README.md").read_text()
    meta, body = split_front_matter(card)
    assert meta["base_model"] == "test-org/tiny-mha"
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert "gqa" in meta["tags"] and "mqa" not in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]  # the local file is named in the body only
    assert "KV heads: 8 -> 2" in body and "method: `mean`" in body
    assert "1,234,567 tokens in 300 optimizer steps (0.062% of the source's 2,000,000,000 pre-training tokens)" in body
    assert "`local-notes.txt`" in body and "final held-out perplexity: 12.180" in body
    assert EVAL_TABLE in body
    assert 'from_pretrained("someone/tiny-gqa")' in body
    assert GQA_CITATION in body


def test_mqa_model_is_tagged_mqa(tmp_path):
    path = make_model_dir(tmp_path / "tiny-mqa", kv_heads=1)
    publish(path, "someone/tiny-mqa", dry_run=True, api=RecordingHub())
    meta = yaml.safe_load((path / "README.md").read_text().split("---")[1])
    assert {"gqa", "mqa"} <= set(meta["tags"])


def test_upload_records_create_then_upload_with_the_checked_files(tmp_path):
    path = make_model_dir(tmp_path / "sharded", shard=True)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1
    hub = RecordingHub()
    result = publish(path, "someone/tiny-gqa", private=True, api=hub)
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    create, upload = hub.calls[0][1], hub.calls[1][1]
    assert create == {"repo_id": "someone/tiny-gqa", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "someone/tiny-gqa" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == path
    expected = EXPECTED_FILES - {"model.safetensors"} | {"model.safetensors.index.json", *shards}
    assert uploaded_names(upload) == expected  # no optimizer.pt, nothing from checkpoint-10/
    assert "*.safetensors" in upload["delete_patterns"]
    assert result["url"] == "https://huggingface.co/someone/tiny-gqa"


def test_cli_uses_the_token_and_never_shows_it(model_dir, monkeypatch, capsys, caplog):
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = RecordingHub()
    tokens = []

    def fake_hfapi(token=None):
        tokens.append(token)
        return hub

    monkeypatch.setattr(publish_module, "HfApi", fake_hfapi)
    rc = main(["publish", str(model_dir), "--repo", "someone/tiny-gqa"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert tokens == [SECRET]
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert "uploaded 6 files" in out and "done: https://huggingface.co/someone/tiny-gqa" in out
    assert SECRET not in out + err + caplog.text
    assert not any(SECRET.encode() in p.read_bytes() for p in model_dir.rglob("*") if p.is_file())
    assert all(SECRET not in repr(kwargs) for _, kwargs in hub.calls)


def test_no_token_is_a_clear_error(model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(GQAError, match="hf auth login"):
        publish(model_dir, "someone/tiny-gqa")


def _missing_shard(path: Path) -> str:
    next(path.glob("model-*.safetensors")).unlink()
    return "listed in model.safetensors.index.json but missing"


def _stray_shard(path: Path) -> str:
    """A shard left over from an earlier save with another shard count."""
    (path / "model-00009-of-00009.safetensors").write_bytes(next(path.glob("model-*.safetensors")).read_bytes())
    return "model-00009-of-00009.safetensors is not listed in model.safetensors.index.json"


def _truncated_shard(path: Path) -> str:
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    return "unreadable"


def _provenance_kv_mismatch(path: Path) -> str:
    prov = json.loads((path / "gqa_provenance.json").read_text())
    prov["conversion"]["kv_heads"] = 4
    (path / "gqa_provenance.json").write_text(json.dumps(prov))
    return "conversion.kv_heads is 4 but config.json num_key_value_heads is 2"


def _config_weights_mismatch(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (path / "config.json").write_text(json.dumps(config))
    return "k_proj.weight has shape [16, 64] in the checkpoint but config.json implies [32, 64]"


def _bad_groups(path: Path) -> str:
    prov = json.loads((path / "gqa_provenance.json").read_text())
    prov["conversion"]["groups"] = prov["conversion"]["groups"][:1]
    (path / "gqa_provenance.json").write_text(json.dumps(prov))
    return "groups for 1 layers; config.json has 2"


def _no_provenance(path: Path) -> str:
    (path / "gqa_provenance.json").unlink()
    return "no gqa_provenance.json"


@pytest.mark.parametrize(
    "break_it, sharded",
    [(_missing_shard, True), (_stray_shard, True), (_truncated_shard, False), (_provenance_kv_mismatch, False),
     (_config_weights_mismatch, False), (_bad_groups, False), (_no_provenance, False)],
)
def test_inconsistent_dir_is_refused_and_nothing_is_uploaded(tmp_path, break_it, sharded):
    path = make_model_dir(tmp_path / "broken", shard=sharded)
    card_before = (path / "README.md").read_text()
    expected_message = break_it(path)
    hub = RecordingHub()
    with pytest.raises(GQAError) as err:
        publish(path, "someone/tiny-gqa", api=hub)
    assert expected_message in str(err.value)
    assert "nothing was uploaded" in str(err.value)
    assert hub.calls == []
    assert (path / "README.md").read_text() == card_before  # the card is written only once checks pass


def test_kept_card_is_checked_against_provenance(model_dir):
    meta, body = split_front_matter((model_dir / "README.md").read_text())
    meta["base_model"] = "someone-else/other-model"
    body = body.replace("KV heads: 8 -> 2", "KV heads: 8 -> 1")
    (model_dir / "README.md").write_text("---\n" + yaml.safe_dump(meta) + "---\n" + body)
    hub = RecordingHub()
    with pytest.raises(GQAError) as err:
        publish(model_dir, "someone/tiny-gqa", keep_card=True, api=hub)
    assert "base_model: 'someone-else/other-model'" in str(err.value)
    assert "KV heads 8 -> 1" in str(err.value)
    assert hub.calls == []
    # The same card, regenerated (the default), passes and is uploaded.
    publish(model_dir, "someone/tiny-gqa", api=hub)
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]


def test_cli_refusal_exits_2_without_traceback(model_dir, capsys):
    _provenance_kv_mismatch(model_dir)
    rc = main(["publish", str(model_dir), "--repo", "someone/tiny-gqa", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not ready to publish" in err and "Traceback" not in err


def test_bad_repo_id_is_refused(model_dir):
    with pytest.raises(GQAError, match="not a valid repository id"):
        publish(model_dir, "not a repo//id", dry_run=True, api=RecordingHub())


def test_gqa_convert_output_passes_the_checks(tmp_path):
    """What the converter writes is publishable as it is: checks pass, the card keeps its claims."""
    from gqa.convert.convert import ConvertOptions, convert

    src = save_tiny_llama(tmp_path / "src")
    out = convert(str(src), tmp_path / "out", ConvertOptions(kv_heads=2)).out_dir
    hub = RecordingHub()
    result = publish(out, "someone/tiny-gqa", keep_card=True, api=hub)  # the converter's own card, checked
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    expected = {"config.json", "gqa_provenance.json", "README.md", "model.safetensors.index.json", *shards}
    assert expected <= uploaded_names(hub.calls[1][1])
    assert result["total_bytes"] == sum((out / f["name"]).stat().st_size for f in result["files"])
