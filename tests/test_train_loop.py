"""The uptraining loop on a tiny converted model, one process: real steps, real files, real numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import make_collate, prepare_data, training_order
from gqa.train.losses import distillation_loss
from tiny import save_tiny_llama
from train_helpers import REPO, TRAIN_MODULES, docs_text, make_model, save_tokenizer, tiny_overrides, training_workspace

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    return training_workspace(tmp_path_factory.mktemp("train-loop"))


def overrides(ws, out: Path, **extra) -> list[str]:
    return tiny_overrides(ws.model, ws.train, ws.eval, out, ws.cache, **extra)


def run(ws, out: Path, **extra):
    return run_recipe(RECIPE, overrides(ws, out, **extra))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def blocks(ws, out: Path, split: str, **extra) -> torch.Tensor:
    """The cached blocks a run with these overrides uses, as one tensor."""
    recipe = load_recipe(RECIPE, overrides(ws, out, **extra))
    data = prepare_data(recipe.data, AutoTokenizer.from_pretrained(ws.model), ws.model, recipe.seed)
    rows = data.train if split == "train" else data.eval
    return torch.tensor(rows["input_ids"], dtype=torch.long)


def mean_lm_loss(model, input_ids: torch.Tensor) -> float:
    """Token-weighted held-out loss computed with the HF model's own loss, 32 blocks at a time."""
    with torch.no_grad():
        losses = [model(input_ids=rows, labels=rows).loss.item() * len(rows) for rows in input_ids.split(32)]
    return sum(losses) / len(input_ids)  # equal-length blocks: the block mean is the token mean


def test_loss_falls_and_the_trained_model_is_saved_sharded_with_provenance(ws, tmp_path):
    out = tmp_path / "out"
    result = run(ws, out, **{"output.max_shard_size": "100KB", "logging.trackers": "[tensorboard]"})

    assert result.finished and result.steps == 30 and sorted(result.losses) == list(range(1, 31))
    losses = [result.losses[s] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # measured here: about 4.85 -> 3.98
    assert result.tokens_seen == 30 * 16 * 64

    # The saved model loads with AutoModelForCausalLM, from several shards, still with 2 KV heads.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.config.num_key_value_heads == 2 and trained.config.use_cache
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"

    # The reported held-out loss is what the saved model scores; it beats the converted model's.
    held_out = blocks(ws, out, "eval")[:256]
    after = mean_lm_loss(trained, held_out)
    before = mean_lm_loss(AutoModelForCausalLM.from_pretrained(ws.model), held_out)
    assert after == pytest.approx(result.final_eval["loss"], abs=1e-5)
    assert result.final_eval["perplexity"] == pytest.approx(math.exp(after), rel=1e-5)
    assert after < before - 0.3, (before, after)

    provenance = json.loads((out / "gqa_provenance.json").read_text())
    assert provenance["conversion"]["kv_heads"] == 2  # the converter's record is kept
    training = provenance["training"]
    assert training["steps"] == 30 and training["tokens_seen"] == 30 * 16 * 64
    assert training["final_eval"]["loss"] == pytest.approx(after, abs=1e-5)
    assert "Uptraining" in (out / "README.md").read_text()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert all(r["tokens_per_second"] > 0 and r["grad_norm"] > 0 and r["lr"] >= 0 for r in logged)
    assert logged[0]["lr"] < logged[4]["lr"]  # warmup (3 steps) then decay
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 10, 20, 30]  # step 0: before the first update
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    assert json.loads((out / "gqa_run.json").read_text())["status"] == "finished"


