"""The GPU check's `cuda_tests` part: `pytest -m gpu tests`, every test's outcome read from its JUnit XML."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from gpucheck_commands import REPO, CheckFailed, CommandFailed, Commands, Skip, tail


def cuda_tests_part(commands: Commands, device: dict[str, Any]) -> dict[str, Any]:
    if commands.mode != "cuda":
        raise Skip("--device cpu: the GPU is not used" if device["cuda_available"] else
                   "no GPU: torch sees no CUDA device")
    junit = commands.workdir / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           str(REPO / "tests")]
    failure = None
    try:
        commands.run(cmd, "cuda-tests")
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
