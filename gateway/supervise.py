"""The gateway's task supervisor: long-running tasks restarted with backoff, never the end of the process.

Each task is a named coroutine factory. When the coroutine raises (anything but its own
cancellation) the supervisor logs it with its traceback at ERROR and starts a fresh one after
a backoff: exponential with jitter (1 s doubling to 30 s by default), back to the first step
once a run has lasted `healthy_after`. A task that returns is restarted the same way (these
tasks are meant to run until the gateway stops). `stop()` cancels every task and waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Factory = Callable[[], Awaitable[None]]


def backoff(failures: int, initial: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """The delay before attempt `failures` + 1: initial * 2**(failures - 1), capped, with jitter
    (a random half of it removed, so restarts of many tasks or gateways do not line up)."""
    base = min(cap, initial * 2 ** max(failures - 1, 0))
    return base * (0.5 + rand() / 2)


class Supervisor:
    def __init__(self, *, initial: float = 1.0, cap: float = 30.0, healthy_after: float = 60.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._initial, self._cap, self._healthy_after, self._rand = initial, cap, healthy_after, rand
        self._tasks: dict[str, asyncio.Task] = {}
        self.restarts: dict[str, int] = {}   # name -> how many times its coroutine was started again
        self._stopping = False

    def start(self, name: str, factory: Factory) -> None:
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        self.restarts[name] = 0
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, factory), name=name)

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    async def _keep(self, name: str, factory: Factory) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await factory()
                outcome = "returned"
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling()):
                    raise   # our own cancellation: stop
                # a CancelledError nobody sent us (e.g. from a future someone else cancelled)
                outcome, error = "was cancelled from inside", exc
            except Exception as exc:   # SystemExit and KeyboardInterrupt pass
                outcome, error = "died", exc
            ran = time.monotonic() - started
            failures = 1 if ran >= self._healthy_after else failures + 1
            delay = backoff(failures, self._initial, self._cap, self._rand)
            log.error("task %s %s after %.1f s; restarting it in %.1f s (failure %d in a row)",
                      name, outcome, ran, delay, failures, exc_info=error)
            await asyncio.sleep(delay)
            self.restarts[name] += 1
            log.info("task %s restarted (restart %d)", name, self.restarts[name])

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for name, result in zip(self._tasks, results):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("task %s failed while stopping: %r", name, result)
        self._tasks.clear()

    async def __aenter__(self) -> "Supervisor":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
