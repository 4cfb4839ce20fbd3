"""The GPU check: one script that runs what only a GPU can show and writes what it saw as JSON.

On a machine with one CUDA GPU (CPU counterparts in brackets, used where torch sees no GPU or with
--device cpu):

  cuda_tests   `pytest -m gpu tests`: the tests marked `gpu` (skipped: no GPU)
  train_ddp    `accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 1 -m gqa.train`,
               bf16 (torchrun --nproc_per_node 2, gloo, on CPU): a run stopped at budget.stop_at_step and
               resumed, compared with an uninterrupted run: per-step losses and final weights, bit for bit
  train_fsdp2  the same under recipes/accelerate/fsdp.yaml: sharded checkpoint, resume, final gather
               (skipped on CPU: accelerate does not engage its FSDP plugin there)
  train_zero3  the same under recipes/accelerate/deepspeed-zero3.yaml where DeepSpeed is installed
               (else skipped, with the reason)
  eval         `gqa eval` of a converted model against its source: KV-cache bytes, peak memory, decode speed
  throughput   tokens/s and model FLOPs utilisation of a ~1.1B random-weight Llama (TinyLlama's shape)
               trained by `gqa train` and by a bare PyTorch loop (same model, batch, AdamW, bf16 autocast)
               (a small fp32 model on CPU)

Every part is timed and guarded: a part that fails records its error and the script goes on; a
part that would not fit in what is left of --budget-s is skipped with that reason. The JSON is
rewritten after every part, so a run cut short still leaves what it saw. Exit status 0 when no
part failed, 1 otherwise. Everything is built locally (random weights, a tokenizer trained on the
standard library's docstrings): no network is needed.

    .venv/bin/python bench/gpu_check.py --out gpu_check.json             # GPU machine (3-5 minutes, estimated)
    .venv/bin/python bench/gpu_check.py --device cpu --out cpu_check.json  # the CPU counterparts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when a test loads this file by path
from benchlib import bare_step, bare_training, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
PARTS = ("cuda_tests", "train_ddp", "train_fsdp2", "train_zero3", "eval", "throughput")

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so more specific names come first. --peak-tflops overrides it.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


@dataclass(frozen=True)
class Sizes:
    """Everything the parts build and run, per mode."""

    # the train/eval fixture: a Llama with `heads` KV heads (the source), converted to `kv_heads`
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # the tokenizer's, and the fixture models'
    max_positions: int
    corpus_chars: int | None  # keep the first N characters of each corpus split (None: all)
    # train parts: `steps` in all, the split run stopped at `stop_at` and resumed
    train_processes: int
    steps: int
    stop_at: int
    block: int
    global_batch: int
    micro: int
    repeat_reference: bool  # a second uninterrupted run: the run-to-run difference resume is judged against
    # eval
    eval_seq_len: int
    eval_contexts: tuple[int, ...]
    eval_new_tokens: int
    eval_max_tokens: int
    eval_dtype: str
    # throughput: (hidden, layers, heads, kv heads, intermediate, vocab) of the model, batch, steps
    tp_shape: tuple[int, int, int, int, int, int]
    tp_block: int
    tp_global: int
    tp_micro: int
    tp_steps: int
    tp_warmup: int  # first steps left out of the medians
    tp_precision: str


CUDA_SIZES = Sizes(
    hidden=256, layers=4, heads=8, kv_heads=2, intermediate=688, vocab=4096, max_positions=4096, corpus_chars=None,
    train_processes=1, steps=6, stop_at=3, block=256, global_batch=16, micro=8, repeat_reference=True,
    eval_seq_len=1024, eval_contexts=(512, 2048), eval_new_tokens=32, eval_max_tokens=32768, eval_dtype="bfloat16",
    tp_shape=(2048, 22, 32, 4, 5632, 32000), tp_block=2048, tp_global=8, tp_micro=4, tp_steps=12, tp_warmup=3,
    tp_precision="bf16",
)
CPU_SIZES = Sizes(
    hidden=64, layers=2, heads=8, kv_heads=2, intermediate=128, vocab=512, max_positions=256, corpus_chars=150_000,
    train_processes=2, steps=4, stop_at=2, block=64, global_batch=8, micro=2, repeat_reference=False,
    eval_seq_len=64, eval_contexts=(32, 64), eval_new_tokens=4, eval_max_tokens=2048, eval_dtype="float32",
    tp_shape=(128, 2, 4, 2, 352, 512), tp_block=128, tp_global=8, tp_micro=8, tp_steps=6, tp_warmup=2,
    tp_precision="fp32",
)

# Least time a part needs to be worth starting, and most it may take, in seconds.
MIN_SECONDS = {"cuda": {"cuda_tests": 30, "train": 45, "eval": 20, "throughput": 90},
               "cpu": {"cuda_tests": 0, "train": 20, "eval": 8, "throughput": 8}}
MAX_SECONDS = {"cuda": {"cuda_tests": 180, "train": 150, "eval": 90, "throughput": 240},
               "cpu": {"cuda_tests": 60, "train": 120, "eval": 60, "throughput": 60}}
RESERVE_S = 3  # kept back from the budget to write the JSON
RUN_MARKER = "\n[gpu_check run] "  # printed before each run of a batched launch


class Skip(Exception):
    """The part cannot run here; the message says why."""


class CommandFailed(Exception):
    def __init__(self, message: str, command: list[str], output: str):
        super().__init__(message)
        self.command = command
        self.output = output


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fresh(folder: Path) -> Path:
    """An empty folder (a --workdir used before keeps nothing of an earlier check)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def tail(text: str, chars: int = 3000) -> str:
    text = text.replace("\r", "\n")
    return text[-chars:]


