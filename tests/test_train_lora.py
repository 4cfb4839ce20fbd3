"""train.params: lora: adapters from the family table, merged into a plain checkpoint, resumed exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.errors import GQAError
from gqa.convert.families import family_for
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import prepare_data, training_order
from gqa.train.losses import distillation_loss
from gqa.train.setup import check_lora_distribution, parameter_groups
from gqa.train.params import apply_lora, merge_lora
from gqa.train.recipe import LoraSection
from tiny import FAMILY_TYPES, build_family_model
from train_helpers import REPO, tiny_overrides, torchrun, training_workspace

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    return training_workspace(tmp_path_factory.mktemp("train-lora"))


def overrides(ws, out: Path, **extra) -> list[str]:
    return tiny_overrides(ws.model, ws.train, ws.eval, out, ws.cache, **{"train.params": "lora", **extra})


def run(ws, out: Path, **extra):
    return run_recipe(RECIPE, overrides(ws, out, **extra))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def module_kind(name: str) -> str:
    """'model.layers.0.self_attn.q_proj.lora_A.default.weight' -> 'q_proj'."""
    return name.split(".self_attn.")[1].split(".")[0] if ".self_attn." in name else name


# --- which parameters train, for every family ---------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_adapters_and_fully_trained_kv_come_from_the_family_table_and_merge_exactly(model_type):
    family = family_for(model_type)
    model = build_family_model(model_type, kv=2)
    original = {name: t.clone() for name, t in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits

    peft_model = apply_lora(model, LoraSection(rank=4))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    adapted = {module_kind(n) for n in trainable if ".lora_" in n}
    full = {module_kind(n) for n in trainable if ".lora_" not in n}
    o_proj = family.o_proj.rsplit(".", 1)[0]
    if family.fused_qkv:  # Phi-3: the fused [Q | K | V] matrix trains fully; adapters on the output projection
        assert adapted == {o_proj} and full == {"qkv_proj"}
    else:
        assert adapted == {family.projections[0], o_proj}
        assert full == {m for m in family.kv_modules if f".self_attn.{m}." in str(original.keys())}
        assert {"k_proj", "v_proj"} <= full
    # the fully trained modules carry no adapters; every trainable parameter is in an attention block
    assert not adapted & full and all(".self_attn." in n for n in trainable)
    # untouched adapters (B = 0) leave the function as it was
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, atol=0, rtol=0)

    # Trained adapters: merging them gives the same function with the model's own tensor names.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
        adapted_logits = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model)
    assert set(merged.state_dict()) == set(original)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-5, rtol=0)

    # train_kv false: adapters on every projection (the fused one included), nothing trains fully.
    plain = apply_lora(build_family_model(model_type, kv=2), LoraSection(rank=4, train_kv=False))
    trainable = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable)
    expected = {*(m.rsplit(".", 1)[0] for m in family.fused_qkv), o_proj} if family.fused_qkv \
        else {*family.projections, o_proj}
    assert {module_kind(n) for n in trainable} == expected


def test_chosen_targets_and_their_errors():
    model = build_family_model("llama", kv=2)
    peft_model = apply_lora(model, LoraSection(rank=4, targets=["gate_proj", "q_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-4] for n in trainable if ".lora_" in n} == {"gate_proj", "q_proj"}
    assert {module_kind(n) for n in trainable if ".lora_" not in n} == {"k_proj", "v_proj"}

    with pytest.raises(GQAError, match=r"train\.lora\.targets: 'qproj' matches no module .* q_proj"):
        apply_lora(build_family_model("llama", kv=2), LoraSection(targets=["qproj"]))
    with pytest.raises(GQAError, match=r"names k_proj, which train\.lora\.train_kv trains fully"):
        apply_lora(build_family_model("llama", kv=2), LoraSection(targets=["q_proj", "k_proj"]))
    with pytest.raises(GQAError, match=r"names qkv_proj, which train\.lora\.train_kv trains fully"):
        apply_lora(build_family_model("phi3", kv=2), LoraSection(targets=["qkv_proj"]))
    # without train_kv, the key/value projections may carry adapters
    apply_lora(build_family_model("llama", kv=2), LoraSection(targets=["k_proj"], train_kv=False))


def test_weight_decay_groups_hold_the_trainable_matrices_and_leave_biases_undecayed():
    model = apply_lora(build_family_model("qwen2", kv=2), LoraSection(rank=4))  # Qwen2: k/v biases
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed | undecayed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert undecayed and all(n.endswith(".bias") for n in undecayed)
    assert {module_kind(n) for n in undecayed} == {"k_proj", "v_proj"}
    assert all(".lora_" in n or n.endswith(("k_proj.weight", "v_proj.weight")) for n in decayed)


def test_lora_refuses_sharded_launches_and_its_keys_do_not_change_other_runs():
    with pytest.raises(GQAError, match="train.params: lora does not run under FSDP"):
        check_lora_distribution(load_recipe(RECIPE, ["train.params=lora"]), DistributedType.FSDP)
    with pytest.raises(GQAError, match="lora does not run under DEEPSPEED"):
        check_lora_distribution(load_recipe(RECIPE, ["train.params=lora"]), DistributedType.DEEPSPEED)
    check_lora_distribution(load_recipe(RECIPE, ["train.params=lora"]), DistributedType.MULTI_GPU)
    check_lora_distribution(load_recipe(RECIPE, ["train.params=all"]), DistributedType.FSDP)

    # Resuming a run compares identities: train.lora counts only when train.params is lora.
    def identity(*extra):
        return load_recipe(RECIPE, list(extra)).run_identity()

    assert identity("train.params=all") == identity("train.params=all", "train.lora.rank=4", "train.lora.train_kv=false")
    assert identity("train.params=lora") != identity("train.params=lora", "train.lora.rank=4")
    assert identity("train.params=lora") != identity("train.params=lora", "train.lora.dropout=0.1")


# --- the loop ------------------------------------------------------------------------------------


def test_lora_run_saves_a_plain_merged_checkpoint_that_computes_what_the_adapters_did(ws, tmp_path):
    out = tmp_path / "out"
    result = run(ws, out, **{"budget.steps": 4, "checkpoint.every": 4, "eval.max_blocks": 8,
                             "schedule.warmup_steps": 0, "train.lora.rank": 4})
    assert result.finished and result.losses[4] < result.losses[1]

    # A plain checkpoint: no adapter files, the input's tensor names and config, loads without peft.
    assert not list(out.glob("adapter_*"))
    trained, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    initial = weights(ws.model)
    state = trained.state_dict()
    assert set(state) == set(initial)
    assert json.loads((out / "config.json").read_text()) == json.loads((ws.model / "config.json").read_text())
    # q and o changed through their adapters, k and v trained fully, nothing else moved
    changed = {module_kind(n) for n in initial if not torch.equal(initial[n], state[n])}
    assert changed == {"q_proj", "o_proj", "k_proj", "v_proj"}
    assert all(torch.equal(result.model.state_dict()[n], state[n]) for n in state)  # the model returned is the one saved

    # The checkpoint at step 4 holds the adapters and the fully trained projections only; rebuilt on the
    # converted weights, that peft model computes what the saved checkpoint computes.
    saved = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    assert saved and all(".lora_" in n or module_kind(n) in ("k_proj", "v_proj") for n in saved)
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.float32), LoraSection(rank=4))
    missing, unexpected = peft_model.load_state_dict(saved, strict=False)
    assert not unexpected and not [n for n in missing if ".lora_" in n]
    assert any(t.abs().sum() > 0 for n, t in saved.items() if ".lora_B." in n)  # the adapters did train
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)

    training = json.loads((out / "gqa_provenance.json").read_text())["training"]
    assert training["params"] == "lora"
    lora = training["lora"]
    assert (lora["rank"], lora["alpha"], lora["train_kv"], lora["merged"]) == (4, 32.0, True, True)
    assert lora["targets"] == ["o_proj", "q_proj"] and lora["fully_trained"] == ["k_proj", "v_proj"]
    assert "LoRA rank 4 (alpha 32) on o_proj, q_proj; k_proj, v_proj trained fully" in (out / "README.md").read_text()


def test_lora_resume_after_a_checkpoint_equals_an_uninterrupted_run_exactly(ws, tmp_path):
    # Dropout on the adapters' input: the random draws of a resumed run must be the uninterrupted run's.
    common = {"budget.steps": 5, "checkpoint.every": 2, "eval.max_blocks": 8, "train.lora.dropout": 0.1,
              "schedule.warmup_steps": 0}
    whole = run(ws, tmp_path / "whole", **common)
    out = tmp_path / "split"
    first = run(ws, out, **common, **{"budget.stop_at_step": 3})
    assert not first.finished and sorted(first.losses) == [1, 2, 3]
    second = run(ws, out, **common)
    assert second.finished and sorted(second.losses) == [4, 5]
    assert {**first.losses, **second.losses} == whole.losses
    expected, resumed = weights(tmp_path / "whole"), weights(out)
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


@pytest.fixture(scope="module")
def bf16_model(ws) -> Path:
    """The tiny model as a bf16 checkpoint (with its tokenizer)."""
    out = ws.root / "converted-bf16"
    AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(ws.model).save_pretrained(out)
    return out


def test_frozen_weights_keep_a_16_bit_checkpoints_dtype_and_come_out_unrounded(ws, bf16_model, tmp_path):
    common = {"precision": "bf16", "budget.steps": 2, "eval.max_blocks": 8, "schedule.warmup_steps": 0}
    stopped = run(ws, tmp_path / "stopped", **{"model.path": bf16_model, "budget.stop_at_step": 1, **common})
    model = stopped.model  # stopped before the end: still the peft model that trained
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert set(trainable.values()) == {torch.float32}
    assert {module_kind(n) for n in trainable} == {"q_proj", "o_proj", "k_proj", "v_proj"}
    assert any(".lora_" not in n for n in trainable)  # the fully trained k/v projections, turned to fp32 too

    run(ws, tmp_path / "whole", **{"model.path": bf16_model, **common})
    source, trained = load_file(bf16_model / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    untouched = [n for n in source if not any(f".{m}." in n for m in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert untouched and all(trained[n].dtype == torch.bfloat16 and torch.equal(trained[n], source[n]) for n in untouched)
    assert not torch.equal(trained["model.layers.0.self_attn.k_proj.weight"], source["model.layers.0.self_attn.k_proj.weight"])

    fp32 = run(ws, tmp_path / "fp32", **{**common, "budget.stop_at_step": 1})  # an fp32 checkpoint is not rounded to bf16
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


def test_gradient_checkpointing_with_frozen_embeddings_changes_memory_not_results(ws, tmp_path):
    common = {"budget.steps": 2, "batch.global_sequences": 4, "batch.micro": 4, "eval.max_blocks": 8,
              "checkpoint.every": 0, "schedule.warmup_steps": 0}
    plain = run(ws, tmp_path / "plain", **common)
    recomputed = run(ws, tmp_path / "recomputed", **common, **{"train.gradient_checkpointing": "true"})
    assert recomputed.losses[2] == pytest.approx(plain.losses[2], abs=1e-6)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "recomputed")
    initial = weights(ws.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    # the adapters in the recomputed layers got their gradients: q and o moved in every layer
    moved = {name for name in initial if not torch.equal(initial[name], b[name])}
    assert {n for n in initial if ".q_proj." in n or ".o_proj." in n} <= moved


def test_distillation_trains_the_adapters_against_a_separate_teacher(ws, tmp_path):
    extra = {"loss.kind": "distill", "model.teacher": ws.teacher, "loss.temperature": 1.5, "loss.distill_weight": 0.7,
             "budget.steps": 2, "batch.global_sequences": 4, "batch.micro": 4, "eval.max_blocks": 8,
             "checkpoint.every": 0, "schedule.warmup_steps": 0}
    result = run(ws, tmp_path / "distill", **extra)
    recipe = load_recipe(RECIPE, overrides(ws, tmp_path / "distill", **extra))
    data = prepare_data(recipe.data, AutoTokenizer.from_pretrained(ws.model), ws.model, recipe.seed).train
    rows = torch.tensor(data["input_ids"], dtype=torch.long)
    first_batch = rows[torch.from_numpy(training_order(len(rows), 8, seed=0))[:4]]
    student = AutoModelForCausalLM.from_pretrained(ws.model)
    teacher = AutoModelForCausalLM.from_pretrained(ws.teacher)
    with torch.no_grad():  # the adapters start as the identity: step 1 is the converted model's loss
        expected = distillation_loss(student(first_batch).logits, teacher(first_batch).logits, first_batch, 1.5, 0.7)
        lm_only = student(first_batch, labels=first_batch).loss
    assert result.losses[1] == pytest.approx(expected.item(), abs=1e-5)
    assert abs(result.losses[1] - lm_only.item()) > 1e-3  # the teacher took part
    # step 2 trained on the same loss through the adapters: the student's q projection moved
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights(tmp_path / "distill")[q], weights(ws.model)[q])


# --- two processes -------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


def test_two_processes_train_lora_like_one_and_resume_exactly(ws, tmp_path):
    common = {"budget.steps": 4, "batch.global_sequences": 8, "batch.micro": 2, "eval.max_blocks": 8,
              "checkpoint.every": 2, "schedule.warmup_steps": 0}
    dump = tmp_path / "dump"
    dump.mkdir()
    shared = overrides(ws, tmp_path / "unused", **common)
    command = [*torchrun(), str(TESTS / "train_ddp_worker.py"), str(RECIPE), str(dump), *shared,
               "@whole", f"output.dir={tmp_path / 'whole'}",
               "@first", f"output.dir={tmp_path / 'split'}", "budget.stop_at_step=3",
               "@second", f"output.dir={tmp_path / 'split'}"]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    def dumped(name: str, rank: int):
        return json.loads((dump / f"{name}-rank{rank}.json").read_text()), load_file(dump / f"{name}-rank{rank}.safetensors")

    (whole, whole0), (_, whole1) = dumped("whole", 0), dumped("whole", 1)
    (first, _), (second, second0) = dumped("first", 0), dumped("second", 0)
    assert whole["processes"] == 2 and whole["accumulation"] == 2 and not first["finished"]
    # both processes hold the same merged model, the one saved, with the model's own tensor names
    saved = load_file(tmp_path / "whole" / "model.safetensors")
    assert set(whole0) == set(saved) == set(weights(ws.model))
    assert all(torch.equal(whole0[n], whole1[n]) and torch.equal(whole0[n], saved[n]) for n in saved)
    # stopped at step 3 and resumed: the uninterrupted run's losses and weights, bit for bit
    assert {**first["losses"], **second["losses"]} == whole["losses"]
    assert all(torch.equal(whole0[n], second0[n]) for n in whole0)

    # One process with the same global batch takes the same steps: the gradients of the adapters and of the
    # fully trained projections are summed over both processes (only floating-point order differs).
    one = run(ws, tmp_path / "one", **{**common, "batch.micro": 8, "checkpoint.every": 0})
    assert whole["losses"]["1"] == pytest.approx(one.losses[1], abs=1e-5)
    for step in (2, 3, 4):
        assert whole["losses"][str(step)] == pytest.approx(one.losses[step], abs=1e-4), step
