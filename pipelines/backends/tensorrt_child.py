"""The builder child process, seen from the parent: its files, command line, environment,
reproduce.sh, and running it with its progress relayed.

A TensorRT build can take the process down (a builder segfault, the CUDA driver aborting on an
out-of-memory tactic), so it runs as ``python -m pipelines.backends.tensorrt_build --config
build.json``. The child writes ``progress <fraction> <message>`` lines on stdout and an
``error: <message>`` line when it fails; the rest is its log, kept in ``build.log``.

Nothing here imports tensorrt; all of it is tested without a GPU.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.core import PipelineError, ProgressFn

ENGINE_FILENAME = "model.engine"
BUILD_CONFIG_FILENAME = "build.json"
ENGINE_META_FILENAME = "engine.json"
REPRODUCE_FILENAME = "reproduce.sh"
BUILD_LOG_FILENAME = "build.log"
BUILD_MODULE = "pipelines.backends.tensorrt_build"
# A build past this is stuck (a big model on a big GPU takes minutes, not hours).
BUILD_TIMEOUT_S = 3 * 3600
# The child writes "progress <fraction> <message>" lines on stdout; the rest is its log.
PROGRESS_PREFIX = "progress "
ERROR_PREFIX = "error: "


def build_config(
    onnx_path: str | Path,
    profiles: Mapping[str, list[list[int]]],
    *,
    fp16: bool,
    int8: bool,
    workspace_mb: int | None,
    version_compatible: bool,
    hardware_compatible: bool,
    timing_cache: str | Path | None,
    verify: bool = True,
) -> dict[str, Any]:
    """The child's build.json: everything the build depends on, and nothing else.

    Relative paths (the engine, engine.json) are relative to the folder build.json is in.
    """
    return {
        "onnx": str(Path(onnx_path).resolve()),
        "engine": ENGINE_FILENAME,
        "meta": ENGINE_META_FILENAME,
        "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
        "fp16": bool(fp16),
        "int8": bool(int8),
        "workspace_mb": workspace_mb,
        "version_compatible": bool(version_compatible),
        "hardware_compatible": bool(hardware_compatible),
        "timing_cache": str(Path(timing_cache).resolve()) if timing_cache else None,
        "verify": bool(verify),
    }


def source_root() -> Path:
    """The folder holding the ``pipelines`` package (what PYTHONPATH needs for ``-m``)."""
    return Path(__file__).resolve().parents[2]


def child_command(config_path: str | Path, python: str | None = None) -> list[str]:
    """The command that builds an engine from ``config_path`` in a child process."""
    return [python or sys.executable, "-m", BUILD_MODULE, "--config", str(config_path)]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the worker's, with this source tree first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    root = str(source_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in parts if p != root]])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def reproduce_script(config: Mapping[str, Any], python: str | None = None) -> str:
    """reproduce.sh: writes the exact build.json and runs the exact child command on it.

    The engine is rebuilt into ``./reproduced`` beside the script (or the folder given as its
    first argument), so running it never overwrites the engine it documents.
    """
    body = json.dumps(config, indent=2, sort_keys=True)
    marker = "R1_BUILD_JSON"
    if marker in body:  # cannot happen with real paths; refuse rather than write a broken script
        raise ValueError("the build config contains the heredoc marker")
    command = " ".join(shlex.quote(part) for part in child_command(BUILD_CONFIG_FILENAME, python))
    root = shlex.quote(str(source_root()))
    return (
        "#!/bin/sh\n"
        "# Rebuild this TensorRT engine exactly as r1platform's compile stage built it.\n"
        "# Usage: sh reproduce.sh [output folder]   (default: ./reproduced beside this script)\n"
        "# Needs tensorrt and a GPU of the same model (see engine.json); the timing cache path\n"
        "# below is read if it exists and updated after the build.\n"
        "set -eu\n"
        'here="$(cd "$(dirname "$0")" && pwd)"\n'
        'out="${1:-$here/reproduced}"\n'
        'mkdir -p "$out"\n'
        'cd "$out"\n'
        f"cat > {BUILD_CONFIG_FILENAME} <<'{marker}'\n"
        f"{body}\n"
        f"{marker}\n"
        f'export PYTHONPATH={root}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f"exec {command}\n"
    )


def parse_child_line(line: str) -> tuple[float, str] | None:
    """(fraction, message) of a child's progress line, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    parts = line[len(PROGRESS_PREFIX) :].strip().split(" ", 1)
    try:
        fraction = float(parts[0])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), (parts[1] if len(parts) > 1 else "")


def run_child(
    command: list[str],
    cwd: Path,
    progress: ProgressFn,
    log_path: Path,
    timeout_s: float = BUILD_TIMEOUT_S,
) -> None:
    """Run the builder child, relay its progress, keep its output in ``log_path``.

    A progress callback that raises (Cancelled) stops the child before the exception goes on.
    """
    process = subprocess.Popen(
        command,
        cwd=str(cwd),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="tensorrt-build-output", daemon=True)
    reader.start()
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        with log_path.open("w") as log:
            while not finished:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"the TensorRT build ran past {timeout_s / 60:.0f} minutes and was stopped"
                    )
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                if line is None:
                    finished = True
                    continue
                log.write(line + "\n")
                log.flush()
                parsed = parse_child_line(line)
                if parsed is not None:
                    fraction, message = parsed
                    progress(0.1 + 0.85 * fraction, message)
                else:
                    tail = (tail + [line])[-20:]
        returncode = process.wait(timeout=60)
    except BaseException:
        _stop(process)
        raise
    if returncode != 0:
        raise PipelineError(child_failure(returncode, tail))


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the child started by run_child: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def child_failure(returncode: int, tail: Sequence[str]) -> str:
    errors = [line[len(ERROR_PREFIX) :] for line in tail if line.startswith(ERROR_PREFIX)]
    if errors:
        return f"TensorRT could not build the engine: {errors[-1]}"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        last = f"; its last output: {tail[-1]}" if tail else ""
        return (
            f"the TensorRT builder crashed ({name}); the worker was not affected. Rebuild with "
            f"reproduce.sh to debug{last}"
        )
    last = "; ".join(tail[-3:]) or "no output"
    return f"the TensorRT builder exited with status {returncode}: {last}"
