"""What every endpoint and guard shares: the loaded model, its description, limits, batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from histodetect.inference.predictor import Predictor
from histodetect.service.batching import MicroBatcher
from histodetect.service.schemas import Limits


@dataclass
class Service:
    """Everything the endpoints share: the model, its description, the limits, the batcher."""

    predictor: Predictor
    info: dict
    api_key: str | None
    limits: Limits
    tta: int
    region_stride: int
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="histodetect-model")
    )
    batcher: MicroBatcher | None = None

    def on_model_thread(self, func: Callable, *args, **kwargs) -> asyncio.Future:
        """Run ``func`` on the single model thread.

        Every use of the model goes through this one thread: Grad-CAM puts hooks on a layer,
        which must not see another request's forward pass, and two CPU inferences at once
        would only compete for the same cores.
        """
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, partial(func, *args, **kwargs))

    @property
    def model_id(self) -> str:
        """Architecture and the first 12 hex digits of the weights' SHA-256."""
        return self.info["model_id"]
