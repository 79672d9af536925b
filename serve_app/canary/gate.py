"""`CanaryGate`: what a Router or Ingress replica holds for canaries (see the package docstring for its use).

It answers `assign` and `shadowing` from its last view of the shared state (no file access on the
request path), counts outcomes per version in memory, and on `tick` adds them to the shared state and
takes the fresh view. A gate on an app with no rollout, or an ended one, sends everything to stable
(or, once promoted, to the candidate, until the app is switched to it).
"""

from __future__ import annotations

import random
import time

from .analysis import Counters
from .state import CANDIDATE, STABLE, Rollout, RolloutStore, assign


class CanaryGate:
    def __init__(self, store: RolloutStore, sync_s: float = 1.0, rng: random.Random | None = None):
        self.store = store
        self.sync_s = sync_s
        self.rng = rng or random.Random()
        self.rollout: Rollout | None = store.load()
        self.counts = {STABLE: Counters(), CANDIDATE: Counters()}
        self.synced_at = 0.0

    def assign(self, session_key: str | None = None) -> str:
        r = self.rollout
        if r is None:
            return STABLE
        return assign(r.weight(), session_key, r.rollout_id, self.rng)

    def shadowing(self) -> bool:
        return self.rollout is not None and self.rollout.shadowing()

    def catalog(self, version: str) -> str | None:
        """The catalog directory serving `version` ("stable" / "candidate") in the rollout, if there is one."""
        return None if self.rollout is None else getattr(self.rollout, version)["catalog"]

    def side_of(self, catalog_version: str) -> str | None:
        """"stable" / "candidate" for a catalog version of the rollout; None for any other (no rollout)."""
        r = self.rollout
        if r is None:
            return None
        return next((side for side in (STABLE, CANDIDATE) if getattr(r, side)["version"] == catalog_version), None)

    def label(self, version: str, correct: bool) -> None:
        """A true task learnt after the reply (Feedback): accuracy only, the request itself was counted."""
        self.counts[version].labelled += 1
        self.counts[version].correct += correct

    def record(self, version: str, *, ok: bool, latency_ms: float, agreed: bool | None = None,
               correct: bool | None = None) -> None:
        self.counts[version].record(ok=ok, latency_ms=latency_ms, agreed=agreed, correct=correct)

    def tick(self, now: float | None = None) -> Rollout | None:
        """Sync with the shared state if `sync_s` has passed; returns the rollout as this replica now sees it."""
        now = time.time() if now is None else now
        if now - self.synced_at >= self.sync_s:
            counts, self.counts = self.counts, {STABLE: Counters(), CANDIDATE: Counters()}
            seen = self.rollout and (self.rollout.rollout_id, self.rollout.step)
            self.rollout = self.store.sync(counts[STABLE], counts[CANDIDATE], now, counted_in=seen or None)
            self.synced_at = now
        return self.rollout
