"""The memory plan: estimates against the peak real training steps reach, what fits, and how sharding divides it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from gqa.convert.errors import GQAError
from gqa.train.cli import main as gqa
from gqa.train.launch import Launch, launch_from_config, launch_from_environment, resolve_launch
from gqa.convert.sizes import human_bytes, parse_size
from gqa.train.memory import check_run, estimate_memory, plan_memory
from gqa.train.recipe import load_recipe
from tiny import FAMILY_TYPES, family_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORKER = Path(__file__).parent / "memory_worker.py"


def save_config(path: Path, **values) -> Path:
    """A model directory holding only config.json: all the memory plan reads."""
    defaults = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
    LlamaConfig(**(defaults | values)).save_pretrained(path)
    return path


def recipe(model: Path, *overrides: str):
    return load_recipe("tiny-cpu", [f"model.path={model}", *overrides])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """19M parameters, a 32,000-token vocabulary: weights, optimizer state and logits all weigh in."""
    return save_config(tmp_path_factory.mktemp("memory") / "model")


# --- against real training steps ------------------------------------------------------------------

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "o_proj"], "full": ["k_proj", "v_proj"]}
# name: (train.params, worker settings, recipe overrides)
MODES = {
    "all": ("all", {}, []),
    "attention": ("attention", {}, []),
    "lora": ("lora", LORA, ["train.lora.rank=8", "train.lora.alpha=16", "train.lora.targets=[q_proj,o_proj]",
                            "train.lora.train_kv=true"]),
    "distill": ("all", {"teacher": True}, ["loss.kind=distill", "model.teacher={model}"]),  # the model its own teacher
    "checkpointed": ("all", {"gradient_checkpointing": True}, ["train.gradient_checkpointing=true"]),
}


def measured_peak(model: Path, params: str, micro: int, block: int, accumulation: int, **extra) -> dict:
    """Peak resident bytes of a real optimizer step in a fresh process (tests/memory_worker.py)."""
    settings = dict(config=str(model), params=params, micro=micro, block=block, accumulation=accumulation, steps=1, **extra)
    # glibc hands every freed block back, so the resident set follows the live tensors (see the worker)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, str(WORKER), json.dumps(settings)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", MODES)
def test_the_estimate_is_within_25_percent_of_the_peak_real_steps_reach(model, mode):
    params, settings, overrides = MODES[mode]
    real = measured_peak(model, params, micro=2, block=256, accumulation=2, **settings)
    plan = recipe(model, f"train.params={params}", "batch.micro=2", "data.block_size=256", "batch.global_sequences=4",
                  "precision=fp32", *(o.format(model=model) for o in overrides))
    estimate = estimate_memory(plan, Launch("one", 1), device="cpu", compare=False)
    assert estimate.accumulation == 2
    assert estimate.trainable_params == real["trainable"]  # the same parameters train in both
    print(f"{mode}: estimate {estimate.peak:,} bytes, measured peak {real['peak']:,} bytes, "
          f"ratio {estimate.peak / real['peak']:.4f}")
    # Agreement is within 1% (bench/README.md); the bound is the plan's promise, 25%, and the teacher is
    # checked exactly.
    assert abs(estimate.peak / real["peak"] - 1) < 0.25
    if mode == "distill":  # the model is its own teacher, held in the run's precision (fp32)
        assert estimate.teacher_params == estimate.total_params and estimate.teacher == 4 * estimate.teacher_params


# --- the command ---------------------------------------------------------------------------------


def test_plan_prints_the_table_and_trains_nothing(model, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = gqa(["train", "tiny-cpu", f"model.path={model}", f"output.dir={out}", f"data.cache_dir={cache}",
                "--plan", "--gpu-memory", "80GB"])
    printed = capsys.readouterr().out
    assert code == 0
    for row in ("accumulation", "memory", "weights", "gradients", "optimizer", "activations", "reserve", "total"):
        assert f"  {row}" in printed, printed
    assert "19,155,200 parameters" in printed
    assert re.search(r"\n +fits +yes: ", printed)
    assert not out.exists() and not cache.exists()  # no run directory, no data prepared


def test_launch_and_gpu_options_belong_to_plan(capsys):
    assert gqa(["train", "tiny-cpu", "--gpu-memory", "80GB"]) == 2
    assert "--gpu-memory is an option of --plan" in capsys.readouterr().err


def test_plan_names_the_first_change_that_fits(tmp_path, capsys):
    # A small vocabulary and long blocks: the layers' activations dominate, so checkpointing them helps most.
    deep = save_config(tmp_path / "deep", vocab_size=1000, hidden_size=256, num_hidden_layers=8)
    settings = [f"model.path={deep}", "data.block_size=1024", "batch.micro=8"]
    without = estimate_memory(recipe(deep, *settings), Launch("one", 1), compare=False)
    with_checkpointing = estimate_memory(recipe(deep, *settings, "train.gradient_checkpointing=true"), Launch("one", 1), compare=False)
    assert with_checkpointing.total < 0.8 * without.total
    gpu = (with_checkpointing.total + without.total) // 2

    assert gqa(["train", "tiny-cpu", *settings, "--plan", "--gpu-memory", f"{gpu}B"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\n +fits +no: ", printed)
    assert re.search(r"\n +change +train\.gradient_checkpointing=true: ", printed)


def test_changes_are_tried_cheapest_first(model):
    def advice(launch: Launch, gpu: int, *overrides: str) -> str:
        plan = plan_memory(recipe(model, *overrides), launch, capacity=gpu, compare=False)
        assert plan.fits is False
        return plan.suggestion.change if plan.suggestion else "nothing"

    def total(launch: Launch, *overrides: str) -> int:
        return estimate_memory(recipe(model, *overrides), launch, compare=False).total

    checkpointed = ("train.gradient_checkpointing=true", "data.block_size=512", "batch.global_sequences=64")
    # DDP on 8 processes: the same processes, sharded, before anything else.
    ddp = Launch("ddp", 8)
    assert advice(ddp, total(Launch("fsdp", 8), *checkpointed) + 1, *checkpointed) == "FSDP2 on the same 8 processes " \
        "(accelerate launch with `gqa recipes cp accelerate/fsdp`)"
    # One process: the largest smaller micro batch that fits, before more processes.
    one = Launch("one", 1)
    gpu = total(one, *checkpointed, "batch.micro=4") + 1
    assert total(one, *checkpointed, "batch.micro=8") > gpu
    assert advice(one, gpu, *checkpointed, "batch.micro=8") == "batch.micro=4"
    # At micro batch 1, more processes under FSDP2 before training fewer parameters.
    single = (*checkpointed, "batch.micro=1")
    gpu = total(Launch("fsdp", 2), *single) + 1
    assert advice(one, gpu, *single) == "FSDP2 on 2 processes"
    # Without the GPUs for that, the attention blocks alone (the global batch of 1 cannot split).
    lone = (*single, "batch.global_sequences=1")
    assert advice(one, total(one, *lone, "train.params=attention") + 1, *lone) == "train.params=attention"
    assert advice(one, total(one, *lone, "train.params=lora") + 1, *lone) == "train.params=lora"
    assert advice(one, 10**6, *lone) == "nothing"


# --- before converting ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny MHA Llama (8 KV heads) and what `gqa convert --kv-heads 2` (mean) makes of it."""
    from gqa.convert.convert import convert
    from gqa.convert.options import ConvertOptions
    from tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("source")
    save_tiny_llama(root / "mha")
    convert(str(root / "mha"), root / "gqa2", ConvertOptions(kv_heads=2))
    return root / "mha"


