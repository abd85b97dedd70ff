"""Micro-batching: the patches of concurrent requests computed together in one model call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

DEFAULT_BATCH_WAIT_MS = 2.0
MAX_BATCH = 256


class MicroBatcher:
    """Gathers the patches of concurrent requests into one ``predict_proba`` call.

    Requests queue their patches; a single consumer task takes the first waiting request,
    waits ``max_wait_s`` for others to arrive, then runs everything queued (up to
    ``max_batch`` patches, more if one request alone has more) as one batch on the model
    thread. While a batch runs, new requests pile up and form the next one, so under load
    batches grow by themselves and a lone request waits only ``max_wait_s``.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        run_on_model_thread: Callable[..., asyncio.Future],
        max_batch: int = MAX_BATCH,
        max_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
    ) -> None:
        self.predict = predict
        self.run_on_model_thread = run_on_model_thread
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches: list[int] = []  # sizes of the last batches run, for tests and benchmarks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def _ensure_running(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        # A new event loop (test clients make one per session) needs its own queue and task.
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._consume(self._queue))
        assert self._queue is not None
        return self._queue

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """P(tumour) of ``images`` (N, 96, 96, 3) uint8, computed in a shared batch."""
        if len(images) == 0:
            return np.empty(0, np.float32)
        queue = self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        queue.put_nowait((images, future))
        return await future

    async def _consume(self, queue: asyncio.Queue) -> None:
        while True:
            items = [await queue.get()]
            if self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            total = len(items[0][0])
            while total < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                items.append(item)
                total += len(item[0])
            # Requests that timed out meanwhile are not computed.
            items = [(x, f) for x, f in items if not f.done()]
            if not items:
                continue
            batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
            try:
                probs = await self.run_on_model_thread(self.predict, batch)
            except Exception as exc:  # handed to every waiting request, the loop goes on
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches = [*self.batches[-99:], len(batch)]
            start = 0
            for x, f in items:
                if not f.done():
                    f.set_result(probs[start : start + len(x)])
                start += len(x)

    def close(self) -> None:
        """Stop the consumer task (pending requests are left to their timeouts)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
