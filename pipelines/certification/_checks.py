"""The suite's checks other than parity (``_parity``); each records into a CheckRecord and
returns its one-line summary. See ``suite`` for what each measures."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import pipelines.certification._golden as golden_io
from pipelines.backends import cache_root_for
from pipelines.certification._numerics import abs_error
from pipelines.certification._state import CheckRecord, NotRun, SuiteState
from pipelines.core import PipelineError
from pipelines.engines import Engine, load_engine
from pipelines.latency import BENCHMARK_WINDOWS, peak_rss_mb, reset_peak_rss
from pipelines.onnx_io import first_error_line, random_inputs

CUDA_DETERMINISM_ATOL = 1e-5
SERVING_NOT_RUN = (
    "no serving runtime on this machine: the check runs on platform workers, which serve the "
    "engine with the platform's runtime"
)
# The runtime runs the same engine on the same batch; only float summation order may differ.
SERVING_ATOL = 1e-5
# Metrics where lower is better (errors); every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"mse", "mae", "ref_mse", "ref_mae"})


def check_loads(s: SuiteState, c: CheckRecord) -> str:
    started = time.perf_counter()
    engine = load_engine(s.artifact, s.profile.device_kind, cache_root_for(s.ctx.workdir))
    c.measure("load_seconds", round(time.perf_counter() - started, 4), unit="s")
    c.measure("device", engine.device, s.profile.device_kind, "==")
    if engine.batch_range is None and golden_io.has_batch(engine.inputs):
        engine.batch_range = (s.settings.min_batch, s.settings.max_batch)
    s.engine = engine
    s.batches = _batch_plan(s)
    batch = s.first_batch()
    size = len(next(iter(batch.values())))
    outputs = engine.run(batch)
    declared = [o.name for o in s.artifact.outputs] or engine.output_names
    missing = [name for name in declared if name not in outputs]
    c.measure("outputs", len(outputs), len(declared), ">=")
    c.details["missing_outputs"] = missing
    c.details["output_shapes"] = {name: list(v.shape) for name, v in outputs.items()}
    not_batch_first = [n for n, v in outputs.items() if v.ndim == 0 or v.shape[0] != size]
    c.measure("batch_first", not not_batch_first, True, "==")
    if missing:
        c.problems.append(f"missing output(s) {', '.join(missing)}")
    if not_batch_first:
        c.problems.append(f"output(s) {', '.join(not_batch_first)} not batch-first")
    if engine.device != s.profile.device_kind:
        c.problems.append(f"it runs on {engine.device}, not {s.profile.device_kind}")
    ran = f"loaded on {engine.device} ({engine.backend}) and ran a batch of {size}"
    if c.problems:
        return f"{ran}, but: {'; '.join(c.problems)}"
    return f"{ran}: {len(outputs)} output(s)"


def _batch_plan(s: SuiteState) -> tuple[int, int, int]:
    """(min, opt, max) batch of the engine; opt from the settings, the TensorRT profile, or 8."""
    engine = s.loaded
    low, high = engine.batch_range or (1, 1)
    opt = s.settings.opt_batch
    profiles = golden_io.tensorrt_profiles(s.artifact)
    if opt is None and engine.inputs and engine.inputs[0].name in profiles:
        opt = int(profiles[engine.inputs[0].name][1][0])
    if opt is None:
        opt = min(8, high)
    opt = min(max(opt, low), high)
    s.thresholds.update({"batch_range": [low, high], "opt_batch": opt})
    return low, opt, high


def shape_cases(s: SuiteState) -> tuple[list[int], list[tuple[int, dict[str, int]]]]:
    """The batch sizes covered, and every (batch, named dims) case: each batch size at the
    middle dims, then each other size of each named dim at the opt batch."""
    low, opt, high = s.batches
    batches = sorted({low, (low + opt) // 2, opt, (opt + high) // 2, high})
    cases: list[tuple[int, dict[str, int]]] = [(b, s.dims) for b in batches]
    for name, sizes in s.dim_sizes.items():
        cases += [(opt, {**s.dims, name: size}) for size in sizes if size != s.dims[name]]
    return batches, cases


def check_shapes(s: SuiteState, c: CheckRecord) -> str:
    engine = s.loaded
    low, _, high = s.batches
    batches, cases = shape_cases(s)
    s.thresholds.update({"batches": batches, "dynamic_dims": s.dim_sizes})
    report: list[dict[str, Any]] = []
    for batch, dims in cases:
        feeds = random_inputs(golden_io.batch_first(s.specs), batch, dims, seed=batch)
        case: dict[str, Any] = {"batch": batch, "dims": dims, "ok": True}
        try:
            outputs = engine.run(feeds)
            wrong = {n: list(v.shape) for n, v in outputs.items() if v.ndim == 0 or len(v) != batch}
            if wrong:
                case.update(ok=False, error=f"outputs not batch-first: {wrong}")
        except PipelineError as exc:
            case.update(ok=False, error=first_error_line(exc))
        report.append(case)
    passed = sum(1 for case in report if case["ok"])
    c.measure("shapes_covered", passed, len(report), ">=")
    c.details["cases"] = report
    probes = _refusal_probes(s, high, low)
    c.details["refusals"] = probes
    c.measure("out_of_range_refused", all(p["refused"] for p in probes), True, "==")
    dims_text = "".join(f", {n} {v}" for n, v in s.dim_sizes.items())
    return (
        f"{passed}/{len(report)} shapes ran (batch {', '.join(map(str, batches))}{dims_text}); "
        f"{sum(p['refused'] for p in probes)}/{len(probes)} bad inputs refused"
    )


def _refusal_probes(s: SuiteState, high: int, low: int) -> list[dict[str, Any]]:
    """Inputs the engine must refuse with a PipelineError: outside the batch range, wrong rank."""
    specs = golden_io.batch_first(s.specs)
    probes: list[tuple[str, dict[str, np.ndarray]]] = [
        (f"batch {high + 1}", random_inputs(specs, high + 1, s.dims, default_dim=1))
    ]
    if low > 1:
        probes.append((f"batch {low - 1}", random_inputs(specs, low - 1, s.dims, default_dim=1)))
    wrong_rank = random_inputs(specs, low, s.dims, default_dim=1)
    first = s.specs[0].name
    wrong_rank[first] = wrong_rank[first][..., np.newaxis]
    probes.append((f"input {first!r} with an extra dim", wrong_rank))
    found = []
    for what, feeds in probes:
        try:
            s.loaded.run(feeds)
            found.append({"input": what, "refused": False, "error": "it ran"})
        except PipelineError as exc:
            found.append({"input": what, "refused": True, "error": first_error_line(exc)})
        except Exception as exc:  # refused, but not cleanly: a crash is not a contract
            found.append({"input": what, "refused": False, "error": first_error_line(exc)})
    return found


def _nonfinite(outputs: dict[str, np.ndarray]) -> int:
    return sum(int(v.size - np.count_nonzero(np.isfinite(v))) for v in outputs.values())


def check_finite(s: SuiteState, c: CheckRecord) -> str:
    ranges = golden_io.edge_ranges(s.golden, s.specs, s.settings.input_range)
    s.thresholds["input_range"] = {name: list(r) for name, r in ranges.items()}
    c.details["input_ranges"] = s.thresholds["input_range"]
    bad: list[str] = []
    golden_bad = _nonfinite(s.golden_outputs())
    c.measure("golden.nonfinite_values", golden_bad, 0, "==")
    if golden_bad:
        bad.append(f"golden set ({golden_bad} values)")
    batch = s.batches[1]
    for case in ("low", "high", "zeros"):
        feeds = golden_io.edge_inputs(s.specs, batch, s.dims, ranges, case)
        count = _nonfinite(s.loaded.run(feeds))
        c.measure(f"{case}.nonfinite_values", count, 0, "==")
        if count:
            bad.append(f"{case} inputs ({count} values)")
    if bad:
        return f"NaN or Inf in the outputs for: {', '.join(bad)}"
    return f"finite outputs on {s.golden.rows} golden rows and all-low, all-high, zero inputs"


def check_determinism(s: SuiteState, c: CheckRecord) -> str:
    atol = s.settings.determinism_atol
    if atol is None:
        atol = CUDA_DETERMINISM_ATOL if s.loaded.device == "cuda" else 0.0
    s.thresholds["determinism_atol"] = atol
    batch = s.first_batch()
    first, second = s.loaded.run(batch), s.loaded.run(batch)
    worst = 0.0
    for name, value in first.items():
        diff = abs_error(value, second[name])
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    c.measure("max_abs_difference", worst, atol, "<=")
    size = len(next(iter(batch.values())))
    if worst == 0.0:
        return f"bit-identical over two runs of a batch of {size}"
    return f"two runs of a batch of {size} differ by up to {worst:.3g} (allowed {atol:g})"


def reset_peak_memory(engine: Engine) -> None:
    """Start a new peak: the process's RSS, and torch's CUDA allocator on a CUDA engine."""
    if engine.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def peak_memory(engine: Engine) -> tuple[float, str]:
    """The peak since :func:`reset_peak_memory` in MiB, and what it is."""
    if engine.device != "cuda":
        return peak_rss_mb() or 0.0, "process peak RSS"
    import torch

    if engine.torch_cuda:
        peak = torch.cuda.max_memory_allocated() + engine.extra_gpu_bytes()
        return peak / 2**20, "peak GPU memory"
    # onnxruntime's CUDA provider allocates outside torch: the device's use, an upper bound.
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20, "GPU memory in use"


def check_performance(s: SuiteState, c: CheckRecord) -> str:
    engine, settings = s.loaded, s.settings
    batch = settings.serving_batch or s.batches[1]
    problem = engine.batch_problem(batch)
    if problem is not None:
        raise PipelineError(f"serving_batch {batch} is {problem}")
    feeds = random_inputs(golden_io.batch_first(s.specs), batch, s.dims, default_dim=1, seed=batch)
    reset_peak_memory(engine)
    with engine.context():
        run_once = engine.prepare(feeds)
        run_once()
        # The benchmark stage's default windows, so a certificate's numbers compare with its rows.
        stats = BENCHMARK_WINDOWS.measure(run_once)
    peak, where = peak_memory(engine)
    limit = settings.max_memory_fraction * s.profile.total_memory_mb
    throughput = stats.throughput(batch)
    s.thresholds.update({"serving_batch": batch, "max_memory_mb": round(limit, 1) or None})
    c.measure("p99_ms", round(stats.p99_ms, 4), settings.p99_budget_ms, "<=", "ms")
    c.measure("throughput", round(throughput, 2), settings.min_throughput, ">=", "samples/s")
    if limit > 0:
        c.measure("peak_memory_mb", round(peak, 1), round(limit, 1), "<=", "MiB")
    else:  # the profile does not know its memory: recorded, not judged
        c.measure("peak_memory_mb", round(peak, 1), unit="MiB")
    c.measure("p50_ms", round(stats.p50_ms, 4), unit="ms")
    c.measure("windows", stats.windows)
    c.measure("converged", stats.converged)
    c.details["memory"] = where
    steady = "" if stats.converged else f", not steady after {stats.windows} windows"
    return (
        f"batch {batch}: p99 {stats.p99_ms:.3g} ms (budget {settings.p99_budget_ms:g}), "
        f"{throughput:.4g} samples/s, {where} {peak:.0f} MiB{steady}"
    )


def check_serving(s: SuiteState, c: CheckRecord) -> str:
    from pipelines.certification.serving_probe import registered

    probe = registered()
    if probe is None:
        raise NotRun(SERVING_NOT_RUN)
    feeds = s.first_batch()
    size = len(next(iter(feeds.values())))
    expected = s.loaded.run(feeds)
    result = probe(s.artifact, s.profile.device_kind, feeds)
    c.details["runtime"] = result.runtime
    c.measure("ready", result.ready, True, "==")
    if not result.ready or result.error:
        c.problems.append(result.error or "the runtime did not report the model ready")
        return f"{result.runtime}: {'; '.join(c.problems)}"
    declared_in = [spec.name for spec in s.specs]
    missing_in = [n for n in declared_in if n not in result.metadata_inputs]
    missing_out = [n for n in expected if n not in result.outputs]
    c.measure("metadata_inputs_match", not missing_in, True, "==")
    c.measure("outputs_returned", len(expected) - len(missing_out), len(expected), "==")
    worst = 0.0
    for name, want in expected.items():
        got = result.outputs.get(name)
        if got is None:
            continue
        if got.shape != want.shape:
            c.problems.append(f"output {name} came back {list(got.shape)}, not {list(want.shape)}")
            continue
        worst = max(worst, abs_error(got, want).max(initial=0.0))
    c.measure("max_abs_difference", float(worst), SERVING_ATOL, "<=")
    if missing_in:
        c.problems.append(f"its metadata lacks input(s) {', '.join(missing_in)}")
    if missing_out:
        c.problems.append(f"it did not return output(s) {', '.join(missing_out)}")
    if c.problems:
        return f"{result.runtime}: {'; '.join(c.problems)}"
    return (
        f"{result.runtime} loaded it and answered a batch of {size} with the declared inputs and "
        f"outputs (max difference from the engine {worst:.3g})"
    )
