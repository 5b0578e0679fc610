"""Dynamic batching for one engine: concurrent requests run as one batch, each gets its rows back.

A request joins the queue already validated (``Engine.validate``), so one bad request never fails
a batch of good ones. The oldest waiting request waits at most ``max_queue_delay`` for others to
fill the batch up to ``max_rows``; the batch then runs once in the engine's own thread (never on
the event loop), and the outputs are cut back into each request's rows. Only requests whose
non-batch dims match share a batch. While a batch runs the next one fills, so under load batches
leave full and at once, as Triton's dynamic batcher does with one model instance.

A batch that fails (an engine error raised by one request's values) is run again request by
request, so only the request that caused it fails.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipelines.core import PipelineError
from pipelines.engines import Engine
from r1platform.serving.metrics import ServingMetrics

Outputs = dict[str, np.ndarray]


@dataclass
class _Waiting:
    arrays: dict[str, np.ndarray]
    rows: int
    # Requests batch together only when every input's non-batch dims and dtype agree.
    alike: tuple[tuple[str, tuple[int, ...], str], ...]
    future: asyncio.Future[Outputs]
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Queues requests for ``engine`` and runs them, batched when ``batching`` is on."""

    def __init__(
        self,
        engine: Engine,
        *,
        label: str,
        batching: bool,
        max_rows: int,
        max_queue_delay_s: float,
        metrics: ServingMetrics,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self._batching = batching and max_rows > 1
        self._max_rows = max_rows
        self._delay = max_queue_delay_s
        self._queue: deque[_Waiting] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine {label}")
        self._batch_size = metrics.batch_size.labels(label)
        self._depth = metrics.queue_depth.labels(label)
        self._on_batch = on_batch  # the serving history's batch count (rows per engine run)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[Outputs]:
        """Queue validated feeds; the future gets this request's outputs or its error."""
        if self._closing:
            raise RuntimeError("this engine is draining and takes no new requests")
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        batched = [a for a in arrays.values() if a.ndim]
        rows = batched[0].shape[0] if batched else 1
        alike = tuple((name, a.shape[1:], a.dtype.str) for name, a in arrays.items())
        self._queue.append(_Waiting(arrays, rows, alike, future))
        self._depth.set(len(self._queue))
        self._arrived.set()
        return future

    async def drain(self) -> None:
        """Finish every queued request, then stop taking any and release the engine's thread."""
        self._closing = True
        self._arrived.set()
        await self._task
        self._executor.shutdown(wait=False)

    # -- the loop ----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or not self._closing:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = [w for w in await self._gather() if not w.future.done()]  # callers gone
            self._depth.set(len(self._queue))
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                results = [exc] * len(batch)
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)

    async def _gather(self) -> list[_Waiting]:
        """The next batch: the oldest request and those alike, once full or its delay is up."""
        first = self._queue[0]
        if not self._batching:
            return [self._queue.popleft()]
        deadline = first.arrived + self._delay
        while not self._closing and self._rows_alike(first) < self._max_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Waiting] = []
        rest: deque[_Waiting] = deque()
        rows = 0
        for waiting in self._queue:
            if waiting.alike == first.alike and rows + waiting.rows <= self._max_rows:
                batch.append(waiting)
                rows += waiting.rows
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    def _rows_alike(self, first: _Waiting) -> int:
        return sum(w.rows for w in self._queue if w.alike == first.alike)

    # -- the engine's thread -----------------------------------------------------------------------

    def _run(self, batch: list[_Waiting]) -> list[Outputs | BaseException]:
        if len(batch) > 1:
            names = list(batch[0].arrays)
            feeds = {name: np.concatenate([w.arrays[name] for w in batch]) for name in names}
            try:
                outputs = self._call(feeds)
                return _split(outputs, [w.rows for w in batch])
            except Exception:
                pass  # run each alone below: only the request that fails gets the error
        return [self._run_alone(w) for w in batch]

    def _run_alone(self, waiting: _Waiting) -> Outputs | BaseException:
        try:
            return self._call(waiting.arrays)
        except Exception as exc:
            return exc

    def _call(self, feeds: dict[str, np.ndarray]) -> Outputs:
        batched = [a for a in feeds.values() if a.ndim]
        rows = batched[0].shape[0] if batched else 1
        self._batch_size.observe(rows)
        if self._on_batch is not None:
            self._on_batch(rows)
        return self.engine.run(feeds)


def _split(outputs: Outputs, rows: list[int]) -> list[Outputs | BaseException]:
    """Each request's rows of every output; PipelineError when an output is not per row."""
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise PipelineError(
                f"output {name!r} has shape {list(array.shape)} for a batch of {total} rows, "
                "so it cannot be split per request"
            )
    bounds = np.cumsum([0, *rows])
    return [
        {name: array[start:end] for name, array in outputs.items()}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
