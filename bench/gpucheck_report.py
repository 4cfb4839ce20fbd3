"""The GPU check's JSON report: what ran where (the command, the device, package versions), one record per part,
and the outcome; written atomically, so a run cut short still leaves a whole file."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpucheck_commands import REPO


class Report:
    def __init__(self, path: Path, **header: Any):
        self.path = path
        self.data: dict[str, Any] = {
            "check": "gqa GPU check (bench/gpu_check.py)",
            "command": shlex.join([sys.executable, *sys.argv]),
            **header,
            "parts": {},
        }

    def add_part(self, name: str, record: dict[str, Any]) -> None:
        self.data["parts"][name] = record
        self.write()

    def finish(self, seconds: float) -> bool:
        """Write the outcome; True when no part failed."""
        failed = [name for name, part in self.data["parts"].items() if part["status"] == "failed"]
        self.data["status"] = "failed" if failed else "ok"
        self.data["finished"] = now_iso()
        self.data["seconds"] = round(seconds, 1)
        self.write()
        return not failed

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def detect_device(choice: str) -> tuple[str, dict[str, Any]]:
    """The mode ("cuda" or "cpu") --device asks for and this machine allows, and the device's description."""
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
