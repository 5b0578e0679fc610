"""The models a serving process holds, kept in step with its ``ModelSource`` by a poller thread.

Every ``poll_seconds`` the poller reads the source. A model whose revision (the deployment's
generation), version or pool settings changed is loaded in the poller thread, beside the one
serving (a model whose upload declared no outputs is run once on random inputs to see them), then
swapped in on the event loop in one step: requests that arrive after it go to the new engine,
those already queued finish on the old one, which is then drained and released. No request is
refused during a swap.

A language model (a text format, ``pipelines.llm``) is served by a
:class:`~pipelines.llm.serving_engine.ServingEngine` instead of an engine and a batcher: its
requests are decoded together by the engine itself. On a swap its streams in flight finish on the
engine they started on, which is closed once they have all ended. An engine whose decoding loop
died (an error in a step: a NaN the sampler rejects) is loaded again by the poller.

A model that fails to load (a missing or altered file, one its runtime cannot read) is not
ready: its endpoints answer 503 with the reason, and the failure is counted. The others are not
touched. When a new version fails to load, the version already serving keeps serving; the
failure is logged and counted, and the same revision is not tried again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from pipelines.core import Artifact, ModelFormat, PipelineError, TensorSpec
from pipelines.engines import Engine, load_engine
from pipelines.llm.kinds import is_text_format
from pipelines.llm.serving_engine import ServingEngine
from pipelines.llm.serving_engines import open_serving_engine
from pipelines.onnx_io import first_error_line, random_inputs, read_tensor_specs
from r1platform.core.storage import sha256_file
from r1platform.serving.batcher import DynamicBatcher
from r1platform.serving.engine_deployments import EngineDeployment
from r1platform.serving.engine_servers import BUILTIN, EngineSettings
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.protocol import PLATFORMS, tensor_metadata
from r1platform.serving.source import ModelSource, ModelSpec
from r1platform.serving.stats import ServingStats

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model of the pool: loaded and batching (a tensor model's engine and batcher, or a
    language model's ``text`` engine), or not ready with the reason."""

    spec: ModelSpec
    engine: Engine | None = None
    batcher: DynamicBatcher | None = None
    text: ServingEngine | None = None
    upstream: EngineDeployment | None = None  # engine servers this process proxies to
    owns_upstream: bool = True  # False: an adapter served by its base's engine servers
    error: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        if self.upstream is not None:
            return self.upstream.ready  # read live: replicas start, fail and restart
        return self.batcher is not None or self.text is not None

    @property
    def reason(self) -> str:
        """Why it is not ready ("" when it is)."""
        if self.upstream is not None and not self.error:
            return self.upstream.reason
        return self.error

    @property
    def is_text(self) -> bool:
        return is_text_format(self.spec.artifact.format)

    @property
    def batchable(self) -> bool:
        return batchable(self.inputs, self.outputs)

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def metadata(self) -> dict[str, object]:
        return {
            "name": self.spec.name,
            "versions": [str(self.spec.version)],
            "platform": PLATFORMS.get(self.spec.artifact.format, self.spec.artifact.format),
            "inputs": [tensor_metadata(spec) for spec in self.inputs],
            "outputs": [tensor_metadata(spec) for spec in self.outputs],
        }