# ------------------------------------------------------------------------------------------ the check


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.out = Path(args.out).absolute()
        self.inject = set(args.inject_failure or [])
        self.selected = set(args.parts.split(",")) if args.parts else set(PARTS)
        unknown = (self.selected | self.inject) - set(PARTS)
        if unknown:
            raise SystemExit(f"gpu_check: unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
        self.mode, self.device = detect_device(args.device)
        self.sizes = CUDA_SIZES if self.mode == "cuda" else CPU_SIZES
        self.isolation = args.isolation if args.isolation != "auto" else ("separate" if self.mode == "cuda" else "shared")
        if self.isolation == "shared":  # what runs in this process should not look for the hub either
            for key, value in self.env().items():
                os.environ.setdefault(key, value)
        self.min_s, self.max_s = MIN_SECONDS[self.mode], MAX_SECONDS[self.mode]
        if args.workdir:
            self.workdir = Path(args.workdir).absolute()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tmp = None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="gqa-gpu-check-")
            self.workdir = Path(self._tmp.name)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._fixture: dict[str, Path] | None = None
        self._fixture_error: Exception | None = None
        self.ddp_final: Path | None = None  # DDP's uninterrupted run, to compare FSDP2/ZeRO-3 against
        self.report: dict[str, Any] = {
            "check": "gqa GPU check (bench/gpu_check.py)",
            "command": shlex.join([sys.executable, *sys.argv]),
            "mode": self.mode,
            "device": self.device,
            "versions": versions(),
            "budget_s": args.budget_s,
            "isolation": self.isolation,
            "started": now_iso(),
            "sizes": asdict(self.sizes),
            "parts": {},
        }

    # --- running parts ----------------------------------------------------------------------------

    def run(self) -> int:
        bodies: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
            "cuda_tests": (self.part_cuda_tests, "cuda_tests"),
            "train_ddp": (lambda: self.part_train("ddp"), "train"),
            "train_fsdp2": (lambda: self.part_train("fsdp2"), "train"),
            "train_zero3": (lambda: self.part_train("zero3"), "train"),
            "eval": (self.part_eval, "eval"),
            "throughput": (self.part_throughput, "throughput"),
        }
        try:
            for name in PARTS:
                body, kind = bodies[name]
                self.guarded(name, body, kind)
        finally:
            failed = [n for n, p in self.report["parts"].items() if p["status"] == "failed"]
            self.report["status"] = "failed" if failed else "ok"
            self.report["finished"] = now_iso()
            self.report["seconds"] = round(time.monotonic() - self.started, 1)
            self.write()
            if self._tmp is not None and not self.args.keep:
                self._tmp.cleanup()
        return 1 if failed else 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def guarded(self, name: str, body: Callable[[], dict[str, Any]], kind: str) -> None:
        """Run one part: ok with what it measured, skipped with a reason, or failed with the error."""
        started = time.monotonic()
        record: dict[str, Any]
        try:
            if name not in self.selected:
                raise Skip("not selected (--parts)")
            left = self.remaining()
            if left < max(self.min_s[kind], 1):
                raise Skip(f"time budget: {max(left, 0):.0f} s of --budget-s {self.args.budget_s:g} left, "
                           f"the part needs about {self.min_s[kind]} s")
            self.part_timeout = min(self.max_s[kind], left)
            if name in self.inject:  # the script's own test: a part whose command fails
                self.command([sys.executable, "-c", "import sys; sys.exit('injected failure (--inject-failure)')"],
                             f"{name}-injected")
            record = {"status": "ok", **body()}
        except Skip as skip:
            record = {"status": "skipped", "reason": str(skip)}
        except CheckFailed as err:
            record = {"status": "failed", "error": str(err), **err.result}
        except CommandFailed as err:
            record = {"status": "failed", "error": f"{err}: {shlex.join(err.command)}", "output_tail": tail(err.output)}
        except Exception as err:  # noqa: BLE001 - every part's failure is recorded, and the script goes on
            record = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                      "traceback_tail": tail(traceback.format_exc())}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.report["parts"][name] = record
        self.write()
        detail = record.get("reason") or record.get("error") or ""
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s {detail}".rstrip(), flush=True)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        })
        if self.mode == "cuda":
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
        else:
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
            env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the children see none either
        return env

    def command(self, cmd: list[str], log_name: str, timeout: float | None = None) -> tuple[float, str]:
        """Run a command in its own process group, output to a log; (seconds, output). Raises CommandFailed."""
        timeout = min(timeout or self.part_timeout, max(self.remaining(), 1))
        log = self.workdir / "logs" / f"{log_name}.log"
        started = time.monotonic()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=self.env(),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise CommandFailed(f"timed out after {timeout:.0f} s", cmd, log.read_text(errors="replace")) from None
        output = log.read_text(errors="replace")
        if rc != 0:
            raise CommandFailed(f"exit status {rc}", cmd, output)
        return time.monotonic() - started, output

    def in_process(self, cmd: list[str], log_name: str, call: Callable[[], int | None]) -> None:
        """What `cmd` would run, called in this process instead, its output to a log. Raises CommandFailed.
        (No timeout: used in shared isolation, on CPU, with small sizes.)"""
        import contextlib
        import io
        import logging

        captured = io.StringIO()
        root = logging.getLogger()
        level, handlers = root.level, root.handlers[:]
        root.handlers, root.level = [logging.StreamHandler(captured)], logging.INFO  # as the command's own logging
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                status = call()
        except Exception as err:
            captured.write(traceback.format_exc())
            raise CommandFailed(f"{type(err).__name__}: {err} (in this process)", cmd, captured.getvalue()) from err
        finally:
            root.handlers, root.level = handlers, level
            (self.workdir / "logs" / f"{log_name}.log").write_text(captured.getvalue())
        if status:
            raise CommandFailed(f"exit status {status} (in this process)", cmd, captured.getvalue())

    # --- fixtures ---------------------------------------------------------------------------------

    def fixture(self) -> dict[str, Path]:
        """Corpus files, a tokenizer, a source Llama (MHA) and its conversion to fewer KV heads; built once."""
        if self._fixture_error is not None:
            raise RuntimeError(f"the fixture could not be built: {self._fixture_error}")
        if self._fixture is None:
            started = time.monotonic()
            try:
                self._fixture = build_fixture(self.workdir / "fixture", self.sizes)
                self.report["fixture"] = {"seconds": round(time.monotonic() - started, 1),
                                          **{k: str(v) for k, v in self._fixture.items()}}
            except Exception as err:
                self._fixture_error = err
                raise
        return self._fixture

    # --- parts ------------------------------------------------------------------------------------

    def part_cuda_tests(self) -> dict[str, Any]:
        if self.mode != "cuda":
            raise Skip("--device cpu: the GPU is not used" if self.device["cuda_available"] else
                       "no GPU: torch sees no CUDA device")
        junit = self.workdir / "gpu-tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               str(REPO / "tests")]
        failure = None
        try:
            self.command(cmd, "cuda-tests")
        except CommandFailed as err:
            if not junit.is_file():  # pytest did not get as far as running tests
                raise
            failure = err
        tests = read_junit(junit)
        result = {
            "command": shlex.join(cmd),
            "passed": sum(t["outcome"] == "passed" for t in tests),
            "failed": sum(t["outcome"] in ("failed", "error") for t in tests),
            "skipped": sum(t["outcome"] == "skipped" for t in tests),
            "tests": tests,
        }
        if not tests:
            raise CheckFailed("no test carries the gpu marker (pytest -m gpu collected nothing)", result)
        if failure is not None or result["failed"] or result["skipped"]:
            # on a GPU machine no gpu test may skip: a skip means it did not see the GPU
            failing = [t["id"] for t in tests if t["outcome"] != "passed"]
            raise CheckFailed(f"{len(failing)} of {len(tests)} gpu tests did not pass: {', '.join(failing)}",
                              {**result, "output_tail": tail(failure.output if failure else "")})
        return result

    def part_train(self, config: str) -> dict[str, Any]:
        sizes = self.sizes
        if config in ("fsdp2", "zero3") and self.mode != "cuda":
            what = "FSDP2" if config == "fsdp2" else "DeepSpeed ZeRO-3"
            raise Skip(f"no GPU: {what} needs CUDA (on CPU accelerate runs gloo as MULTI_CPU and does not engage "
                       f"its {'FSDP' if config == 'fsdp2' else 'DeepSpeed'} plugin)")
        if config == "zero3" and not module_available("deepspeed"):
            raise Skip("DeepSpeed is not installed (pip install deepspeed)")
        fx = self.fixture()
        root = fresh(self.workdir / f"train-{config}")
        base = [
            f"model.path={fx['converted']}", f"data.train={fx['train']}", f"data.eval={fx['heldout']}",
            f"data.cache_dir={self.workdir / 'data-cache'}", f"data.block_size={sizes.block}",
            f"budget.steps={sizes.steps}", f"batch.global_sequences={sizes.global_batch}", f"batch.micro={sizes.micro}",
            "eval.every=0", "eval.max_blocks=8", "checkpoint.every=0", "precision=bf16", "logging.every=1",
            "logging.trackers=[]", "schedule.warmup_steps=1", "optimizer.lr=1e-3",
        ]
        whole, split = root / "whole", root / "split"
        plan = [("whole", whole, []), ("stopped", split, [f"budget.stop_at_step={sizes.stop_at}"]), ("resumed", split, [])]
        if sizes.repeat_reference:
            plan.append(("whole-again", root / "whole-again", []))
        runs = [{"name": name, "out": str(out), "argv": ["tiny-cpu", *base, f"output.dir={out}", *extra]}
                for name, out, extra in plan]
        launch = self.launcher(config)
        commands, done = self.train_runs(config, launch, runs)

        stopped, resumed = done["stopped"]["after"], done["resumed"]["after"]
        resumed_steps = [r["step"] for r in metrics_rows(split)[stopped["metrics_rows"]:] if "loss" in r]
        checkpoint = f"step-{sizes.stop_at:08d}"
        whole_losses, split_losses = losses_by_step(whole), losses_by_step(split)
        common = sorted(set(whole_losses) & set(split_losses))
        loss_diff = max((abs(whole_losses[s] - split_losses[s]) for s in common), default=float("nan"))
        resume = compare_weights(whole, split)
        control = compare_weights(fx["converted"], whole)  # training must have changed the weights: the comparison sees it
        result: dict[str, Any] = {
            "launcher": shlex.join(launch),
            "commands": commands,
            "run_seconds": {name: run["seconds"] for name, run in done.items()},
            "processes": sizes.train_processes,
            "steps": sizes.steps,
            "stop_at_step": sizes.stop_at,
            "stopped_run": stopped,
            "resumed_run": {**resumed, "resumed_from_checkpoint": done["resumed"]["resuming_logged"],
                            "steps_run": resumed_steps},
            "resume": {**resume, "losses_identical": common == list(range(1, sizes.steps + 1)) and loss_diff == 0.0,
                       "loss_max_abs_diff": loss_diff},
            "losses": {"uninterrupted": whole_losses, "stopped_and_resumed": split_losses},
            "control_vs_initial_weights": control,
        }
        if sizes.repeat_reference:
            result["repeat_reference"] = compare_weights(whole, root / "whole-again")
        if config == "ddp":
            self.ddp_final = whole
        elif self.ddp_final is not None:
            result["vs_ddp_uninterrupted"] = compare_weights(self.ddp_final, whole)

        files = stopped["checkpoint_files"]
        checks = {
            "stopped_at_step": stopped["status"] == "stopped" and stopped["steps"] == sizes.stop_at
            and checkpoint in stopped["checkpoints"],
            "resumed_from_checkpoint": done["resumed"]["resuming_logged"]
            and resumed_steps == list(range(sizes.stop_at + 1, sizes.steps + 1)),
            "finished": resumed["status"] == "finished" and done["whole"]["after"]["status"] == "finished",
            "training_changed_weights": control["same_tensors"] and control["max_abs_diff"] > 0,
            "resume_matches_uninterrupted": resume_matches(resume, result.get("repeat_reference")),
        }
        if config == "fsdp2":  # sharded: accelerate writes a torch.distributed.checkpoint folder, not model weights
            checks["sharded_checkpoint"] = any(f.startswith("pytorch_model_fsdp") for f in files)
        if config == "zero3":
            checks["zero_checkpoint"] = any(f == "pytorch_model" or f.startswith("global_step") for f in files)
        if config in ("fsdp2", "zero3"):  # the final gather: every tensor of the model, whole, in the saved files
            checks["final_model_gathered"] = compare_weights(fx["converted"], split)["same_tensors"]
        result["checks"] = checks
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise CheckFailed(f"checks failed: {', '.join(bad)}", result)
        return result

    def train_runs(self, config: str, launch: list[str], runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
        """Run `gqa train` once per run, in order: the commands, and per run {seconds, after: the output dir's
        state, resuming_logged}.

        separate: one launch per run (`LAUNCHER -m gqa.train RECIPE KEY=VALUE...`), as a user runs them;
        shared: one launch whose processes run gqa.train's entry point once per run, keeping the process
        group up between runs (a launch costs seconds of imports on a small CPU machine).
        """
        done: dict[str, Any] = {}
        if self.isolation == "separate":
            commands = []
            for run in runs:
                cmd = [*launch, "-m", "gqa.train", *run["argv"]]
                commands.append(shlex.join(cmd))
                seconds, output = self.command(cmd, f"train-{config}-{run['name']}")
                done[run["name"]] = {"seconds": round(seconds, 1), "after": output_state(Path(run["out"])),
                                     "resuming_logged": "resuming from" in output}
            return commands, done
        spec, result = self.workdir / f"train-{config}-runs.json", self.workdir / f"train-{config}-result.json"
        spec.write_text(json.dumps({"runs": runs}))
        cmd = [*launch, str(SCRIPT), "--worker", "train", str(spec), str(result)]
        _, output = self.command(cmd, f"train-{config}")
        recorded = json.loads(result.read_text())
        segments = output.split(RUN_MARKER)[1:]  # rank 0 prints the marker, then the run's name, before each run
        for run, segment in zip(runs, segments):
            done[run["name"]] = {**recorded[run["name"]], "resuming_logged": "resuming from" in segment}
        return [shlex.join(cmd)], done

    def launcher(self, config: str) -> list[str]:
        """The launch command up to what it runs (`-m gqa.train` or a script)."""
        if self.mode == "cpu":
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.sizes.train_processes),
                    "--master_port", str(free_port())]
        file = {"ddp": "ddp.yaml", "fsdp2": "fsdp.yaml", "zero3": "deepspeed-zero3.yaml"}[config]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes" / "accelerate" / file), "--num_processes", "1", "--num_machines", "1",
                "--machine_rank", "0", "--main_process_port", str(free_port())]

    def part_eval(self) -> dict[str, Any]:
        sizes, fx = self.sizes, self.fixture()
        report_dir = fresh(self.workdir / "eval-report")
        cmd = [sys.executable, "-m", "gqa.train.cli", "eval", str(fx["converted"]), "--baseline", str(fx["source"]),
               "--data", str(fx["heldout"]), "--seq-len", str(sizes.eval_seq_len), "--report", str(report_dir),
               "--contexts", ",".join(map(str, sizes.eval_contexts)), "--new-tokens", str(sizes.eval_new_tokens),
               "--max-tokens", str(sizes.eval_max_tokens), "--device", self.mode, "--dtype", sizes.eval_dtype,
               "--no-update-card"]
        if self.isolation == "separate":
            self.command(cmd, "eval")
        else:
            self.in_process(cmd, "eval", lambda: gqa_main(cmd[3:]))
        results = json.loads((report_dir / "eval.json").read_text())
        models = {}
        for entry in results["models"]:
            kv = entry["kv_cache"]
            models[entry["role"]] = {
                "kv_heads": entry.get("kv_heads"),
                "perplexity": entry.get("perplexity"),
                "kv_cache_bytes_per_token": kv["bytes_per_token"],
                "kv_cache_measured_bytes_per_token": kv["measured_bytes_per_token"],
                "kv_cache_matches_config": kv["matches_config"],
                "kv_cache_bytes_at_context": kv["bytes_at_context"],
                "kv_context": kv["context"],
                "decode": [{k: d[k] for k in ("context", "peak_memory_bytes", "kv_cache_bytes", "cached_tokens",
                                               "prefill_s", "decode_tokens_per_s")} for d in entry["decode"]],
            }
        model, baseline = models["model"], models["baseline"]
        result = {
            "command": shlex.join(cmd),
            "device": results["device"],
            "dtype": results["dtype"],
            "peak_memory_kind": results["peak_memory_kind"],
            "agreement": results.get("agreement"),
            "kv_cache_ratio": baseline["kv_cache_bytes_per_token"] / model["kv_cache_bytes_per_token"],
            "models": models,
        }
        decodes = [d for m in models.values() for d in m["decode"]]
        checks = {
            "ran_on_the_device": results["device"] == self.mode,
            "kv_cache_matches_config": all(m["kv_cache_matches_config"] for m in models.values()),
            "kv_cache_ratio_is_heads_over_kv_heads": result["kv_cache_ratio"] == sizes.heads / sizes.kv_heads,
            "every_context_decoded": all(len(m["decode"]) == len(sizes.eval_contexts) for m in models.values()),
            "peak_memory_measured": bool(decodes) and all(d["peak_memory_bytes"] > 0 for d in decodes),
        }
        result["checks"] = checks
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise CheckFailed(f"checks failed: {', '.join(bad)}", result)
        return result

    def part_throughput(self) -> dict[str, Any]:
        sizes, fx = self.sizes, self.fixture()
        spec = {
            "device": self.mode,
            "shape": sizes.tp_shape,
            "block": sizes.tp_block,
            "global_batch": sizes.tp_global,
            "micro": sizes.tp_micro,
            "steps": sizes.tp_steps,
            "warmup": sizes.tp_warmup,
            "precision": sizes.tp_precision,
            "tokenizer": str(fx["source"]),
            "train": str(fx["train"]),
            "heldout": str(fx["heldout"]),
            "root": str(fresh(self.workdir / "throughput")),
        }
        spec_file = self.workdir / "throughput-spec.json"
        result_file = self.workdir / "throughput-result.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, str(SCRIPT), "--worker", "throughput", str(spec_file), str(result_file)]
        if self.isolation == "separate":
            self.command(cmd, "throughput")
        else:
            self.in_process(cmd, "throughput", lambda: throughput_worker(spec_file, result_file))
        result = json.loads(result_file.read_text())
        peak = self.args.peak_tflops
        peak_source = "--peak-tflops" if peak else None
        if peak is None and self.mode == "cuda":
            peak = peak_tflops_for(self.device.get("name", ""))
            peak_source = f"table entry for {self.device.get('name')}" if peak else None
        result["peak_tflops"] = peak
        result["peak_source"] = peak_source or (
            "none: no bf16 peak is known for a CPU; pass --peak-tflops" if self.mode == "cpu"
            else f"none: {self.device.get('name')} is not in the table; pass --peak-tflops")
        flops_per_token = 6 * result["parameters"]
        for run in ("gqa_train", "bare_loop"):
            tps = result[run]["tokens_per_s"]
            result[run]["mfu"] = flops_per_token * tps / (peak * 1e12) if peak else None
        result["ratio_gqa_to_bare"] = result["gqa_train"]["tokens_per_s"] / result["bare_loop"]["tokens_per_s"]
        result["flops_per_token"] = flops_per_token
        result["mfu_formula"] = "6 x parameters (embeddings included) x tokens/s / peak dense bf16 FLOP/s"
        return result