PLAN = ["--plan", "--gpu-memory", "24GB", "--launch", "fsdp", "--processes", "2"]


def test_a_plan_from_the_source_is_the_plan_of_the_converted_model(source, tmp_path, capsys):
    from gqa.convert.convert import converted_config, read_source_config

    converted, unwritten = source.parent / "gqa2", tmp_path / "runs" / "gqa2"
    for settings in ([], ["train.params=lora", "precision=bf16", "batch.micro=4", "batch.global_sequences=16"]):
        assert gqa(["train", "tiny-cpu", f"model.path={converted}", *settings, *PLAN]) == 0
        after = capsys.readouterr().out
        assert gqa(["train", "tiny-cpu", f"model.path={unwritten}", *settings, *PLAN, "--source", str(source),
                    "--kv-heads", "2"]) == 0
        before = capsys.readouterr().out
        model_row = re.search(r"\n  model +.*converted to 2 KV heads \(from 8\).*nothing converted.*\n", before)
        assert model_row, before
        assert before.replace(model_row.group(0), "\n") == after  # every count and byte figure, row by row
        assert gqa(["train", "tiny-cpu", f"model.path={source}", *settings, *PLAN]) == 0
        assert capsys.readouterr().out != after  # the source itself has more parameters: the conversion counts
    assert not unwritten.parent.exists()
    # The library's estimate of the source's converted config equals the converted model's, field by field.
    _, config = read_source_config(str(source))
    planned = recipe(unwritten, "precision=bf16")
    assert estimate_memory(planned, Launch("zero3", 2), config=converted_config(config, 2)) == \
        estimate_memory(recipe(converted, "precision=bf16"), Launch("zero3", 2))


