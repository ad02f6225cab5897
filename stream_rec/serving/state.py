"""What a serving process answers from, and how it is swapped without blocking.

A :class:`ServingState` is immutable once built: a verified snapshot plus the
FAISS index over its item vectors. :class:`SnapshotWatcher` polls the store,
builds the next state off the request path and swaps it in by replacing one
reference, so requests in flight finish on the version they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_rec.index import ItemIndex
from stream_rec.model import tables as T
from stream_rec.snapshot import CorruptSnapshot, Snapshot, SnapshotStore

log = logging.getLogger(__name__)


Hits = list[tuple[int, float]]


@dataclass(frozen=True)
class Plan:
    """The search an answer needs: a query vector (D,) and the item rows it must not return.

    ``query`` is ``None`` when there is nothing to search (an unknown user gets
    recently popular items instead).
    """

    query: np.ndarray | None
    exclude: np.ndarray


class ServingState:
    """One snapshot, indexed and ready for queries.

    Built over the previous state when the new version was loaded as deltas on
    top of it: the index is then copied once and only the changed item rows are
    refreshed, instead of indexing every item again.
    """

    def __init__(self, snapshot: Snapshot, previous: ServingState | None = None,
                 index_kind: str = "flat", nprobe: int = 16) -> None:
        self.snapshot = snapshot
        self.manifest = snapshot.manifest
        self.state = snapshot.state
        vectors = self.state.tables[T.ITEM_VECTORS]
        rows = snapshot.changed_items
        self.index: ItemIndex
        if previous is not None and rows is not None \
                and snapshot.base_version == previous.version \
                and previous.index.kind == index_kind:
            expired = np.array([r for r in rows.tolist() if not self.state.item_ids[r]],
                               dtype=np.int64)
            self.index = previous.index.refreshed(rows, vectors[rows], expired)
        else:
            ids = np.asarray(self.state.item_ids, dtype=object)
            dead = np.flatnonzero(ids == "") if len(ids) else None
            self.index = ItemIndex.build(vectors, dead, kind=index_kind, nprobe=nprobe)
        self.loaded_at = time.time()

    @property
    def version(self) -> int:
        return self.manifest.version

    def meta(self) -> dict[str, Any]:
        return {"version": self.manifest.version, "watermark": self.manifest.watermark}

    # -- answers: plan, search (batched by the app, directly here), answer --
    def plan(self, user_id: str) -> Plan:
        """What ``user_id``'s answer searches: their query, minus the items they saw."""
        row = self.state.query_row(user_id)
        if row is None:
            return Plan(None, np.zeros(0, dtype=np.int64))
        query = self.state.query(np.array([row], dtype=np.int64))[0]
        return Plan(query, np.asarray(self.state.seen(row), dtype=np.int64))

    def answer(self, user_id: str, k: int, plan: Plan, hits: Hits | None) -> dict[str, Any]:
        """The body of ``/recommend``: the searched ``hits``, or popular items without a query."""
        if plan.query is None:
            items, fallback = self.popular(k), True
        else:
            items, fallback = self.named(hits or []), False
        return {"user_id": user_id, **self.meta(), "fallback": fallback,
                "items": [{"item_id": i, "score": s} for i, s in items]}

    def recommend(self, user_id: str, k: int) -> dict[str, Any]:
        """``/recommend``'s body, searching the index on the calling thread."""
        plan = self.plan(user_id)
        hits = None if plan.query is None else \
            self.index.search(plan.query[None, :], k, [plan.exclude])[0]
        return self.answer(user_id, k, plan, hits)

    def named(self, hits: Hits) -> list[tuple[str, float]]:
        return [(self.state.item_ids[r], s) for r, s in hits]

    def popular(self, k: int) -> list[tuple[str, float]]:
        rows = self.state.popular(k)
        n = len(rows)
        return [(self.state.item_ids[int(r)], float(n - i) / max(n, 1))
                for i, r in enumerate(rows)]

    def plan_similar(self, item_id: str) -> Plan | None:
        """What ``/similar`` searches: the item's vector, minus the item; None if unknown."""
        row = self.state.item_row(item_id)
        if row is None:
            return None
        return Plan(self.state.tables[T.ITEM_VECTORS][row], np.array([row], dtype=np.int64))

    def answer_similar(self, item_id: str, hits: Hits) -> dict[str, Any]:
        return {"item_id": item_id, **self.meta(),
                "items": [{"item_id": i, "score": s} for i, s in self.named(hits)]}


class SnapshotWatcher:
    """Polls a store and hot-swaps newer verified versions into :attr:`current`."""

    def __init__(self, store: SnapshotStore, poll_interval_s: float = 0.1,
                 metrics: Any | None = None, index_kind: str = "flat",
                 nprobe: int = 16) -> None:
        self.store = store
        self.index_kind = index_kind
        self.nprobe = nprobe
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        self.current: ServingState | None = None
        self._refused: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Load the version to serve (pinned, else latest) if it is new and valid.

        Returns ``True`` when a swap happened. A pin to an older version swaps
        back to it; unpinning returns to the latest.
        """
        target = self.store.serving_version()
        have = self.current.version if self.current else None
        if target is None or target == have or target in self._refused:
            return False
        t0 = time.perf_counter()
        current = self.current
        try:
            snapshot = self.store.load(target, base=current.snapshot if current else None)
        except (CorruptSnapshot, OSError, ValueError) as exc:
            self._refused.add(target)
            log.error("refusing snapshot version %s: %s (still serving %s)", target, exc, have)
            if self.metrics:
                self.metrics.refused.inc()
            return False
        if snapshot is None:
            return False
        new_state = ServingState(snapshot, current, self.index_kind, self.nprobe)
        self.current = new_state  # the swap: one reference, atomic under the GIL
        if self.metrics:
            self.metrics.observe_swap(new_state, time.perf_counter() - t0)
        log.info("serving version %d (watermark %s)", new_state.version,
                 new_state.manifest.watermark)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # never let the watcher die: keep serving what we have
                log.exception("snapshot poll failed")
            self._stop.wait(self.poll_interval_s)

    def start(self) -> SnapshotWatcher:
        self._thread = threading.Thread(target=self._run, name="snapshot-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