class CheckFailed(Exception):
    """A part ran, but what it saw is wrong; the measurements go into the record with the error."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------ helpers


def detect_device(choice: str) -> tuple[str, dict[str, Any]]:
    import torch

    available = torch.cuda.is_available()
    if choice != "cpu" and available:
        props = torch.cuda.get_device_properties(0)
        return "cuda", {"kind": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                        "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
                        "cuda_available": True, "cuda_version": torch.version.cuda}
    if choice == "cuda":
        raise SystemExit("gpu_check: --device cuda, but torch sees no CUDA GPU")
    return "cpu", {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "cuda_available": available}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops_for(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("gqa", "torch", "transformers", "accelerate", "datasets", "deepspeed"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    try:
        found["gqa_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["gqa_commit"] = None
    return found


def read_junit(path: Path) -> list[dict[str, Any]]:
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "")[:500]
        tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return tests


def output_state(out: Path) -> dict[str, Any]:
    """What a `gqa train` invocation left in its output dir: status, steps, metrics rows, checkpoints."""
    info = run_file(out)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    newest = out / "checkpoints" / checkpoints[-1] if checkpoints else None
    return {"status": info.get("status"), "steps": info.get("steps"), "metrics_rows": len(metrics_rows(out)),
            "checkpoints": checkpoints, "checkpoint_files": sorted(p.name for p in newest.iterdir()) if newest else [],
            "final_model": (out / "config.json").is_file()}


def run_file(out: Path) -> dict[str, Any]:
    path = out / "gqa_run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses_by_step(out: Path) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in metrics_rows(out) if "loss" in r}


def load_weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def compare_weights(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Tensor by tensor: the same names and shapes, how many differ, the largest absolute difference."""
    import torch

    a, b = load_weights(a_dir), load_weights(b_dir)
    same_tensors = bool(a) and set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    if not same_tensors:
        return {"same_tensors": False, "bit_identical": False, "max_abs_diff": None, "tensors": len(b),
                "tensors_differing": None, "missing": sorted(set(a) - set(b))[:10], "extra": sorted(set(b) - set(a))[:10]}
    differing, largest = 0, 0.0
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or not torch.equal(x, y):
            differing += 1
            largest = max(largest, (x.double() - y.double()).abs().max().item())
    return {"same_tensors": True, "bit_identical": differing == 0, "max_abs_diff": largest, "tensors": len(a),
            "tensors_differing": differing}


