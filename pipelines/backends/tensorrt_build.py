"""The TensorRT engine builder, run as a child process of the compile stage.

    python -m pipelines.backends.tensorrt_build --config build.json

``build.json`` (written by :func:`pipelines.backends.tensorrt_child.build_config`) says everything
the build depends on; relative paths in it are relative to its folder. The child parses the ONNX
file, builds one optimisation profile, loads and saves the per-device timing cache, writes the
engine and ``engine.json`` (versions, GPU, profile, flags, sha256) atomically, then loads the
engine back and compares it with onnxruntime on the profile's opt shapes.

Protocol with the parent: stdout lines ``progress <fraction> <message>`` report progress, a line
``error: <message>`` says why the build failed (exit status 2); anything else is log. A crash
(the builder segfaulting) only ends this process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.backends.tensorrt_child import ERROR_PREFIX, PROGRESS_PREFIX

HEARTBEAT_S = 10.0


class BuildError(Exception):
    """A build failure with a message for the user."""


def emit(fraction: float, message: str) -> None:
    """A progress line for the parent."""
    print(f"{PROGRESS_PREFIX}{fraction:.3f} {message}", flush=True)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks by hashlib (an engine can be gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """build.json and the folder its relative paths are relative to."""
    config_path = Path(path).resolve()
    config = json.loads(config_path.read_text())
    for key in ("onnx", "engine", "meta", "profiles"):
        if key not in config:
            raise BuildError(f"{config_path.name} has no {key!r}")
    return config, config_path.parent


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


@contextlib.contextmanager
def heartbeat(fraction: float, message: str) -> Iterator[None]:
    """Progress lines every HEARTBEAT_S while a long call (the build) runs, so it can be cancelled
    and its elapsed time shows."""
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            emit(fraction, f"{message} ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


def build(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Build the engine ``config`` describes; return what engine.json records."""
    import tensorrt as trt

    from pipelines.backends.tensorrt_device import device_info

    onnx_path = _resolve(base, config["onnx"])
    engine_path = _resolve(base, config["engine"])
    started = time.perf_counter()
    device = device_info()
    emit(0.02, f"TensorRT {trt.__version__} on {device['gpu']} ({device['compute_capability']})")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    emit(0.05, "parsing the ONNX model")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"the ONNX parser failed: {'; '.join(errors) or 'no detail'}")

    builder_config = builder.create_builder_config()
    if config.get("workspace_mb"):
        builder_config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, int(config["workspace_mb"]) << 20
        )
    if config.get("fp16"):
        builder_config.set_flag(trt.BuilderFlag.FP16)
    if config.get("int8"):
        # Explicit quantization: the Q/DQ nodes say where int8 runs; the flag allows it.
        builder_config.set_flag(trt.BuilderFlag.INT8)
    if config.get("version_compatible"):
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.get("hardware_compatible"):
        builder_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    profiles: dict[str, list[list[int]]] = config["profiles"]
    profile = builder.create_optimization_profile()
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [name for name in network_inputs if name not in profiles]
    if missing:
        raise BuildError(f"no profile shapes for network input(s) {missing}")
    for name in network_inputs:
        low, opt, high = (tuple(int(v) for v in shape) for shape in profiles[name])
        profile.set_shape(name, low, opt, high)
    builder_config.add_optimization_profile(profile)

    cache_info: dict[str, Any] = {"path": config.get("timing_cache"), "loaded_bytes": 0}
    cache_path = Path(config["timing_cache"]) if config.get("timing_cache") else None
    loaded = b""
    if cache_path is not None and cache_path.is_file():
        loaded = cache_path.read_bytes()
    timing_cache = None
    if loaded:
        try:
            timing_cache = builder_config.create_timing_cache(loaded)
        except Exception as exc:  # a cache from a crashed write, or another TensorRT
            print(f"timing cache {cache_path} not usable ({exc}); starting an empty one")
    if timing_cache is None:
        loaded = b""
        timing_cache = builder_config.create_timing_cache(b"")
    builder_config.set_timing_cache(timing_cache, ignore_mismatch=False)
    cache_info["loaded_bytes"] = len(loaded)
    cache_info["reused"] = bool(loaded)

    emit(0.1, "building the engine (timing tactics)")
    with heartbeat(0.5, "building the engine"):
        plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise BuildError(
            "build_serialized_network returned nothing (see build.log: often too little "
            "workspace_mb, or an unsupported layer)"
        )
    data = bytes(memoryview(plan))
    atomic_write(engine_path, data)
    emit(0.8, f"engine written ({len(data) / 1e6:.1f} MB)")

    if cache_path is not None:
        cache = builder_config.get_timing_cache()
        if cache_path.is_file():
            on_disk = cache_path.read_bytes()
            if on_disk != loaded:  # another build saved meanwhile: keep its entries too
                with contextlib.suppress(Exception):
                    cache.combine(builder_config.create_timing_cache(on_disk), False)
        serialized = bytes(memoryview(cache.serialize()))
        atomic_write(cache_path, serialized)
        cache_info["saved_bytes"] = len(serialized)

    return {
        "tensorrt_version": str(trt.__version__),
        **device,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "profiles": profiles,
        "flags": {
            "fp16": bool(config.get("fp16")),
            "int8": bool(config.get("int8")),
            "version_compatible": bool(config.get("version_compatible")),
            "hardware_compatible": bool(config.get("hardware_compatible")),
            "workspace_mb": config.get("workspace_mb"),
        },
        "hardware_compatibility_level": (
            "AMPERE_PLUS" if config.get("hardware_compatible") else "NONE"
        ),
        "timing_cache": cache_info,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def verify(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Run the engine on random inputs of the opt shapes and compare with onnxruntime (CPU)."""
    import numpy as np

    from pipelines.backends.check import cause, run_once
    from pipelines.backends.tensorrt_engine import TensorRTEngine
    from pipelines.core import Artifact, ModelFormat
    from pipelines.engines import load_engine
    from pipelines.onnx_io import random_array, read_tensor_specs

    onnx_path = _resolve(base, config["onnx"])
    onnx_inputs, onnx_outputs = read_tensor_specs(onnx_path)
    specs = {s.name: s for s in onnx_inputs}
    rng = np.random.default_rng(0)
    arrays = {
        name: random_array(shapes[1], specs[name].dtype if name in specs else "float32", rng)
        for name, shapes in config["profiles"].items()
    }
    engine = TensorRTEngine(_resolve(base, config["engine"]))
    got = {name: t.float().cpu().numpy() for name, t in engine(arrays).items()}
    result: dict[str, Any] = {
        "shapes": {name: shapes[1] for name, shapes in config["profiles"].items()},
        "outputs_finite": bool(all(np.isfinite(v).all() for v in got.values())),
    }
    source = Artifact(
        key="the ONNX model",
        path=str(onnx_path),
        format=ModelFormat.ONNX.value,
        precision="",
        inputs=onnx_inputs,
        outputs=onnx_outputs,
    )
    try:  # the reference: the ONNX model on onnxruntime's CPU provider, through the engines
        reference_engine = load_engine(source, "cpu")
        outputs = run_once(reference_engine, arrays)
        reference = dict(zip(reference_engine.output_names, outputs, strict=True))
    except Exception as exc:  # nothing to compare with is not a failed build
        result["skipped"] = f"onnxruntime could not run the model: {cause(exc)}"
        return result
    diffs = [
        float(np.max(np.abs(got[n].astype(np.float64) - np.asarray(reference[n], np.float64))))
        for n in got
        if n in reference and got[n].size
    ]
    result["max_abs_diff"] = max(diffs, default=0.0)
    return result


def run(config_path: str | Path) -> Path:
    """Build (and verify) from a build.json; returns the engine.json path."""
    config, base = load_config(config_path)
    meta = build(config, base)
    if config.get("verify", True):
        emit(0.85, "running the engine and comparing with onnxruntime")
        meta["verify"] = verify(config, base)
    meta_path = _resolve(base, config["meta"])
    atomic_write(meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    emit(1.0, "engine built")
    return meta_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.backends.tensorrt_build",
        description="Build a TensorRT engine from a build.json written by the compile stage.",
    )
    parser.add_argument("--config", required=True, help="path to build.json")
    args = parser.parse_args(argv)
    try:
        run(args.config)
    except BuildError as exc:
        print(f"{ERROR_PREFIX}{exc}", flush=True)
        return 2
    except ImportError as exc:
        print(f"{ERROR_PREFIX}cannot import what the build needs: {exc}", flush=True)
        return 2
    except Exception as exc:  # the traceback goes to build.log, the cause to the user
        traceback.print_exc(file=sys.stdout)
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        print(f"{ERROR_PREFIX}{type(exc).__name__}: {first}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
