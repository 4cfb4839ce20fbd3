"""Two real processes (torchrun, gloo DDP on CPU), and the command-line entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import prepare_data, training_order
from train_helpers import REPO, free_port, make_model, tiny_overrides, torchrun, write_texts

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
TESTS = Path(__file__).resolve().parent


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-ddp")
    train_file, eval_file = write_texts(root)
    return root, make_model(root), train_file, eval_file


def grad_norms(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}


def step_0(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["step"] == 0 and key in r]


def test_two_processes_match_one_process_with_the_same_global_batch(ws, tmp_path):
    root, model, train_file, eval_file = ws
    # Unpacked documents: each process's share of a global batch predicts its own number of tokens, and
    # every token must still weigh the same. (One launch costs seconds, so no separate packed run: full
    # blocks come up here too, as micro batches without padding.)
    common = {"budget.steps": 3, "batch.global_sequences": 8, "batch.micro": 2, "eval.max_blocks": 24,
              "checkpoint.every": 0, "schedule.warmup_steps": 0, "data.pack": "false", "eval.baseline": model}
    recipe = load_recipe(RECIPE, tiny_overrides(model, train_file, eval_file, tmp_path / "o", root / "cache", **common))
    documents = prepare_data(recipe.data, AutoTokenizer.from_pretrained(model), model, recipe.seed).train
    lengths = [len(ids) for ids in documents.select(training_order(len(documents), 3 * 8, recipe.seed))["input_ids"]]
    # accelerate deals the micro batches (pairs) out in turn: rank 0 gets pairs 0 and 2 of each step, rank 1 pairs 1 and 3
    share = [sum(lengths[i] - 1 for i in range(8) if i // 2 % 2 == rank) for rank in (0, 1)]
    assert share[0] != share[1], share
    assert any(lengths[i] == lengths[i + 1] == 64 for i in range(0, 24, 2)), lengths

    dump = tmp_path / "dump"
    dump.mkdir()
    command = [*torchrun(), str(TESTS / "train_ddp_worker.py"),
               str(RECIPE), str(dump), *tiny_overrides(model, train_file, eval_file, tmp_path / "two", root / "cache", **common)]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and r["accumulation"] == 2 for r in ranks)
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"

    # The reference: one process, each global batch in one forward pass.
    torch.set_num_threads(1)
    one = run_recipe(RECIPE, tiny_overrides(model, train_file, eval_file, tmp_path / "one", root / "cache",
                                            **{**common, "batch.micro": 8}))
    assert one.plan.processes == 1 and one.plan.accumulation == 1
    assert ranks[0]["tokens_seen"] == one.tokens_seen == sum(lengths)
    two_losses = {int(k): v for k, v in ranks[0]["losses"].items()}
    assert two_losses[1] == pytest.approx(one.losses[1], abs=1e-5)
    # The gradient itself: clipping and Adam would hide a wrongly scaled one from the losses and weights.
    two_norms, one_norms = grad_norms(tmp_path / "two"), grad_norms(tmp_path / "one")
    assert two_norms[1] == pytest.approx(one_norms[1], rel=1e-5)
    # Later steps too: the same data, only the order of floating-point sums differs.
    for step in (2, 3):
        assert two_losses[step] == pytest.approx(one.losses[step], abs=1e-4), step
        assert two_norms[step] == pytest.approx(one_norms[step], rel=1e-3), step
    # Evaluation gathers every process's share: the same perplexity from one process or two.
    assert ranks[0]["final_eval"]["loss"] == pytest.approx(one.final_eval["loss"], abs=1e-4)
    assert ranks[0]["final_eval"]["tokens"] == one.final_eval["tokens"]
    # So do step 0 and the baseline's figure (here the model itself), each written once, by the main process.
    for key in ("eval_perplexity", "baseline_eval_perplexity"):
        (two_at_0,), (one_at_0,) = (step_0(tmp_path / run, key) for run in ("two", "one"))
        assert two_at_0 == pytest.approx(one_at_0, rel=1e-4), key
    # The saved model is rank 0's weights.
    trained = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(trained[name], rank0[name]) for name in trained)


def test_python_dash_m_entry_point_trains_and_reports_errors(ws, tmp_path):
    root, model, train_file, eval_file = ws
    out = tmp_path / "cli"
    extra = {"budget.steps": 2, "batch.global_sequences": 8, "eval.max_blocks": 8, "checkpoint.every": 0}
    command = [sys.executable, "-m", "gqa.train", str(RECIPE),
               *tiny_overrides(model, train_file, eval_file, out, root / "cache", **extra)]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained 2 steps, 1,024 tokens" in done.stdout
    assert "processes     1" in done.stderr and "accumulation  1" in done.stderr  # the plan, before step 1
    assert (out / "model.safetensors").is_file()

    bad = subprocess.run([sys.executable, "-m", "gqa.train", str(RECIPE), "optimizer.lrr=1"],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "gqa train: error:" in bad.stderr and "optimizer.lrr: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_gqa_console_script_dispatches_to_train(tmp_path):
    gqa = shutil.which("gqa", path=str(Path(sys.executable).parent))
    done = subprocess.run([gqa, "train", str(RECIPE), f"model.path={tmp_path / 'absent'}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "model.path:" in done.stderr and "not a directory" in done.stderr


def test_two_processes_refuse_a_global_batch_they_cannot_split(tmp_path):
    """Training counts its processes as a launcher tells them (WORLD_SIZE and RANK, as torchrun sets them):
    micro batches of 3 on 2 processes do not divide 16 sequences, and each process says so, naming the keys,
    before any weights (model.path holds a config alone, so loading anything from it would fail otherwise)."""
    from tiny import tiny_llama_config

    model = tmp_path / "config-only"
    tiny_llama_config().save_pretrained(model)
    overrides = [f"model.path={model}", f"output.dir={tmp_path / 'out'}", "logging.trackers=[]", "batch.micro=3"]
    port = str(free_port())  # for the rendezvous
    workers = [
        subprocess.Popen([sys.executable, "-m", "gqa.train", str(RECIPE), *overrides], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**child_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for rank in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 2, stderr
        assert "Traceback" not in stderr, stderr
        refusal = stderr.strip().splitlines()[-1]
        assert refusal.startswith("gqa train: error: ") and "batch.micro=3 on 2 process(es)" in refusal, stderr
        assert "make batch.global_sequences a multiple of 6" in refusal, refusal
    assert not (tmp_path / "out").exists()
