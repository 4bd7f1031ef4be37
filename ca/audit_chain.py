"""The audit chain's state as the console and the admin API show it, without reading years of
entries on every page view (ca/audit.py says what the chain is).

`ChainMonitor.status()` verifies the whole log on its first call and again once `full_every`
has passed since the last full pass; between those it verifies only the entries added since,
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
from dataclasses import dataclass
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
    full_at: datetime           # when the whole log was last verified

    def json(self) -> dict:
        return {"intact": self.intact, "problems": list(self.problems), "entries": self.entries,
                "head": self.head, "verified_in_full_at": self.full_at.isoformat()}


class ChainMonitor:
    def __init__(self, store: "Store", clock: Clock = utc_now, *, full_every: timedelta = timedelta(hours=1),
                 chunk: int = 5000) -> None:
        self._store = store
        self._clock = clock
        self.full_every = full_every
        self.chunk = chunk
        self._lock = asyncio.Lock()
        self._full_at: datetime | None = None
        self._lost: list[str] = []   # checkpoints that no longer hold
        self._reset()

    def _reset(self) -> None:
        self._through_id, self._through_hash = 0, GENESIS
        self._problems: list[str] = []
        self._problem_count = 0

    async def status(self) -> ChainStatus:
        async with self._lock:
            now = self._clock()
            holds = await self._checkpoint_holds()
            if not holds:   # sticky for this process: what was verified once is gone
                self._lost.append(f"entry {self._through_id} (hash {self._through_hash[:16]}...), verified here "
                                  f"before {now.isoformat()}, is gone or changed: history was rewritten, "
                                  "or entries were cut off the end")
                log.error("audit chain: %s", self._lost[-1])
            if self._full_at is None or now - self._full_at >= self.full_every or not holds:
                self._reset()
                self._full_at = now
            await self._extend()
            problems = self._lost + self._problems
            return ChainStatus(intact=not problems, problems=tuple(problems[:MAX_PROBLEMS]),
                               problem_count=len(self._lost) + self._problem_count, entries=self._through_id,
                               head=None if self._through_id == 0 else self._through_hash, full_at=self._full_at)

    async def _checkpoint_holds(self) -> bool:
        if self._through_id == 0:
            return True
        async with self._store.read() as tx:
            rows = await tx.audit_rows(after_id=self._through_id - 1, limit=1)
        return bool(rows) and rows[0].id == self._through_id and rows[0].hash == self._through_hash

    async def _extend(self) -> None:
        """Verify the entries after the checkpoint, a page at a time."""
        while True:
            async with self._store.read() as tx:
                rows = await tx.audit_rows(after_id=self._through_id, limit=self.chunk)
            if not rows:
                return
            found = verify_chain(rows, prev=self._through_hash)
            if found and not self._problems:
                log.error("audit chain: %s", found[0])
            self._problem_count += len(found)
            self._problems.extend(found[:MAX_PROBLEMS - len(self._problems)])
            self._through_id, self._through_hash = rows[-1].id, rows[-1].hash
            if len(rows) < self.chunk:
                return
            await asyncio.sleep(0)   # other requests run between pages
