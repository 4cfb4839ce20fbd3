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

# The parts live in modules of their own, next to this file: gpucheck_pytest (cuda_tests), gpucheck_train
# (the train parts' launches) with gpucheck_compare (what the runs left, compared), gpucheck_eval, and
# gpucheck_throughput. gpucheck_fixture holds the sizes and the models they share, gpucheck_commands how a
# command runs, and gpucheck_report the JSON. This file is the command line, the budget and the guard.

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its modules, also when a test loads this file by path
from gpucheck_commands import CheckFailed, CommandFailed, Commands, Skip, tail  # noqa: E402
from gpucheck_eval import eval_part  # noqa: E402
from gpucheck_fixture import CPU_SIZES, CUDA_SIZES, build_fixture  # noqa: E402
from gpucheck_pytest import cuda_tests_part  # noqa: E402
from gpucheck_report import Report, detect_device, now_iso, versions  # noqa: E402
from gpucheck_throughput import throughput_part, throughput_worker  # noqa: E402
from gpucheck_train import skip_unless_supported, train_part, train_worker  # noqa: E402

PARTS = ("cuda_tests", "train_ddp", "train_fsdp2", "train_zero3", "eval", "throughput")

# Least time a part needs to be worth starting, and most it may take, in seconds.
MIN_SECONDS = {"cuda": {"cuda_tests": 30, "train": 45, "eval": 20, "throughput": 90},
               "cpu": {"cuda_tests": 0, "train": 20, "eval": 8, "throughput": 8}}
MAX_SECONDS = {"cuda": {"cuda_tests": 180, "train": 150, "eval": 90, "throughput": 240},
               "cpu": {"cuda_tests": 60, "train": 120, "eval": 60, "throughput": 60}}


class Check:
    """The parts in order, each within what is left of the budget, each outcome recorded in the report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.inject = set(args.inject_failure or [])
        self.selected = set(args.parts.split(",")) if args.parts else set(PARTS)
        unknown = (self.selected | self.inject) - set(PARTS)
        if unknown:
            raise SystemExit(f"gpu_check: unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
        self.mode, self.device = detect_device(args.device)
        self.sizes = CUDA_SIZES if self.mode == "cuda" else CPU_SIZES
        isolation = args.isolation if args.isolation != "auto" else ("separate" if self.mode == "cuda" else "shared")
        self.min_s, self.max_s = MIN_SECONDS[self.mode], MAX_SECONDS[self.mode]
        if args.workdir:
            self.workdir = Path(args.workdir).absolute()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tmp = None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="gqa-gpu-check-")
            self.workdir = Path(self._tmp.name)
        self.commands = Commands(self.mode, isolation, self.workdir, self.started + args.budget_s)
        if isolation == "shared":  # what runs in this process should not look for the hub either
            for key, value in self.commands.env().items():
                os.environ.setdefault(key, value)
        self._fixture: dict[str, Path] | None = None
        self._fixture_error: Exception | None = None
        self.uninterrupted: dict[str, Path] = {}  # each train part's uninterrupted run, to compare the next ones with
        self.report = Report(Path(args.out).absolute(), mode=self.mode, device=self.device, versions=versions(),
                             budget_s=args.budget_s, isolation=isolation, started=now_iso(), sizes=asdict(self.sizes))

    def run(self) -> int:
        parts: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {  # name: (kind, for the time limits; body)
            "cuda_tests": ("cuda_tests", lambda: cuda_tests_part(self.commands, self.device)),
            "train_ddp": ("train", lambda: self.train("ddp")),
            "train_fsdp2": ("train", lambda: self.train("fsdp2")),
            "train_zero3": ("train", lambda: self.train("zero3")),
            "eval": ("eval", lambda: eval_part(self.commands, self.sizes, self.fixture())),
            "throughput": ("throughput", lambda: throughput_part(self.commands, self.sizes, self.fixture(),
                                                                 self.device, self.args.peak_tflops)),
        }
        try:
            for name in PARTS:
                kind, body = parts[name]
                self.guarded(name, kind, body)
        finally:
            ok = self.report.finish(time.monotonic() - self.started)
            if self._tmp is not None and not self.args.keep:
                self._tmp.cleanup()
        return 0 if ok else 1

    def train(self, config: str) -> dict[str, Any]:
        skip_unless_supported(config, self.mode)  # before the fixture: a part that cannot run here builds nothing
        return train_part(self.commands, self.sizes, self.fixture(), config, self.uninterrupted)

    def guarded(self, name: str, kind: str, body: Callable[[], dict[str, Any]]) -> None:
        """Run one part: ok with what it measured, skipped with a reason, or failed with the error."""
        started = time.monotonic()
        record: dict[str, Any]
        try:
            if name not in self.selected:
                raise Skip("not selected (--parts)")
            left = self.commands.remaining()
            if left < max(self.min_s[kind], 1):
                raise Skip(f"time budget: {max(left, 0):.0f} s of --budget-s {self.args.budget_s:g} left, "
                           f"the part needs about {self.min_s[kind]} s")
            self.commands.part_timeout = min(self.max_s[kind], left)
            if name in self.inject:  # the script's own test: a part whose command fails
                self.commands.run([sys.executable, "-c", "import sys; sys.exit('injected failure (--inject-failure)')"],
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
        self.report.add_part(name, record)
        detail = record.get("reason") or record.get("error") or ""
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s {detail}".rstrip(), flush=True)

    def fixture(self) -> dict[str, Path]:
        """Corpus files, a tokenizer, a source Llama (MHA) and its conversion to fewer KV heads; built once."""
        if self._fixture_error is not None:
            raise RuntimeError(f"the fixture could not be built: {self._fixture_error}")
        if self._fixture is None:
            started = time.monotonic()
            try:
                self._fixture = build_fixture(self.workdir / "fixture", self.sizes)
                self.report.data["fixture"] = {"seconds": round(time.monotonic() - started, 1),
                                               **{k: str(v) for k, v in self._fixture.items()}}
            except Exception as err:
                self._fixture_error = err
                raise
        return self._fixture


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
          f"work folder {check.workdir}, report {check.report.path}", flush=True)
    status = check.run()
    print(f"[gpu_check] {check.report.data['status']} in {check.report.data['seconds']} s; wrote {check.report.path}",
          flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
