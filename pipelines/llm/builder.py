"""Making a checkpoint smaller: ONNX Runtime GenAI's model builder, and bf16/fp16 checkpoints.

Weight-only INT8 and INT4 go through ``python -m onnxruntime_genai.models.builder`` run as a
subprocess (it imports torch and transformers and holds the whole model: a crash or a leak stays
in that process, and a timeout can kill it): every MatMul's weights become MatMulNBits blocks of
``block_size`` values with one scale each, activations stay float32 on the CPU. Its options, read
from the installed builder's ``--extra_options`` help:

* ``algo_config``: ``rtn`` (round to nearest) or ``k_quant`` (llama.cpp's k-quant search of each
  block's scale);
* ``accuracy_level``: what MatMulNBits computes in on the CPU (4: int8 activations, the fastest
  and the builder's CPU default; 1: fp32);
* the embeddings: the builder quantizes them only where the model ties them to its LM head and
  both become one shared int4 matrix (GatherBlockQuantized); ``keep_embeddings`` (and
  ``keep_lm_head``) pass ``shared_embeddings=false`` so the lookup stays a float Gather;
* the LM head: ``keep_lm_head`` keeps it one step above the body: int8 under int4
  (``matmul_mixed_precision=last_matmul:int8``), float under int8
  (``nodes_to_exclude=/lm_head/MatMul``). It is the largest matrix of a small model and the one
  every token's distribution comes out of.
* measured mixed precision: ``int8_nodes`` names the MatMuls to keep int8 under int4; they go
  in the builder's structured configuration (``--builder_config_version 2 --target_options``,
  ``quant_config.weights.overrides``, which refuses a name the graph does not have), with
  ``fuse_qkv=false`` so q, k and v are separate MatMuls.

The builder reads the checkpoint with ``HF_HUB_OFFLINE=1`` and ``hf_remote=false`` (no remote
code), writes only into the output and cache folders it is given, and its output is streamed
into progress lines; a failure raises a PipelineError with the last lines it printed. ``-p int8``
prints an error line about Gather and still succeeds: the exit status decides, not the log.

bf16 and fp16 stay checkpoints: loaded in that dtype and written with ``save_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import PipelineError

__all__ = [
    "BuildReport",
    "BuildSettings",
    "build_ort_genai",
    "builder_arguments",
    "builder_problem",
    "convert_checkpoint",
    "folder_bytes",
    "run_streamed",
    "structured_arguments",
    "supported_architectures",
]

# The builder, through a child module that fixes how it reads transformers 5 configs.
BUILDER_MODULE = "pipelines.llm.builder_child"
LOG_TAIL = 25
# Weight files a float conversion rewrites; every other file of the checkpoint is copied as is.
_WEIGHT_FILES = re.compile(r".*\.safetensors$|.*\.safetensors\.index\.json$")
_REWRITTEN = {"config.json", "generation_config.json"}


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is asked for (see the module docstring)."""

    precision: str  # int4 | int8 | fp32 (fp32: no quantization, a reference build)
    block_size: int = 32
    method: str = "rtn"  # rtn | k_quant
    accuracy_level: int = 4
    keep_embeddings: bool = True
    keep_lm_head: bool = True
    sensitive_layers: str = "int4"  # int4: llama.cpp's sensitive MatMuls in this type (int8)
    symmetric: bool = True  # False: a zero point per block (asymmetric)
    # int4: these MatMul nodes in int8, chosen by measurement (pipelines.llm.sensitivity); they
    # replace llama.cpp's list, and q/k/v are built as separate MatMuls so each has its width.
    int8_nodes: tuple[str, ...] = ()


