"""`EngineLoop`: the engine's own thread next to a replica's asyncio event loop.

The engine thread owns the model and steps whenever there is work; the event loop only posts
commands (add, abort, a function to run between steps) and reads each request's events from its own
`asyncio.Queue`. Nothing the event loop does waits for a step, so the replica keeps accepting
requests while the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from routing.engine import Engine, Event

log = logging.getLogger("ray.serve")


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # request id -> the event loop of the coroutine that reads its events, and their queue
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | BaseException]]] = {}
        self.aborted = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, **request: Any) -> asyncio.Queue[Event | BaseException]:
        """Queue a request (`Engine.add`'s arguments); its events, or the error that refused it, arrive
        on the returned queue."""
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), events)

        def add() -> None:
            try:
                self.engine.add(request_id, **request)
            except Exception as e:  # noqa: BLE001 - refused: the error is that request's answer
                self._deliver(request_id, e)
        self._commands.put(add)
        return events

    def abort(self, request_id: str) -> None:
        """Its client has gone: the engine retires it at its next step."""
        self.aborted += 1
        self._commands.put(lambda: self.engine.abort(request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between two steps (catalog switches, stats) and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - raised to the caller
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)
        self._commands.put(run)
        return await done

    def stop(self) -> None:
        self._commands.put(None)

    def _run(self) -> None:
        while True:
            try:   # idle: sleep until a command comes; busy: take what is there, else step
                command = self._commands.get_nowait() if self.engine.has_work else self._commands.get()
            except queue.Empty:
                command = _NOTHING
            if command is None:
                return
            if command is not _NOTHING:
                command()
                continue   # drain every pending command before the next step
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine contains per-step errors; this is a bug
                log.exception("engine loop: step failed")
                events = []
                for rid in list(self._queues):
                    self._deliver(rid, e)
            for event in events:
                self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, item: Event | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        if isinstance(item, BaseException) or item.done:
            del self._queues[request_id]
        loop, events = target
        loop.call_soon_threadsafe(events.put_nowait, item)


_NOTHING = object()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