def error_of(argv: list[str], capsys) -> str:
    """The message a failing command prints after `error: `."""
    assert gqa(argv) == 2
    return capsys.readouterr().err.split("error: ", 1)[1].strip()


@pytest.mark.parametrize("kv_heads", ["3", "8", "0"])
def test_a_kv_head_count_the_converter_refuses_is_refused_with_its_message(source, tmp_path, kv_heads, capsys):
    refused = error_of(["convert", str(source), str(tmp_path / "out"), "--kv-heads", kv_heads], capsys)
    assert "--kv-heads" in refused
    assert error_of(["train", "tiny-cpu", f"model.path={tmp_path / 'gqa'}", "--plan", "--source", str(source),
                     "--kv-heads", kv_heads], capsys) == refused
    assert not (tmp_path / "out").exists()


def test_source_and_kv_heads_belong_to_plan_and_go_together(source, capsys):
    assert "--source, --kv-heads are options of --plan" in error_of(
        ["train", "tiny-cpu", "--source", str(source), "--kv-heads", "2"], capsys)
    assert "--source needs --kv-heads G" in error_of(["train", "tiny-cpu", "--plan", "--source", str(source)], capsys)
    assert "--kv-heads needs --source" in error_of(["train", "tiny-cpu", "--plan", "--kv-heads", "2"], capsys)


@pytest.fixture
def no_hub(monkeypatch):
    """Every way transformers and huggingface_hub download a file, recorded and failing (transformers turns a
    failed download into its own OSError, so the test asserts on the record); the test fails on any call."""
    import huggingface_hub
    import transformers.utils.hub

    calls = []

    def download(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"a hub download was attempted: {args}")

    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, download)
    monkeypatch.setattr(huggingface_hub.HfApi, "snapshot_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", download)
    yield
    assert not calls, f"the hub was asked for {calls}"


@pytest.mark.parametrize("spelling", ["runs/never-written", "./never-written", "absolute"])
@pytest.mark.parametrize("plan", [True, False], ids=["plan", "train"])
def test_a_model_path_not_on_disk_is_refused_at_once_without_asking_the_hub(spelling, plan, tmp_path, monkeypatch,
                                                                           no_hub, capsys):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "never-written") if spelling == "absolute" else spelling
    message = error_of(["train", "tiny-cpu", f"model.path={path}", f"output.dir={tmp_path / 'out'}",
                        *(["--plan"] if plan else [])], capsys)
    assert message.startswith(f"model.path: {path} is not a directory")
    assert f"`gqa convert SOURCE {path} --kv-heads G`" in message and "--plan --source SOURCE --kv-heads G" in message