@dataclass
class BuildReport:
    """How a build went: its options, how long it took and the last lines it printed."""

    seconds: float
    extra_options: list[str]
    log_tail: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def supported_architectures() -> frozenset[str]:
    """The ``architectures`` the installed builder converts, read from its source (importing it
    would import torch)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or spec.origin is None:
        return frozenset()
    source = Path(spec.origin).parent / "models" / "builder.py"
    try:
        text = source.read_text()
    except OSError:
        return frozenset()
    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', text))


def _config(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read the checkpoint's config.json: {exc}") from exc


def builder_problem(checkpoint: Path) -> str | None:
    """Why the builder cannot convert this checkpoint (None: it can)."""
    supported = supported_architectures()
    if not supported:
        return "onnxruntime-genai is not installed on this worker"
    architectures = _config(checkpoint).get("architectures") or ["(none stated)"]
    if architectures[0] not in supported:
        return (
            f"ONNX Runtime GenAI's model builder does not convert {architectures[0]} models "
            f"(it converts {', '.join(sorted(supported))})"
        )
    return None


def builder_arguments(
    settings: BuildSettings, tied_embeddings: bool
) -> tuple[list[str], list[str]]:
    """The ``--extra_options`` KEY=VALUE pairs for ``settings``, and notes on what the builder
    cannot do as asked (said in the stage message)."""
    options = ["hf_token=false", "hf_remote=false"]
    notes: list[str] = []
    if settings.precision not in ("int4", "int8"):
        return options, notes
    options += [
        f"block_size={settings.block_size}",
        f"accuracy_level={settings.accuracy_level}",
        f"algo_config={settings.method}",
    ]
    if not settings.symmetric:
        options.append("is_symmetric=false")
    # The builder quantizes an embedding only as the int4 matrix a tied LM head shares with it
    # (GatherBlockQuantized); any other embedding stays a float Gather.
    share = (
        tied_embeddings
        and settings.precision == "int4"
        and not settings.keep_embeddings
        and not settings.keep_lm_head
    )
    if tied_embeddings and not share:
        options.append("shared_embeddings=false")
    if not settings.keep_embeddings and not share:
        notes.append(
            "embeddings kept float: ONNX Runtime GenAI quantizes embeddings only as the int4 "
            "matrix they share with a tied LM head that is quantized too"
        )
    mixed = []
    if settings.keep_lm_head:
        if settings.precision == "int4":
            mixed.append("last_matmul:int8")
        else:
            options.append("nodes_to_exclude=/lm_head/MatMul")
    if settings.precision == "int4" and settings.int8_nodes:
        options.append("fuse_qkv=false")  # the LM head goes in the structured overrides too
        return options, notes
    if settings.precision == "int4" and settings.sensitive_layers == "int8":
        mixed.append("mixed_layers:int8")
    if mixed:
        options.append("matmul_mixed_precision=" + ",".join(mixed))
    return options, notes


def structured_arguments(settings: BuildSettings) -> list[str]:
    """The builder's structured-configuration arguments: per-node int8 overrides for a measured
    int4 build (the LM head among them when it is kept), none otherwise."""
    if settings.precision != "int4" or not settings.int8_nodes:
        return []
    nodes = list(settings.int8_nodes)
    if settings.keep_lm_head and "/lm_head/MatMul" not in nodes:
        nodes.append("/lm_head/MatMul")
    overrides = [{"match": {"name": node}, "type": "int8"} for node in nodes]
    target = {"quant_config": {"weights": {"overrides": overrides}}}
    return ["--builder_config_version", "2", "--target_options", json.dumps(target)]


class _Progress:
    """Turns the builder's lines into progress: reading layers, quantizing MatMuls, saving."""

    def __init__(self, layers: int, progress: Callable[[float, str], None]) -> None:
        self.layers = max(layers, 1)
        # MatMuls a decoder layer has at most (q, k, v, o, gate, up, down), and the LM head.
        self.matmuls = self.layers * 7 + 1
        self.quantized = 0
        self.progress = progress
        self.fraction = 0.0
        self.shown = 0.0

    def line(self, text: str) -> None:
        found = re.match(r"Reading layer (\d+)", text)
        fraction, message = self.fraction, ""
        if found:
            fraction = 0.3 * (int(found.group(1)) + 1) / self.layers
            message = text
        elif "complete quantization of" in text:
            self.quantized += 1
            fraction = 0.3 + 0.55 * min(1.0, self.quantized / self.matmuls)
            message = f"quantized {self.quantized} MatMuls"
        elif text.startswith(("Saving ONNX model", "Saving GenAI config", "Saving processing")):
            fraction, message = max(fraction, 0.9), text.split(" in ", 1)[0]
        self.fraction = max(self.fraction, fraction)
        now = time.monotonic()
        if message and now - self.shown >= 1.0:
            self.shown = now
            self.progress(self.fraction, f"model builder: {message}")