def logged(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows (logging.every=1 in the tests: one per step), by step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def accumulated_against_one_micro_batch(ws, tmp_path, **extra) -> float:
    """One step of 4 sequences as 2 micro batches of 2, and as 1 of 4: the same loss, gradient and weights."""
    # Adam's first step is about lr * sign(g): where a gradient element is near eps, float32
    # summation order (two micro batches against one, and how the CPU's kernels split their sums) moves
    # that weight by up to 2 * lr. Such elements are a handful in a matrix; a gradient summed wrong (a
    # micro batch dropped, weighed twice or stepped on by itself) flips the sign of a share of them.
    # Adam and clipping hide the gradient's scale from the weights: the logged grad norm shows it.
    lr = 3e-4
    common = {"budget.steps": 1, "batch.global_sequences": 4, "eval.max_blocks": 8, "checkpoint.every": 0,
              "optimizer.lr": lr, **extra}  # fmt: skip
    small = run(ws, tmp_path / "acc", **common, **{"batch.micro": 2})
    big = run(ws, tmp_path / "big", **common, **{"batch.micro": 4})
    assert small.plan.accumulation == 2 and big.plan.accumulation == 1
    assert small.losses[1] == pytest.approx(big.losses[1], abs=1e-6)
    small_norm, big_norm = logged(tmp_path / "acc")[1]["grad_norm"], logged(tmp_path / "big")[1]["grad_norm"]
    assert small_norm == pytest.approx(big_norm, rel=1e-5), (small_norm, big_norm)
    a, b = weights(tmp_path / "acc"), weights(tmp_path / "big")
    initial = weights(ws.model)
    for name in initial:
        assert not torch.equal(a[name], initial[name]), f"{name} did not train"
    assert_same_step(a, b, lr)
    return small.losses[1]


def assert_same_step(a: dict, b: dict, lr: float) -> None:
    """Two models after the same first Adam step: equal but for a handful of near-eps elements per tensor."""
    for name in a:
        off = (a[name] - b[name]).abs()
        apart = int((off > 1e-6).sum())
        assert apart <= max(2, off.numel() // 1000) and off.max() <= 2 * lr, (name, apart, off.numel(), off.max().item())


def test_accumulation_matches_one_big_micro_batch(ws, tmp_path):
    accumulated_against_one_micro_batch(ws, tmp_path)


@pytest.mark.parametrize("kind", ["lm", "distill"])
def test_accumulation_of_padded_documents_weighs_every_predicted_token_the_same(ws, tmp_path, kind):
    # The step's loss is its summed token losses over its predicted tokens, however the micro
    # batches split them: averaging per-micro-batch means would weigh short documents' tokens more.
    extra = {"data.pack": "false"} | ({"loss.kind": "distill", "model.teacher": ws.teacher} if kind == "distill" else {})
    recipe = load_recipe(RECIPE, overrides(ws, tmp_path / "o", **extra))
    tokenizer = AutoTokenizer.from_pretrained(ws.model)
    documents = prepare_data(recipe.data, tokenizer, ws.model, recipe.seed).train
    first = documents.select(training_order(len(documents), 4, recipe.seed))
    predicted = [len(ids) - 1 for ids in first["input_ids"]]
    # The case that tells the two apart: the step's two micro batches predict different numbers of tokens.
    assert predicted[0] + predicted[1] != predicted[2] + predicted[3], predicted

    loss = accumulated_against_one_micro_batch(ws, tmp_path, **extra)
    # The reported loss is the mean over all the step's predicted tokens, computed here in one piece.
    batch = make_collate(recipe.data.block_size, tokenizer.eos_token_id)(list(first))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student = AutoModelForCausalLM.from_pretrained(ws.model)
    with torch.no_grad():
        if kind == "lm":
            expected = student(**batch).loss
        else:
            teacher = AutoModelForCausalLM.from_pretrained(ws.teacher)
            expected = distillation_loss(student(**inputs).logits, teacher(**inputs).logits, batch["labels"],
                                         recipe.loss.temperature, recipe.loss.distill_weight)
    assert loss == pytest.approx(expected.item(), abs=1e-5)


def test_resume_after_a_checkpoint_equals_an_uninterrupted_run_exactly(ws, tmp_path):
    common = {"budget.steps": 6, "eval.max_blocks": 8, "checkpoint.every": 2}
    whole = run(ws, tmp_path / "whole", **common)

    out = tmp_path / "split"
    first = run(ws, out, **common, **{"budget.stop_at_step": 3})
    assert not first.finished and first.steps == 3 and sorted(first.losses) == [1, 2, 3]
    assert (out / "checkpoints" / "step-00000003" / "gqa_checkpoint.json").is_file()
    assert not (out / "config.json").exists()  # no final model from a stopped run
    with pytest.raises(GQAError, match=r"resume=never, but output\.dir .* holds checkpoints"):
        run(ws, out, **common, resume="never")
    with pytest.raises(GQAError, match=r"resume=.*nowhere is not a complete gqa checkpoint"):
        run(ws, tmp_path / "elsewhere", **common, resume=str(tmp_path / "nowhere"))
    # A checkpoint path continues the run in a fresh output directory ...
    moved = run(ws, tmp_path / "moved", **common, resume=str(out / "checkpoints" / "step-00000003"))
    assert sorted(moved.losses) == [4, 5, 6]
    second = run(ws, out, **common)  # ... and resume=auto picks the newest checkpoint, step 3
    assert second.finished and sorted(second.losses) == [4, 5, 6]
    assert second.tokens_seen == whole.tokens_seen

    for step in range(1, 7):
        assert {**first.losses, **second.losses}[step] == whole.losses[step]
    expected, resumed, moved_weights = weights(tmp_path / "whole"), weights(out), weights(tmp_path / "moved")
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
        assert torch.equal(tensor, moved_weights[name]), name
    # retention: checkpoint.keep=2 of steps 2, 3, 4, 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_gradient_checkpointing_changes_memory_not_results(ws, tmp_path):
    lr = 3e-4
    common = {"budget.steps": 1, "batch.global_sequences": 4, "batch.micro": 4, "eval.max_blocks": 8, "checkpoint.every": 0,
              "optimizer.lr": lr}  # fmt: skip
    plain = run(ws, tmp_path / "plain", **common)
    recomputed = run(ws, tmp_path / "recomputed", **common, **{"train.gradient_checkpointing": "true"})
    assert recomputed.losses[1] == plain.losses[1]
    assert_same_step(weights(tmp_path / "plain"), weights(tmp_path / "recomputed"), lr)


@pytest.mark.parametrize("which", ["attention", "kv"])
def test_partial_training_leaves_every_other_parameter_bit_identical(ws, tmp_path, which):
    out = tmp_path / which
    run(ws, out, **{"train.params": which, "budget.steps": 3, "eval.max_blocks": 8, "checkpoint.every": 0})
    before, after = weights(ws.model), weights(out)
    trained = {"attention": (".self_attn.",), "kv": (".self_attn.k_proj.", ".self_attn.v_proj.")}[which]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if any(part in name for part in trained)}
    assert changed == expected
    assert len(expected) == (8 if which == "attention" else 4)  # 2 layers x (q, k, v, o) or (k, v)


def test_distillation_loss_is_the_documented_combination():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3] = -100
    temperature, weight = 2.0, 0.3
    # Written out by hand: predicted positions t (label t+1 not ignored), KL summed over the vocabulary.
    lm_terms, kl_terms = [], []
    for b in range(2):
        for t in range(4):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            lm_terms.append(-torch.log_softmax(student[b, t], -1)[target])
            p = torch.softmax(teacher[b, t] / temperature, -1)
            q = torch.softmax(student[b, t] / temperature, -1)
            kl_terms.append((p * (p.log() - q.log())).sum())
    lm = torch.stack(lm_terms).mean()
    kl = torch.stack(kl_terms).mean()
    expected = (1 - weight) * lm + weight * temperature**2 * kl
    got = distillation_loss(student, teacher, labels, temperature, weight)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    # identical teacher and student: only the LM part is left
    same = distillation_loss(student, student, labels, temperature, weight)
    assert same.item() == pytest.approx((1 - weight) * lm.item(), abs=1e-6)