def resume_matches(resume: dict[str, Any], repeat: dict[str, Any] | None) -> bool:
    """Bit for bit; or, where two uninterrupted runs already differ (a GPU's non-deterministic kernels),
    no further apart than four times their difference."""
    if resume["bit_identical"]:
        return True
    if repeat is None or repeat["bit_identical"] or not repeat["same_tensors"] or resume["max_abs_diff"] is None:
        return False
    return resume["max_abs_diff"] <= 4 * repeat["max_abs_diff"]


def write_text_files(root: Path, sizes: Sizes) -> tuple[Path, Path]:
    from gqa.convert.corpus import corpus_documents

    files = []
    for split, name in (("train", "train.txt"), ("heldout", "heldout.txt")):
        documents, kept, chars = corpus_documents(split), [], 0
        limit = sizes.corpus_chars if split == "train" or sizes.corpus_chars is None else sizes.corpus_chars // 3
        for doc in documents:
            if limit is not None and chars >= limit:
                break
            kept.append(doc)
            chars += len(doc) + 2
        path = root / name
        path.write_text("\n\n".join(kept) + "\n")
        files.append(path)
    return files[0], files[1]


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=None,
    )


def build_fixture(root: Path, sizes: Sizes) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from gqa.convert.convert import convert
    from gqa.convert.options import ConvertOptions

    fresh(root)
    train, heldout = write_text_files(root, sizes)
    tokenizer = train_tokenizer(train.read_text().split("\n\n"), sizes.vocab)
    torch.manual_seed(0)
    config = llama_config(sizes.hidden, sizes.layers, sizes.heads, sizes.heads, sizes.intermediate,
                          max(sizes.vocab, len(tokenizer)), sizes.max_positions)
    source = root / "source-mha"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(source)
    tokenizer.save_pretrained(source)
    converted = root / f"converted-gqa{sizes.kv_heads}"
    convert(str(source), converted, ConvertOptions(kv_heads=sizes.kv_heads))
    return {"train": train, "heldout": heldout, "source": source, "converted": converted}