def test_a_teacher_not_on_disk_is_refused_by_the_plan_without_asking_the_hub(model, tmp_path, no_hub, capsys):
    message = error_of(["train", "tiny-cpu", f"model.path={model}", "loss.kind=distill", "model.teacher=owner/teacher",
                        "--plan"], capsys)
    assert message.startswith("model.teacher: owner/teacher is not a directory")


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharding_divides_weights_gradients_and_optimizer_by_the_processes(model, precision):
    setup = recipe(model, f"precision={precision}", "batch.global_sequences=64", "batch.micro=1")
    one = estimate_memory(setup, Launch("one", 1), compare=False)
    for processes in (2, 4, 8):
        ddp = estimate_memory(setup, Launch("ddp", processes), compare=False)
        fsdp = estimate_memory(setup, Launch("fsdp", processes), compare=False)
        zero3 = estimate_memory(setup, Launch("zero3", processes), compare=False)
        # DDP replicates: every process holds what one process holds, and DDP's gradient buckets.
        assert (ddp.weights, ddp.gradients, ddp.optimizer) == (one.weights, one.gradients, one.optimizer)
        assert ddp.buckets == one.gradients and ddp.activations == one.activations
        # FSDP2 and ZeRO-3 hold 1/N of the parameters' state.
        for sharded in (fsdp, zero3):
            assert sharded.gradients == -(-one.gradients // processes)
            assert sharded.optimizer == -(-one.optimizer // processes)
            assert sharded.buckets == 0 and sharded.gathered > 0
        assert fsdp.weights == -(-one.weights // processes)
        if precision == "fp32":
            assert zero3.weights == fsdp.weights
        else:  # DeepSpeed: 16-bit weights plus fp32 master weights, both sharded
            assert zero3.weights == -(-(one.total_params * 2 + one.trainable_params * 4) // processes)
        assert fsdp.total < ddp.total and zero3.total < ddp.total
    assert estimate_memory(setup, Launch("fsdp", 8), compare=False).total < estimate_memory(setup, Launch("fsdp", 2), compare=False).total


def test_fsdp_holds_unsharded_gradients_while_accumulating(model):
    accumulating = estimate_memory(recipe(model, "precision=bf16", "batch.global_sequences=64", "batch.micro=2"),
                                   Launch("fsdp", 8), compare=False)
    assert accumulating.accumulation == 4
    assert accumulating.unsharded_gradients == 2 * accumulating.trainable_params  # bf16, every parameter
    single = estimate_memory(recipe(model, "precision=bf16", "batch.global_sequences=16", "batch.micro=2"),
                             Launch("fsdp", 8), compare=False)
    assert single.accumulation == 1 and single.unsharded_gradients == 0


# --- the launch ----------------------------------------------------------------------------------


def test_the_launch_is_read_as_accelerate_exposes_it():
    assert launch_from_environment({}) == Launch("one", 1, "this invocation")
    assert launch_from_environment({"WORLD_SIZE": "4"}).kind == "ddp"
    assert launch_from_environment({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}) == Launch("fsdp", 8, "accelerate launch")
    env = {"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert launch_from_environment(env).kind == "zero3"
    assert (launch_from_config("accelerate/fsdp").kind, launch_from_config("accelerate/fsdp").processes) == ("fsdp", 8)
    assert launch_from_config("accelerate/deepspeed-zero3").kind == "zero3"
    assert launch_from_config("accelerate/ddp").kind == "ddp"
    assert launch_from_config("accelerate/two-node").processes == 16
    assert resolve_launch("accelerate/fsdp", 16) == Launch("fsdp", 16, "accelerate/fsdp, --processes 16")
    assert resolve_launch("zero3", 4) == Launch("zero3", 4)
    assert resolve_launch(None, 2).kind == "ddp"
    with pytest.raises(GQAError, match="needs --processes"):
        resolve_launch("fsdp", None)
    with pytest.raises(GQAError, match="accelerate config"):
        resolve_launch("fsdp2", 8)


def test_sizes_read_like_the_hub_writes_them_and_print_in_powers_of_two():
    assert parse_size("80GB") == 80 * 10**9 == parse_size("80 GB") == parse_size("80gb")
    assert parse_size("79.6GiB") == int(79.6 * 2**30)
    assert parse_size("24000MB") == 24 * 10**9
    assert parse_size("1024B") == 1024 == parse_size("1024") == parse_size(1024)
    for bad in ("eighty", "80XB", "80G", "0GB", "-1GB"):
        with pytest.raises(GQAError, match="--gpu-memory"):
            parse_size(bad, "--gpu-memory")
    with pytest.raises(GQAError, match="--gpu-memory: '80' has no unit; write for example 80GB"):
        parse_size("80", "--gpu-memory", unit_required=True)
    assert [human_bytes(n) for n in (512, 46_080, 80 * 10**9, 2**40)] == ["512 B", "45.00 KiB", "74.51 GiB", "1.00 TiB"]


def test_a_gpu_memory_without_a_unit_is_refused_before_planning(capsys):
    assert gqa(["train", "tiny-cpu", "--plan", "--gpu-memory", "24"]) != 0
    assert "--gpu-memory: '24' has no unit; write for example 24GB" in capsys.readouterr().err


# --- before step 1 -------------------------------------------------------------------------------


def cuda_accelerator(monkeypatch, gpu_bytes: int):
    """An accelerator as the loop holds it on one CUDA device of `gpu_bytes`, without a GPU."""
    from accelerate.utils import DistributedType

    import gqa.train.memory as memory

    monkeypatch.setattr(memory, "device_memory", lambda device=None: gpu_bytes)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    state = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    return SimpleNamespace(device=torch.device("cuda", 0), state=state)


def test_a_run_that_cannot_fit_is_refused_before_step_1_naming_the_change(model, monkeypatch, caplog):
    setup = recipe(model, "data.block_size=1024", "batch.micro=8")
    need = estimate_memory(setup, Launch("one", 1), accumulation=2, compare=False).total
    accelerator = cuda_accelerator(monkeypatch, need - 1)
    with pytest.raises(GQAError, match=r"per process .* more than .*cuda:0, Test GPU.*Change: train\.gradient_checkpointing=true: .*--skip-memory-check"):
        check_run(setup, 2, accelerator)
    memory = check_run(setup, 2, accelerator, check=False)  # the override: a warning, and the plan
    assert memory.fits is False and "training anyway" in caplog.text
    assert check_run(setup, 2, cuda_accelerator(monkeypatch, need)).fits is True


def test_training_prints_the_memory_plan_before_step_1(tmp_path, caplog):
    import logging

    from gqa.train.api import run_recipe
    from train_helpers import make_model, tiny_overrides, write_texts

    train_file, eval_file = write_texts(tmp_path)
    overrides = tiny_overrides(make_model(tmp_path), train_file, eval_file, tmp_path / "out", tmp_path / "cache",
                               budget__steps=1, eval__every=0, checkpoint__every=0)
    with caplog.at_level(logging.INFO, logger="gqa.train"):  # the run and its setup stages
        result = run_recipe("tiny-cpu", overrides)
    memory = result.plan.memory
    assert memory.estimate.total_params == sum(p.numel() for p in result.model.parameters())
    assert memory.estimate.launch == Launch("one", 1, "accelerate") and memory.estimate.device == "cpu"
    printed = caplog.text
    assert printed.index("  memory") < printed.index("    activations") < printed.index("    total")


def test_the_run_goes_on_when_no_estimate_can_be_made(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": "many"}))
    assert check_run(recipe(broken), 2, cuda_accelerator(monkeypatch, 10**9)) is None
    assert "memory plan: no estimate" in caplog.text


# --- every family --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_is_measured_with_lora_and_a_teacher(model_type, tmp_path):
    path = tmp_path / model_type
    # A vocabulary large enough that logits weigh in at the peak, as in real models: with 128 tokens the
    # peak of a tiny mixture-of-experts model comes in its expert layers' backward, once the logits are freed.
    family_config(model_type, kv=2, vocab_size=1024).save_pretrained(path)
    setup = recipe(path, "train.params=lora", "precision=bf16", "loss.kind=distill", f"model.teacher={path}",
                   "train.gradient_checkpointing=true")
    estimate = estimate_memory(setup, Launch("one", 1), compare=False)
    assert 0 < estimate.trainable_params < estimate.total_params
    assert estimate.teacher == 2 * estimate.teacher_params > 0
    assert estimate.activations > estimate.logits > 0