def batchable(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool:
    """Whether requests may be stacked along dim 0: every input and output starts with the same
    named (dynamic) dim. Rows must also not see one another inside the model, which a file does
    not tell: as with Triton's ``max_batch_size``, that is the model's contract."""
    firsts = {t.shape[0] if t.shape else None for t in [*inputs, *outputs]}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def tensor_specs(artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A model's inputs and outputs: read from the file for ONNX, as registered otherwise."""
    if artifact.format == ModelFormat.ONNX.value:
        return read_tensor_specs(artifact.path)
    return list(artifact.inputs), list(artifact.outputs)


def batch_range(engine_range: tuple[int, int] | None, max_batch_size: int) -> tuple[int, int]:
    """The batch sizes served: the engine's own (a fixed batch stays fixed) within the pool's."""
    low, high = engine_range or (1, max_batch_size)
    if low == high:
        return low, high
    return low, max(low, min(high, max_batch_size))


def check_file(spec: ModelSpec) -> Path:
    """The model's file, or PipelineError when it is missing or not the one registered."""
    path = Path(spec.artifact.path)
    if not path.is_file() and not (is_text_format(spec.artifact.format) and path.is_dir()):
        raise PipelineError(f"its file {path} is missing")
    # An archive version (ONNX with external data, a model folder) runs unpacked; its sha256 is
    # the archive's.
    stored = Path(spec.artifact.meta.get("stored_file") or path)
    if spec.sha256 and not stored.is_file():
        raise PipelineError(f"its stored file {stored} is missing")
    if spec.sha256 and sha256_file(stored)[0] != spec.sha256:
        raise PipelineError(
            f"its file {path.name} no longer matches the sha256 it was registered with; "
            "it is not used"
        )
    return path


def observed_outputs(engine: Engine) -> list[TensorSpec]:
    """Outputs an upload did not declare (TorchScript), seen by running the engine on random
    inputs at its two smallest batch sizes: a dim that follows the batch is the batch dim."""
    assert engine.batch_range is not None
    low, high = engine.batch_range
    try:
        runs = [
            engine.run(random_inputs(engine.inputs, n)) for n in sorted({low, min(low + 1, high)})
        ]
    except PipelineError as exc:
        raise PipelineError(f"its outputs are not declared and a trial run failed: {exc}") from exc
    first = engine.inputs[0].shape[0] if engine.inputs and engine.inputs[0].shape else "batch"
    specs = []
    for name, array in runs[0].items():
        sizes = zip(*(run[name].shape for run in runs), strict=True)
        shape: list[int | str] = [d[0] if len(set(d)) == 1 else str(first) for d in sizes]
        specs.append(TensorSpec(name=name, shape=shape, dtype=array.dtype.name))
    return specs


def load_model(spec: ModelSpec) -> ServedModel:
    """The model's engine, loaded and described; PipelineError when it cannot serve.

    A file whose sha256 is not the registered one is never loaded. The engine's batch range is
    narrowed to the pool's ``max_batch_size`` (a dynamic batch dim has none of its own).
    """
    check_file(spec)
    if is_text_format(spec.artifact.format):
        text = open_serving_engine(
            spec.artifact,
            max_requests=spec.max_batch_size,
            kv_cache_tokens=settings.R1_LLM_KV_CACHE_TOKENS,
            gather_s=spec.max_queue_delay_ms / 1000,
            base=spec.base,
        )
        return ServedModel(spec=spec, text=text)
    engine = load_engine(spec.artifact, spec.device, spec.cache_root)
    engine.batch_range = batch_range(engine.batch_range, spec.max_batch_size)
    inputs, outputs = tensor_specs(spec.artifact)
    if not outputs:
        outputs = observed_outputs(engine)
    served = ServedModel(spec=spec, engine=engine, inputs=inputs, outputs=outputs)
    served.metadata()  # a dtype the protocol cannot carry fails the load, not every request
    return served


# A language model's engine that failed is loaded again at most this often.
ENGINE_RESTART_SECONDS = 10.0
# How long a new version's engine servers may take to answer before a swap gives up on them.
ENGINE_START_SECONDS = 900.0


class ModelRuntime:
    """What the HTTP app asks: which models serve, and in which state (tokens: ``tokens``)."""

    def __init__(
        self,
        source: ModelSource,
        metrics: ServingMetrics,
        *,
        batching: bool = True,
        poll_seconds: float = 1.0,
        stats: ServingStats | None = None,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.stats = stats or ServingStats()
        self.batching = batching
        self.poll_seconds = poll_seconds
        # Read by the event loop, replaced whole by the loop.
        self._models: dict[tuple[int, str], ServedModel] = {}
        self._attempted: dict[tuple[int, str], tuple[object, ...]] = {}
        self._restarted: dict[tuple[int, str], float] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self.synced = threading.Event()  # set once the first poll has loaded what it could
        self._thread: threading.Thread | None = None

    # -- what the event loop reads -----------------------------------------------------------------

    def lookup(self, team_id: int, name: str) -> ServedModel | None:
        return self._models.get((team_id, name))

    def served(self) -> list[ServedModel]:
        """Every model of the pool, ready or not."""
        return list(self._models.values())

    def ready_specs(self) -> list[ModelSpec]:
        """The models answering now (read from the stats thread: the dict is replaced whole)."""
        return [m.spec for m in self._models.values() if m.ready]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._poll, name="serving poller", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop polling, then drain every model (queued requests are answered first)."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(self._retire(m) for m in models), *self._retiring)

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.sync()
                    self.synced.set()
                except Exception:
                    log.exception("serving: cannot read the models to serve; keeping those loaded")
                self._stop.wait(self.poll_seconds)
        finally:
            self.source.close()

    # -- the poller thread -------------------------------------------------------------------------

    def sync(self) -> None:
        """Load what changed, drop what is gone. Poller thread only."""
        specs = {spec.key: spec for spec in self.source.models()}
        for key, spec in specs.items():
            if self._stop.is_set():
                return
            if self._attempted.get(key) == spec.loaded_as:
                continue
            self._attempted[key] = spec.loaded_as
            self._on_loop(self._install(self._load(spec)))
        for key in set(self._models) - set(specs):
            self._attempted.pop(key, None)
            self._on_loop(self._remove(key))
        self._restart_failed_engines(specs)
        self._reattach_adapters()

    def _restart_failed_engines(self, specs: dict[tuple[int, str], ModelSpec]) -> None:
        """A language model whose engine's loop died (an error in a decoding step) is loaded
        again, at most once per ``ENGINE_RESTART_SECONDS``; its requests meanwhile fail fast."""
        now = time.monotonic()
        for key, served in list(self._models.items()):
            failure = served.text.failure if served.text is not None else None
            if failure is None or key not in specs or self._stop.is_set():
                continue
            if now - self._restarted.get(key, -ENGINE_RESTART_SECONDS) < ENGINE_RESTART_SECONDS:
                continue
            self._restarted[key] = now
            label = served.spec.label
            log.error("serving: %s: engine failed (%s); loading it again", label, failure)
            self.metrics.load_failures.labels(served.spec.label).inc()
            self._on_loop(self._install(self._load(specs[key])))

    def _load(self, spec: ModelSpec) -> ServedModel:
        log.info("serving: loading %s v%s (revision %s)", spec.label, spec.version, spec.revision)
        try:
            if is_text_format(spec.artifact.format) and spec.text_engine != BUILTIN:
                return self._start_engine_servers(spec)
            return load_model(spec)
        except Exception as exc:
            reason = f"version {spec.version} did not load: {first_error_line(exc)}"
            log.error("serving: %s %s", spec.label, reason)
            self.metrics.load_failures.labels(spec.label).inc()
            return ServedModel(spec=spec, error=reason)

    def _start_engine_servers(self, spec: ModelSpec) -> ServedModel:
        """A language model on a vLLM / TensorRT-LLM pool: its engine servers, started. Over a
        version that serves now, the new one is swapped in only once a replica answers (one
        that never does leaves the old serving, as a failed load does)."""
        if spec.artifact.format == ModelFormat.LORA_ADAPTER.value:
            return self._adapter_on_base(spec)
        settings_ = EngineSettings.for_pool(
            spec.text_engine, spec.engine_replicas, spec.max_batch_size
        )
        deployment = EngineDeployment.for_spec(spec, settings_, self.metrics, self.stats)
        deployment.start()
        current = self._models.get(spec.key)
        serving = current is not None and current.ready
        if serving and not deployment.wait_ready(ENGINE_START_SECONDS):
            reason = deployment.reason
            self._on_loop(deployment.close())
            raise PipelineError(f"its engine servers did not become ready: {reason}")
        return ServedModel(spec=spec, upstream=deployment)

    def _adapter_on_base(self, spec: ModelSpec) -> ServedModel:
        """A LoRA adapter on an engine-server pool is loaded into its base's servers (vLLM's
        multi-LoRA: no second copy of the base); requests name the adapter as the model."""
        base = next(
            (
                m
                for m in self._models.values()
                if m.upstream is not None
                and m.owns_upstream
                and spec.base is not None
                and m.spec.team_id == spec.team_id
                and Path(m.spec.artifact.path) == Path(spec.base.path)
            ),
            None,
        )
        if base is None or base.upstream is None:
            raise PipelineError(
                f"on a {spec.text_engine} pool a LoRA adapter is served by its base's engine "
                "servers: promote the checkpoint it was trained on to this pool first"
            )
        if not base.upstream.add_adapter(spec.name, spec.artifact.path):
            raise PipelineError(
                f"{base.spec.label}'s {spec.text_engine} servers cannot load the adapter without "
                "a restart (LoRA off, a higher rank, or TensorRT-LLM): promote the base again"
            )
        return ServedModel(spec=spec, upstream=base.upstream, owns_upstream=False)

    def _reattach_adapters(self) -> None:
        """An adapter on an engine-server pool is loaded again on the next poll when its base's
        servers were replaced (a promotion of the base), or when it waited for a base that now
        serves (the two were loaded in the other order)."""
        owners = [m for m in self._models.values() if m.upstream is not None and m.owns_upstream]
        for key, served in self._models.items():
            spec = served.spec
            if spec.artifact.format != ModelFormat.LORA_ADAPTER.value or spec.base is None:
                continue
            if spec.text_engine == BUILTIN:
                continue
            if served.upstream is not None:
                stale = all(m.upstream is not served.upstream for m in owners)
            else:
                base = Path(spec.base.path)
                stale = any(Path(m.spec.artifact.path) == base for m in owners)
            if stale:
                self._attempted.pop(key, None)

    def _on_loop(self, coroutine: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]

    # -- the event loop ----------------------------------------------------------------------------

    async def _install(self, served: ServedModel) -> None:
        key = served.spec.key
        current = self._models.get(key)
        if not served.ready and served.engine is None and served.upstream is None:
            if current is not None and current.ready:
                current.error = served.error  # the version serving now goes on serving
                return
        elif served.engine is not None:
            spec = served.spec
            assert served.engine.batch_range is not None
            served.batcher = DynamicBatcher(
                served.engine,
                label=spec.label,
                batching=self.batching and spec.max_queue_delay_ms > 0 and served.batchable,
                max_rows=served.engine.batch_range[1],
                max_queue_delay_s=spec.max_queue_delay_ms / 1000,
                metrics=self.metrics,
                on_batch=functools.partial(self.stats.observe_batch, spec),
            )
        self._models = {**self._models, key: served}
        if current is not None:
            self._retire_later(current)
        self._count_ready()
        log.info(
            "serving: %s v%s %s",
            served.spec.label,
            served.spec.version,
            "ready" if served.ready else "NOT READY: " + served.reason,
        )

    async def _remove(self, key: tuple[int, str]) -> None:
        current = self._models.get(key)
        if current is None:
            return
        self._models = {k: m for k, m in self._models.items() if k != key}
        self.metrics.slow_streaks.forget(current.spec.label)
        self._retire_later(current)
        self._count_ready()

    def _retire_later(self, served: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, served: ServedModel) -> None:
        if served.batcher is not None:
            await served.batcher.drain()
        if served.text is not None:
            await served.text.drain()  # streams in flight finish on the version they started on
            await asyncio.to_thread(served.text.close)
        if served.upstream is not None and served.owns_upstream:
            await served.upstream.close()
        # Dropping the last references releases the engine (its session and memory).
        served.batcher, served.engine, served.text = None, None, None

    def _count_ready(self) -> None:
        self.metrics.models_ready.set(sum(m.ready for m in self._models.values()))