# ------------------------------------------------------------------------------------------ the worker


def throughput_worker(spec_file: Path, result_file: Path) -> None:
    """`gqa train` and a bare PyTorch loop, one after the other in this process, on one model and batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa.train.commands import main as gqa_train

    spec = json.loads(spec_file.read_text())
    device = torch.device(spec["device"])
    root = Path(spec["root"])
    hidden, layers, heads, kv_heads, intermediate, vocab = spec["shape"]
    config = llama_config(hidden, layers, heads, kv_heads, intermediate, vocab, max(spec["block"], 2048))
    model_dir = root / "model"
    started = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    with torch.device(device):  # initialising 1B parameters is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(model_dir)
    del model
    build_s = time.perf_counter() - started
    release(device)

    overrides = [
        f"model.path={model_dir}", f"data.train={spec['train']}", f"data.eval={spec['heldout']}",
        f"data.cache_dir={root / 'cache'}", f"data.block_size={spec['block']}", f"budget.steps={spec['steps']}",
        f"batch.global_sequences={spec['global_batch']}", f"batch.micro={spec['micro']}", "eval.every=0",
        f"eval.max_blocks={spec['micro']}", "checkpoint.every=0", f"precision={spec['precision']}", "logging.every=1",
        "logging.trackers=[]", "schedule.warmup_steps=1", f"output.dir={root / 'gqa-train'}",
    ]
    def peak_memory() -> int | None:  # since the last release()
        return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    started = time.perf_counter()
    status = gqa_train(["tiny-cpu", *overrides])  # `gqa train tiny-cpu KEY=VALUE...`, in this process
    if status:
        raise RuntimeError(f"gqa train exited with status {status}")
    gqa_wall = time.perf_counter() - started
    gqa_peak = peak_memory()
    release(device)
    gqa_steps = [r["tokens_per_second"] for r in metrics_rows(root / "gqa-train") if "tokens_per_second" in r]
    bare_steps = bare_loop(spec, model_dir, overrides, device)
    bare_peak = peak_memory()

    def summary(rates: list[float], peak: int | None) -> dict[str, Any]:
        timed = rates[spec["warmup"]:] or rates
        return {"tokens_per_s": statistics.median(timed), "steps_timed": len(timed),
                "per_step_tokens_per_s": [round(r, 1) for r in rates], "peak_memory_bytes": peak}

    result_file.write_text(json.dumps({
        "model": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                  "intermediate": intermediate, "vocab": vocab},
        "parameters": parameters,
        "embedding_parameters": embedding,
        "precision": spec["precision"],
        "device": str(device),
        "tokens_per_step": spec["global_batch"] * spec["block"],
        "batch": {"global_sequences": spec["global_batch"], "micro": spec["micro"], "block": spec["block"]},
        "steps": spec["steps"],
        "timing": f"median tokens/s of steps {spec['warmup'] + 1}..{spec['steps']} (each step timed on its own)",
        "gqa_train": {**summary(gqa_steps, gqa_peak), "wall_s_with_setup_and_save": round(gqa_wall, 1)},
        "bare_loop": summary(bare_steps, bare_peak),
        "build_model_s": round(build_s, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated during each run" if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


def gqa_main(argv: list[str]) -> int:
    """The `gqa` console script's entry point, in this process."""
    from gqa.train.cli import main

    return main(argv)


