"""Command line: ``python -m pipelines run MODEL --format onnx --workdir DIR [--stages JSON]``.

Runs a pipeline on a local file with no server, shows a progress bar, and prints the stage
results, the artifacts made, the benchmark rows and any certification's checks.
``python -m pipelines profiles`` lists the hardware profiles this machine offers (the keys a
certify stage names).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.core import (
    Artifact,
    DatasetRef,
    ModelFormat,
    PipelineContext,
    PipelineError,
    StageConfigError,
)


def _json_arg(value: str | None, what: str) -> Any:
    """Parse a JSON argument, or the JSON in a file when it starts with ``@``."""
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageConfigError(f"{what} is not valid JSON: {exc}") from exc


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _size(artifact: Artifact) -> str:
    path = Path(artifact.path)
    if not path.exists():
        return "missing"
    from pipelines.onnx_io import human_bytes, model_size_bytes

    return human_bytes(model_size_bytes(path))


def render_report(ctx: PipelineContext) -> str:
    """The results, artifacts and benchmark tables of a context, as text."""
    parts = [
        format_table(
            ["stage", "status", "seconds", "message"],
            [
                (r.stage_id, r.status.value, f"{r.seconds:.2f}", r.message)
                for r in ctx.results.values()
            ],
        ),
        "",
        format_table(
            ["artifact", "format", "precision", "backend", "parent", "size", "path"],
            [
                (a.key, a.format, a.precision, a.backend or "-", a.parent or "-", _size(a), a.path)
                for a in ctx.artifacts.values()
            ],
        ),
    ]
    if ctx.benchmarks:
        parts += [
            "",
            format_table(
                ["artifact", "backend", "batch", "p50 ms", "p95 ms", "p99 ms", "samples/s"],
                [
                    (
                        b.artifact,
                        b.backend,
                        b.batch_size,
                        f"{b.p50_ms:.3f}",
                        f"{b.p95_ms:.3f}",
                        f"{b.p99_ms:.3f}",
                        f"{b.throughput:.1f}",
                    )
                    for b in ctx.benchmarks
                ],
            ),
        ]
    for result in ctx.results.values():
        report = result.details if result.name == "certify" else {}
        if report.get("checks"):
            parts += ["", f"certification ({report['level']}): {report['verdict'].upper()}"]
            parts.append(
                format_table(
                    ["check", "verdict", "summary"],
                    [(c["id"], c["verdict"], c["summary"]) for c in report["checks"]],
                )
            )
    return "\n".join(parts)


def _print_profiles() -> int:
    from pipelines.certification.profiles import detect_profiles

    rows = [(p.key, p.backend_version, p.device_kind, p.label) for p in detect_profiles()]
    print(format_table(["profile", "version", "device", "description"], rows))
    return 0


def _dataset_arg(text: str) -> tuple[str, DatasetRef]:
    """``ID=PATH[:TARGET]`` as the id and a DatasetRef (format from the file's extension)."""
    key, sep, rest = text.partition("=")
    if not sep or not key or not rest:
        raise SystemExit(f"--dataset {text!r}: expected ID=PATH[:TARGET], e.g. 1=digits.csv:label")
    path, _, target = rest.partition(":")
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in ("csv", "jsonl", "npz"):
        raise SystemExit(f"--dataset {text!r}: the file must end in .csv, .jsonl or .npz")
    resolved = str(Path(path).resolve())
    return key, DatasetRef(id=key, path=resolved, format=fmt, target=target or None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a stage failed, 2 a bad pipeline)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a pipeline on a local model file")
    run.add_argument(
        "model", help="model file (.onnx, TorchScript .pt, .gguf) or a language model folder"
    )
    run.add_argument("--format", required=True, choices=[f.value for f in ModelFormat])
    run.add_argument("--workdir", required=True, help="where stage outputs go; reused to resume")
    run.add_argument(
        "--stages",
        help='pipeline as JSON, or @file.json: [{"name": "quantize", "settings": {}}, ...]; '
        "default: the default pipeline for the format",
    )
    run.add_argument(
        "--inputs",
        help='input specs as JSON, or @file.json: [{"name": "x", "shape": ["batch", 64], '
        '"dtype": "float32"}]; read from the file for ONNX',
    )
    run.add_argument("--precision", default="fp32", help="precision of the model file")
    run.add_argument(
        "--task",
        default="other",
        choices=["classification", "regression", "embedding", "text-generation", "other"],
        help="the model's task: picks the metric of evaluate, finetune and quantize retention",
    )
    run.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="ID=PATH[:TARGET]",
        help="a dataset the stages name by id (repeatable), e.g. 1=digits.csv:label",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    commands.add_parser("profiles", help="list the hardware profiles this machine offers")
    args = parser.parse_args(argv)
    if args.command == "profiles":
        return _print_profiles()

    from pipelines.pipeline import run_local

    try:
        ctx = run_local(
            args.model,
            args.format,
            _json_arg(args.inputs, "--inputs"),
            _json_arg(args.stages, "--stages"),
            args.workdir,
            precision=args.precision,
            show_progress=not args.no_progress,
            task=args.task,
            datasets=dict(_dataset_arg(item) for item in args.dataset),
        )
    except StageConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"stage failed: {exc}", file=sys.stderr)
        failed = PipelineContext.load(Path(args.workdir))
        if failed is not None:
            print(render_report(failed))
        return 1
    print(render_report(ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
