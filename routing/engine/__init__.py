"""The generation engine: continuous batching over fused multi-LoRA rows with a paged KV cache.

`Engine.step()` = `Scheduler.schedule()` (who runs; pure bookkeeping) → `ModelRunner.forward()` (tensors;
decides nothing) → sampling and text (stop strings, whole characters) → `Event`s. One step mixes
prefill chunks of newly admitted requests with one decoding step of every running row, each row on
its own adapters (one, a K-way fusion, or none).
"""

from routing.engine.config import EngineConfig
from routing.engine.engine import Engine, Event
from routing.engine.scheduler import NeverFitsError, QueueFullError, Scheduler
from routing.engine.sequence import SamplingParams, Sequence

__all__ = ["Engine", "EngineConfig", "Event", "NeverFitsError", "QueueFullError", "SamplingParams", "Scheduler",
           "Sequence"]
