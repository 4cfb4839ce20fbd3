"""What gqa writes and publishes: no local path, home, user name or token leaves the machine, and every
output file gets the umask's mode."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.modeldir import public_path
from gqa.convert.private import find_private
from gqa.convert.publish import files_to_upload
from gqa.train.api import run_recipe
from gqa.train.cli import main
from gqa.train.evaluate import evaluate
from tiny import save_tiny_llama
from train_helpers import REPO, TRAIN_MODULES, docs_text, save_tokenizer, tiny_overrides, write_texts

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
USER = "gqatester"
TOKEN = "hf_fakeTokenValueNeverToBeShown42"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def convert_and_train(root: Path, **train_extra) -> tuple[Path, Path]:
    """An MHA source converted to 2 KV heads, then trained 2 steps with a checkpoint: (converted, trained).
    Every path handed to gqa is absolute."""
    source = save_tiny_llama(root / "models" / "mha", num_key_value_heads=8)
    save_tokenizer(source, docs_text(TRAIN_MODULES))
    for path in source.iterdir():  # a source saved with private modes: its copied files must not keep them
        path.chmod(0o600)
    converted = convert(str(source), root / "models" / "converted", ConvertOptions(kv_heads=2)).out_dir
    train, held = write_texts(root)
    trained = root / "runs" / "trained"
    run_recipe(RECIPE, tiny_overrides(converted, train, held, trained, root / "cache", **{
        "budget.steps": 2, "eval.max_blocks": 8, "checkpoint.every": 1, **train_extra}))
    return converted, trained


@pytest.fixture(scope="module")
def private_home(tmp_path_factory):
    """A home directory named after a fake user, holding the models, data and runs; HF_TOKEN set."""
    home = tmp_path_factory.mktemp("fakehome") / "home" / USER
    home.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("HF_TOKEN", TOKEN)
        mp.delenv("HF_OIDC_RESOURCE", raising=False)
        mp.setattr(getpass, "getuser", lambda: USER)
        converted, trained = convert_and_train(home)
        evaluate(trained, home / "models" / "mha", [home / "eval.txt"], 32, home / "reports",
                 contexts=(), new_tokens=2, progress=False)  # stores its summary in the provenance
        shutil.copytree(trained, home / "runs" / "trained-as-written")
        # What a user's own edits leave behind: the token and a home path in files that get uploaded.
        generation = json.loads((trained / "generation_config.json").read_text())
        (trained / "generation_config.json").write_text(json.dumps({**generation, "note": f"token {TOKEN}"}, indent=2))
        tokenizer_config = json.loads((trained / "tokenizer_config.json").read_text())
        (trained / "tokenizer_config.json").write_text(
            json.dumps({**tokenizer_config, "name_or_path": str(converted)}, indent=2))
        yield {"home": home, "converted": converted, "trained": trained, "as_written": home / "runs" / "trained-as-written"}


def strings_in(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in strings_in(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in strings_in(v)]
    return [tree] if isinstance(tree, str) else []


def test_an_eval_report_names_models_and_data_as_provenance_does(private_home):
    """A report is made to be shared (and may be written into the model directory that gets published)."""
    report = private_home["home"] / "reports"
    for name in ("eval.json", "eval.md"):
        text = (report / name).read_text()
        assert str(private_home["home"]) not in text and USER not in text, name
    results = json.loads((report / "eval.json").read_text())
    assert results["report_files"]["json"] == "eval.json" and "eval.txt" in json.dumps(results)


def test_provenance_of_convert_and_train_holds_no_absolute_path(private_home):
    for model in (private_home["converted"], private_home["trained"]):
        text = (model / "gqa_provenance.json").read_text()
        assert str(private_home["home"]) not in text and USER not in text
        strings = strings_in(json.loads(text))
        assert not [s for s in strings if s.startswith(("/", "~")) or os.path.isabs(s)], model
    training = json.loads((private_home["trained"] / "gqa_provenance.json").read_text())["training"]
    assert training["recipe"]["model"]["path"] == "converted"  # outside the output dir: the name alone
    assert training["data"]["train"] == "train.txt" and training["data"]["eval"] == "eval.txt"
    assert training["recipe_file"] == "tiny-cpu.yaml"
    assert json.loads((private_home["converted"] / "gqa_provenance.json").read_text())["source"]["id"] == "mha"
    evaluation = json.loads((private_home["trained"] / "gqa_provenance.json").read_text())["eval"]
    assert evaluation["baseline"] == "mha" and evaluation["data"] == ["eval.txt"]


def publish_copy(private_home, tmp_path, capsys, *flags, which: str = "trained") -> tuple[int, str, Path]:
    model = tmp_path / "publish" / "trained"
    shutil.copytree(private_home[which], model)
    rc = main(["publish", str(model), "--repo", "someone/tiny-gqa", "--dry-run", *flags])
    out, err = capsys.readouterr()
    return rc, out + err, model


def test_a_trained_model_as_gqa_wrote_it_publishes_without_redaction(private_home, tmp_path, capsys):
    rc, output, model = publish_copy(private_home, tmp_path, capsys, which="as_written")
    assert rc == 0, output
    assert "gqa_run.json" not in {p.name for p in files_to_upload(model)}  # run state with local paths stays home


def test_publish_refuses_paths_and_tokens_naming_each(private_home, tmp_path, capsys):
    rc, output, _ = publish_copy(private_home, tmp_path, capsys)
    assert rc != 0 and "nothing was uploaded" in output and "--redact" in output
    assert "generation_config.json:" in output and "$HF_TOKEN" in output
    assert "tokenizer_config.json:" in output and "home directory" in output
    assert TOKEN not in output


def test_publish_redact_leaves_no_home_user_or_token_in_any_uploaded_file(private_home, tmp_path, capsys):
    rc, output, model = publish_copy(private_home, tmp_path, capsys, "--redact")
    assert rc == 0, output
    assert TOKEN not in output
    files = files_to_upload(model)
    assert {"gqa_provenance.json", "README.md", "config.json", "generation_config.json"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        for secret in (str(private_home["home"]), USER, TOKEN, str(tmp_path)):
            assert secret.encode() not in data, (path.name, secret)
    assert "<redacted>" in (model / "generation_config.json").read_text()
    assert "Uptraining" in (model / "README.md").read_text()  # the card regenerated from the provenance


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_convert_and_train_outputs_get_the_umask_mode(tmp_path, umask, file_mode, dir_mode):
    before = os.umask(umask)
    try:
        converted, trained = convert_and_train(tmp_path)
    finally:
        os.umask(before)
    for root in (converted, trained):
        modes = modes_under(root)
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (dir_mode if (root / name).is_dir() else file_mode)}  # fmt: skip
        assert not wrong, (root.name, wrong)
    names = set(modes_under(trained))
    assert {"model.safetensors", "metrics.jsonl", "README.md", "gqa_provenance.json"} <= names
    assert any(name.startswith("checkpoints/step-") and name.endswith(".safetensors") for name in names), names
    assert any(name.startswith("model-") for name in modes_under(converted))


def test_public_path_keeps_hub_ids_and_names_local_paths(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    data = tmp_path / "data" / "notes.txt"
    data.parent.mkdir()
    data.write_text("x")
    assert public_path(out / "logs", out) == "logs"  # inside the output directory: relative to it
    assert public_path(str(data), out) == "notes.txt"  # outside: the name alone
    assert public_path("/nowhere/on/this/machine.jsonl", out) == "machine.jsonl"
    assert public_path("~/corpus/*.parquet", out) == "*.parquet"
    assert public_path("C:\\Users\\someone\\train.txt", out) == "train.txt"
    for kept in ("HuggingFaceFW/fineweb-edu", "stdlib-docs:train", "main", "language modelling"):
        assert public_path(kept, out) == kept


def test_the_private_finder_passes_urls_fractions_and_words(monkeypatch, tmp_path):
    monkeypatch.setattr(getpass, "getuser", lambda: "root")
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "someone"))
    clean = ("see https://huggingface.co/org/model and arXiv 2305.13245/v2\n| 2 / 8 | 1/2 | grooted: root cause\n"
             '{"vocab": {"Ġ/": 1, "/": 2, "//": 3, "/usr": 4}}')
    assert find_private(clean, "README.md", secrets={"$HF_TOKEN": TOKEN}) == []
    found = find_private(f"path /home/root/x and {TOKEN} in C:\\Users\\me\\x", "f.md", secrets={"$HF_TOKEN": TOKEN})
    assert [f.what for f in found] == ["the value of $HF_TOKEN", "the local path /home/root/x",
                                       "the local path C:\\Users\\me\\x", "the user name root"]
    assert TOKEN not in "".join(map(str, found))