def test_distillation_run_optimises_that_loss_against_the_teacher(ws, tmp_path):
    extra = {
        "loss.kind": "distill", "model.teacher": ws.teacher, "loss.temperature": 1.5, "loss.distill_weight": 0.7,
        "budget.steps": 1, "batch.global_sequences": 4, "batch.micro": 4, "eval.max_blocks": 8, "checkpoint.every": 0,
    }
    result = run(ws, tmp_path / "distill", **extra)
    train_blocks = blocks(ws, tmp_path / "distill", "train")
    first_batch = train_blocks[torch.from_numpy(training_order(len(train_blocks), 4, seed=0))]
    student = AutoModelForCausalLM.from_pretrained(ws.model)
    teacher = AutoModelForCausalLM.from_pretrained(ws.teacher)
    with torch.no_grad():
        expected = distillation_loss(student(first_batch).logits, teacher(first_batch).logits, first_batch, 1.5, 0.7)
        lm_only = student(first_batch, labels=first_batch).loss
    assert result.losses[1] == pytest.approx(expected.item(), abs=1e-5)
    assert abs(result.losses[1] - lm_only.item()) > 1e-3  # the teacher really took part


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    teacher = make_model(tmp_path, "teacher", kv_heads=8, seed=1)
    out = tmp_path / "nan"
    extra = {"loss.kind": "distill", "model.teacher": teacher, "budget.steps": 4, "batch.global_sequences": 4,
             "batch.micro": 4, "checkpoint.every": 1, "eval.max_blocks": 8}
    run(ws, out, **extra, **{"budget.stop_at_step": 2})
    good = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    # Corrupt the teacher where it lies: its logits, and so the distillation loss, turn NaN at step 3.
    state = load_file(teacher / "model.safetensors")
    state["lm_head.weight"][0, 0] = float("nan")
    save_file(state, teacher / "model.safetensors", metadata={"format": "pt"})
    pattern = (r"the training loss became nan at step 3; stopped before that step changed the weights, "
               r"and the last good checkpoint is \S*step-00000002 \(step 2\)")
    with pytest.raises(GQAError, match=pattern):
        run(ws, out, **extra)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    kept = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.equal(kept[name], good[name]) for name in good)
    assert not (out / "config.json").exists()
    assert json.loads((out / "gqa_run.json").read_text())["status"] == "failed"


