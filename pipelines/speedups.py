"""Speedups between benchmark rows of one run: against each row's parent, its upload, the input.

The benchmark stage times its targets interleaved (``pipelines.latency.measure_interleaved``),
so rows of one batch size share their rounds; a ratio is claimed only where both rows are
steady, timed at the same shapes, under ``MAX_CREDIBLE_SPEEDUP``, and where the per-round
ratio held over the last three rounds.
"""

from __future__ import annotations

from pipelines.core import BenchmarkRow, PipelineContext
from pipelines.latency import AGREEING_WINDOWS, MAX_CREDIBLE_SPEEDUP, p50_spread

__all__ = ["BASELINE", "speedups_of"]

# The key of the pipeline's input artifact: the baseline every ``speedup`` is relative to.
BASELINE = "input"


def _same_work(a: BenchmarkRow, b: BenchmarkRow) -> bool:
    """Timed on inputs of the same shapes (names may differ between formats)."""
    return sorted(map(tuple, a.shapes.values())) == sorted(map(tuple, b.shapes.values()))


def speedups_of(
    rows: list[BenchmarkRow], ctx: PipelineContext, agreement: float = 0.10
) -> tuple[dict[str, float], list[str]]:
    """Each row against its parent, its upload and the job's input, rows of this run only.

    A ratio is the reference's p50 over the row's, given only when both rows are steady and
    timed on inputs of the same shapes; one above ``MAX_CREDIBLE_SPEEDUP``, or whose per-round
    ratio moved more than ``agreement`` over the last three rounds, is left out and named in the
    second list (unsteady: a measurement not to repeat, not a model's speed).
    """
    by_key = {(r.artifact, r.batch_size): r for r in rows}
    metrics: dict[str, float] = {}
    suspicious: list[str] = []
    for row in rows:
        artifact = ctx.artifacts.get(row.artifact) or ctx.ancestors.get(row.artifact)
        lineage = ctx.lineage(artifact) if artifact is not None else []
        references = {
            "speedup_vs_parent": lineage[0].key if lineage else None,
            "speedup_vs_upload": lineage[-1].key if lineage else None,
            "speedup": BASELINE if row.artifact != BASELINE else None,
        }
        for name, ref in references.items():
            base = by_key.get((ref, row.batch_size)) if ref else None
            if base is None or row.p50_ms <= 0 or not (row.converged and base.converged):
                continue
            if not _same_work(row, base):
                continue
            ratio = base.p50_ms / row.p50_ms
            paired = _paired_spread(base, row)
            if ratio > MAX_CREDIBLE_SPEEDUP or paired > agreement:
                why = (
                    f"{ratio:.0f}x"
                    if ratio > MAX_CREDIBLE_SPEEDUP
                    else (f"{ratio:.2f}x, its ratio moved {paired:.0%} between rounds")
                )
                said = f"{row.artifact} vs {ref} at batch {row.batch_size} ({why})"
                if said not in suspicious:
                    suspicious.append(said)
                continue
            metrics[f"{name}.{row.artifact}.b{row.batch_size}"] = ratio
    return metrics, suspicious


def _paired_spread(base: BenchmarkRow, row: BenchmarkRow) -> float:
    """How much the speedup moved across the last three rounds both rows were timed in.

    Each row being steady is not enough on a crowded machine: a neighbour that comes and goes
    can slow one round of every target alike (the ratio holds) or only some targets (it does
    not). Windows of one round ran back to back, so the ratio per round is the paired measure;
    0.0 when the rows carry no windows to pair (contexts saved before they were recorded).
    """
    a, b = base.window_p50_ms, row.window_p50_ms
    if len(a) != len(b) or len(a) < AGREEING_WINDOWS:
        return 0.0
    last = zip(a[-AGREEING_WINDOWS:], b[-AGREEING_WINDOWS:], strict=True)
    ratios = [x / y for x, y in last if y > 0]
    return p50_spread(ratios) if len(ratios) == AGREEING_WINDOWS else float("inf")