def _reader(stream: object, lines: queue.Queue[str | None]) -> None:
    """Put every line (split on \\n and tqdm's \\r) of ``stream`` on ``lines``; None at the end."""
    buffer = b""
    fd = stream.fileno()  # type: ignore[attr-defined]
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        parts = re.split(rb"[\r\n]", buffer)
        buffer = parts.pop()
        for part in parts:
            if part.strip():
                lines.put(part.decode("utf-8", "replace").rstrip())
    if buffer.strip():
        lines.put(buffer.decode("utf-8", "replace").rstrip())
    lines.put(None)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
    process.wait()


def build_ort_genai(
    checkpoint: Path,
    out: Path,
    cache: Path,
    settings: BuildSettings,
    progress: Callable[[float, str], None],
    *,
    timeout_s: float = 3600.0,
    threads: int | None = None,
) -> BuildReport:
    """Build an ONNX Runtime GenAI folder for the CPU from ``checkpoint`` into ``out``.

    ``out`` and ``cache`` must be the caller's own folders (a stage's scratch folder); nothing is
    written beside the checkpoint. ``progress(fraction, message)`` sees the builder's phases; if
    it raises (a cancelled job) the builder is killed. PipelineError with the builder's last
    lines when it fails or runs past ``timeout_s``.
    """
    checkpoint, out, cache = Path(checkpoint), Path(out), Path(cache)
    problem = builder_problem(checkpoint)
    if problem is not None:
        raise PipelineError(problem)
    config = _config(checkpoint)
    options, notes = builder_arguments(settings, bool(config.get("tie_word_embeddings", True)))
    command = [
        sys.executable, "-m", BUILDER_MODULE,
        "-i", str(checkpoint), "-o", str(out), "-p", settings.precision, "-e", "cpu",
        "-c", str(cache), *structured_arguments(settings), "--extra_options", *options,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    progress(0.0, f"model builder: {settings.precision} for the CPU")
    phases = _Progress(int(config.get("num_hidden_layers") or 1), progress)
    tail = run_streamed(command, env, phases.line, timeout_s)
    for name in ("genai_config.json", "model.onnx"):
        if not (out / name).is_file():
            raise PipelineError(f"the model builder finished but wrote no {name}: {_tail(tail)}")
    progress(1.0, "model builder: done")
    return BuildReport(round(time.monotonic() - started, 2), options, tail, notes)


def run_streamed(
    command: list[str], env: dict[str, str], on_line: Callable[[str], None], timeout_s: float
) -> list[str]:
    """Run ``command`` in its own process group, each output line to ``on_line``; its last
    lines. PipelineError with them when it exits non-zero or runs past ``timeout_s`` (then it
    is killed, as it is when ``on_line`` raises)."""
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        while True:
            if time.monotonic() - started > timeout_s:
                _kill(process)
                raise PipelineError(
                    f"the model builder ran longer than {timeout_s:g} s and was stopped; "
                    f"its last lines: {_tail(tail)}"
                )
            try:
                text = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if text is None:
                break
            tail.append(text)
            on_line(text)
        code = process.wait()
    finally:
        _kill(process)
        reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
    if code != 0:
        raise PipelineError(
            f"the model builder failed (exit status {code}); its last lines: {_tail(tail)}"
        )
    return list(tail)


def _tail(tail: Iterable[str], lines: int = 8) -> str:
    """The last lines that say something (not progress bars), joined for a message."""
    every = list(tail)
    said = [t for t in every if "it/s]" not in t and "%|" not in t]
    return " | ".join((said or every)[-lines:]) or "(it printed nothing)"


def convert_checkpoint(source: Path, out: Path, precision: str, threads: int | None = None) -> None:
    """``source``'s weights written in ``precision`` (fp16 or bf16) as a checkpoint in ``out``,
    with its other files (tokenizer, chat template) copied unchanged."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise PipelineError(f"a checkpoint is converted to fp16 or bf16, not {precision}")
    if threads:
        torch.set_num_threads(threads)
    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=True, trust_remote_code=False, dtype=dtypes[precision]
    )
    model.save_pretrained(out)
    del model
    for item in sorted(source.rglob("*")):
        name = item.relative_to(source)
        if not item.is_file() or item.is_symlink() or _WEIGHT_FILES.match(item.name):
            continue
        if str(name) in _REWRITTEN or (out / name).exists():
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, out / name)


def folder_bytes(folder: Path) -> int:
    """Bytes of every regular file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