def test_a_diverging_update_stops_the_run_and_keeps_only_finite_checkpoints(ws, tmp_path):
    out = tmp_path / "diverge"
    # An absurd learning rate: step 1 is computed on the sane initial weights, step 2 overflows.
    extra = {"optimizer.lr": "1e30", "schedule.warmup_steps": 0, "optimizer.max_grad_norm": "null",
             "budget.steps": 5, "checkpoint.every": 1, "eval.max_blocks": 8}
    with pytest.raises(GQAError, match=r"the (training loss|gradient norm|weights) became .* at step (\d)") as err:
        run(ws, out, **extra)
    failed_step = int(re.search(r"at step (\d)", str(err.value)).group(1))
    found = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert found and found[-1] == f"step-{failed_step - 1:08d}" and found[-1] in str(err.value)
    for name in found:
        saved = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in saved.values()), name
    assert not (out / "config.json").exists()


def test_a_gradient_norm_reported_as_a_float_is_checked_and_logged(ws, tmp_path, monkeypatch):
    """Under DeepSpeed, accelerate's clip_grad_norm_ returns the engine's norm as a Python float."""
    from accelerate import Accelerator

    clip = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, *args, **kw: clip(self, *args, **kw).item())
    out = tmp_path / "float-norm"
    result = run(ws, out, **{"budget.steps": 2, "batch.global_sequences": 4, "batch.micro": 4, "checkpoint.every": 0,
                             "eval.max_blocks": 8})
    assert result.finished
    norms = [json.loads(line).get("grad_norm") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([n for n in norms if n is not None]) == 2 and all(math.isfinite(n) for n in norms if n is not None)


def test_unpacked_documents_are_padded_and_masked(ws, tmp_path):
    result = run(ws, tmp_path / "unpacked", **{"data.pack": "false", "budget.steps": 2, "eval.max_blocks": 16,
                                               "checkpoint.every": 0})
    # Padding is not counted: fewer tokens than 2 steps x 16 sequences x 64 positions.
    assert 0 < result.tokens_seen < 2 * 16 * 64
    assert math.isfinite(result.final_eval["loss"])
    collate = make_collate(8, pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": list(range(1, 9))}])
    assert batch["labels"][0].tolist() == [5, 6, 7] + [-100] * 5
    assert batch["attention_mask"].sum().item() == 11


def test_output_dtype_casts_the_saved_weights_and_keeps_tied_embeddings_tied(ws, tmp_path):
    tied = save_tiny_llama(tmp_path / "tied", num_key_value_heads=1, tie_word_embeddings=True)
    save_tokenizer(tied, docs_text(TRAIN_MODULES))
    out = tmp_path / "out"
    run_recipe(RECIPE, tiny_overrides(tied, ws.train, ws.eval, out, ws.cache, **{
        "budget.steps": 2, "eval.max_blocks": 8, "checkpoint.every": 0, "output.dtype": "bfloat16"}))
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in saved  # tied to the embedding: stored once, as in the input
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_model_not_made_by_gqa_gets_a_provenance_with_its_training(ws, tmp_path):
    plain = make_model(tmp_path, "plain", provenance=False)
    out = tmp_path / "out"
    run_recipe(RECIPE, tiny_overrides(plain, ws.train, ws.eval, out, ws.cache, **{
        "budget.steps": 2, "eval.max_blocks": 8, "checkpoint.every": 0}))
    provenance = json.loads((out / "gqa_provenance.json").read_text())
    assert provenance["conversion"] is None and provenance["source"]["num_key_value_heads"] == 2
    assert provenance["training"]["steps"] == 2 and provenance["training"]["tokens_seen"] == 2 * 16 * 64


# --- recipes that must fail before training, naming the key ---------------------------------------


def expect_failure(ws, out: Path, pattern: str, **extra) -> None:
    with pytest.raises(GQAError, match=pattern):
        run(ws, out, **extra)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_missing_model_directory(ws, tmp_path):
    expect_failure(ws, tmp_path / "o", r"model\.path: .*not a directory", **{"model.path": tmp_path / "nowhere"})


def test_empty_data(ws, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    expect_failure(ws, tmp_path / "o", r"data\.train holds no text", **{"data.train": empty, "data.cache_dir": tmp_path})


def test_block_size_longer_than_the_data(ws, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words of text.\n\nAnd a second short paragraph.\n")
    expect_failure(ws, tmp_path / "o", r"data\.block_size=200 is longer than the train data",
                   **{"data.train": short, "data.block_size": 200, "data.cache_dir": tmp_path})


def test_block_size_longer_than_the_model_context(ws, tmp_path):
    expect_failure(ws, tmp_path / "o", r"data\.block_size=512 .* context \(256", **{"data.block_size": 512})


def test_a_tracker_that_is_not_installed(ws, tmp_path):
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    expect_failure(ws, tmp_path / "o", r"logging\.trackers: wandb is not installed", **{"logging.trackers": "[wandb]"})


def test_output_directory_of_another_run_or_other_files(ws, tmp_path):
    out = tmp_path / "taken"
    run(ws, out, **{"budget.steps": 1, "batch.global_sequences": 8, "eval.max_blocks": 8, "checkpoint.every": 0})
    with pytest.raises(GQAError, match=r"output\.dir .* holds a different run: optimizer\.lr was 0\.003, now 0\.001"):
        run(ws, out, **{"budget.steps": 1, "batch.global_sequences": 8, "optimizer.lr": 0.001})
    with pytest.raises(GQAError, match=r"already holds the finished run"):
        run(ws, out, **{"budget.steps": 1, "batch.global_sequences": 8, "eval.max_blocks": 8, "checkpoint.every": 0})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GQAError, match=r"output\.dir .* not from `gqa train`"):
        run(ws, foreign)


def test_zero3_placeholder_parameters_keep_their_weight_decay_and_counts(tmp_path, caplog):
    """Under ZeRO-3's zero.Init every parameter's own data is an empty 1-D placeholder; ds_shape and
    ds_numel hold the real shape and size. Matrices must still decay, and the count must not divide by 0."""
    from gqa.train.setup import parameter_groups
    from gqa.train.params import select_trainable

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "m"))
    matrices = {id(p) for p in model.parameters() if p.ndim >= 2}
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    with caplog.at_level("INFO", logger="gqa.train.params"):
        select_trainable(model, "all")
    assert re.search(r"training all parameters: [\d,]+ of [\d,]+ \(\d+\.\d%\)", caplog.text)
    decay, no_decay = parameter_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.requires_grad} & matrices
    assert decay["params"] and no_decay["params"]