def train_worker(spec_file: Path, result_file: Path) -> None:
    """Under a launcher: gqa.train's entry point once per run, in order, in these processes."""
    import torch.distributed
    from accelerate import PartialState

    from gqa.train.commands import main as train_main

    # Each run ends with accelerator.end_training(), which takes the process group down; bringing it up again in
    # the same processes is not reliable, so keep it for the next run (accelerate reuses an initialised group).
    PartialState.destroy_process_group = lambda self, group=None: None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    recorded = {}
    for run in json.loads(spec_file.read_text())["runs"]:
        if rank0:
            print(f"{RUN_MARKER}{run['name']}", flush=True)
        started = time.perf_counter()
        status = train_main(run["argv"])
        if status:
            raise SystemExit(f"gqa train exited with status {status} in run {run['name']}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        recorded[run["name"]] = {"seconds": round(time.perf_counter() - started, 1), "after": output_state(Path(run["out"]))}
    if rank0:
        result_file.write_text(json.dumps(recorded))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bare_loop(spec: dict[str, Any], model_dir: Path, overrides: list[str], device) -> list[float]:
    """What a hand-written loop does with the same blocks in the same order: tokens/s of each step."""
    from transformers import get_scheduler

    from gqa.train.api import load_recipe

    recipe = load_recipe("tiny-cpu", overrides)
    steps, micro, global_batch = spec["steps"], spec["micro"], spec["global_batch"]
    blocks, model, optimizer, accumulation = bare_training(recipe, model_dir, steps, global_batch, micro, device)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=steps)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        loss = bare_step(model, optimizer, scheduler, blocks[step * accumulation:(step + 1) * accumulation], device,
                         spec["precision"] == "bf16", recipe.optimizer.max_grad_norm)
        loss.item()  # as gqa train does each step: the step is done when its loss is read
        rates.append(global_batch * spec["block"] / (time.perf_counter() - start))
    return rates


