"""The audit chain's state as the console and the admin API show it, without reading years of
entries on every page view (ca/audit.py says what the chain is).

`ChainMonitor.status()` verifies the whole log on its first call and again once `full_every`
has passed since the last full pass, in a background task that a caller waits for as long as it
chooses (a page waits half a second, then shows what was verified so far); between those it verifies only the entries added since,
continuing from the last verified entry, and first re-reads that entry: whoever rewrites history
must recompute every later hash to keep the chain whole, which changes it, and that starts a full
pass at once. An entry edited in place without recomputing (its hash no longer matches) is found
by the next full pass, so at most `full_every` late. The log is read in pages of `chunk` entries
with the loop free between pages. A checkpoint that no longer holds is itself reported, for as
long as the process runs: within it, entries cut off the end are seen too (across restarts only
a head hash recorded elsewhere shows that). `iomtca audit verify` and an evidence export verify the whole
log every time.

One monitor per process (`Authority.audit_chain`); concurrent callers share one pass.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .audit import GENESIS, verify_chain
from .timefmt import Clock, utc_now

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

MAX_PROBLEMS = 10   # kept and shown; the count goes on


@dataclass(frozen=True)
class ChainStatus:
    intact: bool
    problems: tuple[str, ...]   # the first MAX_PROBLEMS
    problem_count: int
    entries: int                # verified, from the first entry to the head
    head: str | None            # the newest entry's hash
    full_at: datetime | None    # when the last full pass started (None: the first is running)
    complete: bool              # False: the first full pass is still running, `entries` verified so far

    def json(self) -> dict:
        return {"intact": self.intact, "complete": self.complete, "problems": list(self.problems),
                "entries": self.entries, "head": self.head,
                "verified_in_full_at": None if self.full_at is None else self.full_at.isoformat()}


class ChainMonitor:
    def __init__(self, store: "Store", clock: Clock = utc_now, *, full_every: timedelta = timedelta(hours=1),
                 chunk: int = 5000) -> None:
        self._store = store
        self._clock = clock
        self.full_every = full_every
        self.chunk = chunk
        self._lock = asyncio.Lock()
        self._full_at: datetime | None = None   # when the last finished full pass started
        self._lost: list[str] = []   # checkpoints that no longer hold
        self._state = _Progress()
        self._pass: asyncio.Task | None = None

    async def status(self, *, wait: float | None = None) -> ChainStatus:
        """The chain as verified so far. A full pass that is due starts in the background; this
        waits for it up to `wait` seconds (None: until it ends), then answers with what was
        verified by then (`complete` False while the first pass is still running)."""
        now = self._clock()
        if self._pass is None and (self._full_at is None or now - self._full_at >= self.full_every):
            self._pass = asyncio.create_task(self._full_pass(now))
        if self._pass is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pass), wait)
            except asyncio.TimeoutError:
                pass
        if self._pass is None:   # between full passes: the entries added since, after the checkpoint
            async with self._lock:
                holds = await self._checkpoint_holds()
                if holds:
                    await self._extend()
            if not holds:   # the pass reports it, and verifies what is there now
                self._pass = asyncio.create_task(self._full_pass(now))
                return await self.status(wait=wait)
        return self._snapshot()

    def _snapshot(self) -> ChainStatus:
        state = self._state
        problems = self._lost + state.problems
        return ChainStatus(intact=not problems, problems=tuple(problems[:MAX_PROBLEMS]),
                           problem_count=len(self._lost) + state.problem_count, entries=state.through_id,
                           head=None if state.through_id == 0 else state.through_hash, full_at=self._full_at,
                           complete=self._full_at is not None)

    def _lost_checkpoint(self, now: datetime) -> None:
        state = self._state
        self._lost.append(f"entry {state.through_id} (hash {state.through_hash[:16]}...), verified here "
                          f"before {now.isoformat()}, is gone or changed: history was rewritten, "
                          "or entries were cut off the end")
        log.error("audit chain: %s", self._lost[-1])

    async def _full_pass(self, started: datetime) -> None:
        """Verify the whole log into a fresh state; it replaces the old one when done (until then
        the old one, if any, is what status() shows)."""
        fresh = _Progress()
        if self._full_at is None:
            self._state = fresh   # the first pass: show its progress
        try:
            async with self._lock:
                if self._state is not fresh and not await self._checkpoint_holds():
                    self._lost_checkpoint(self._clock())
            await self._extend(fresh)
            async with self._lock:
                await self._extend(fresh)   # what came in meanwhile
                self._state, self._full_at = fresh, started
        except Exception:   # the store failed: the next status() starts another pass
            log.exception("audit chain: the verification pass failed")
        finally:
            self._pass = None

    async def _checkpoint_holds(self) -> bool:
        state = self._state
        if state.through_id == 0:
            return True
        async with self._store.read() as tx:
            rows = await tx.audit_rows(after_id=state.through_id - 1, limit=1)
        return bool(rows) and rows[0].id == state.through_id and rows[0].hash == state.through_hash

    async def _extend(self, state: "_Progress | None" = None) -> None:
        """Verify the entries after `state`'s checkpoint (the current state's by default), a page at a time."""
        state = state or self._state
        while True:
            async with self._store.read() as tx:
                rows = await tx.audit_rows(after_id=state.through_id, limit=self.chunk)
            if not rows:
                return
            found = verify_chain(rows, prev=state.through_hash)
            if found and not state.problems:
                log.error("audit chain: %s", found[0])
            state.problem_count += len(found)
            state.problems.extend(found[:MAX_PROBLEMS - len(state.problems)])
            state.through_id, state.through_hash = rows[-1].id, rows[-1].hash
            if len(rows) < self.chunk:
                return
            await asyncio.sleep(0)   # other requests run between pages


@dataclass
class _Progress:
    """How far one verification got: the last entry verified and what was wrong before it."""

    through_id: int = 0
    through_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