# ------------------------------------------------------------------------------------------ the CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: the GPU parts where torch sees a CUDA GPU, else their CPU counterparts")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="time for the whole check, in seconds (default 540); parts that would not fit are skipped")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak in TFLOP/s for the utilisation figure "
                             "(default: from the script's table by device name, e.g. H200 989)")
    parser.add_argument("--parts", default=None, help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--isolation", choices=["auto", "separate", "shared"], default="auto",
                        help="separate (the default with a GPU): every gqa train run, gqa eval and the throughput "
                             "runs each in processes of their own, as a user runs them; shared (the default on CPU, "
                             "where each start costs seconds of imports): one launch for a train part's runs, and "
                             "eval and throughput in this process")
    parser.add_argument("--workdir", default=None, help="where models, runs and logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--inject-failure", action="append", metavar="PART",
                        help="make PART's first command fail (for the script's own test)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec, result = args.worker
        workers = {"throughput": throughput_worker, "train": train_worker}
        if kind not in workers:
            raise SystemExit(f"gpu_check: unknown worker {kind}")
        workers[kind](Path(spec), Path(result))
        return 0
    check = Check(args)
    print(f"[gpu_check] mode {check.mode} ({check.device.get('name')}), budget {args.budget_s:g} s, "
          f"work folder {check.workdir}, report {check.out}", flush=True)
    status = check.run()
    print(f"[gpu_check] {check.report['status']} in {check.report['seconds']} s; wrote {check.out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
