"""Coalesce concurrent searches into one index call.

A single query over a flat index streams the whole item matrix from memory; a
batch of them is one matrix-matrix product that reads it once
(``ItemIndex._search_gemm``), about half the cost per query at 100 000 items.
Requests that arrive while a search runs are queued and searched together next
("natural" batching): an idle server adds no waiting, a busy one answers more
requests per second than the index could one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_rec.index import ItemIndex, set_search_threads
from stream_rec.serving.overlay import Overlay
from stream_rec.serving.state import ServingState, SnapshotWatcher, plan_on_newest

log = logging.getLogger(__name__)

Hits = list[tuple[int, float]]


@dataclass
class _Request:
    index: ItemIndex
    query: np.ndarray  # (D,)
    k: int
    exclude: np.ndarray
    future: Future[Hits]


class SearchBatcher:
    """One thread that searches queued requests in batches of up to ``max_batch``."""

    def __init__(self, max_batch: int = 64, threads: int = 1) -> None:
        self.max_batch = max_batch
        self.threads = threads
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.batches = 0
        self.searched = 0
        self._thread = threading.Thread(target=self._run, name="search-batcher", daemon=True)
        self._thread.start()

    def search(self, index: ItemIndex, query: np.ndarray, k: int,
               exclude: np.ndarray) -> Future[Hits]:
        """Queue one search; the future resolves to ``[(row, score), …]``."""
        fut: Future[Hits] = Future()
        self._queue.put(_Request(index, query, k, exclude, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # OpenMP's thread count is per calling thread: set it where searches run.
        set_search_threads(self.threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            groups: dict[int, list[_Request]] = {}
            for req in batch:  # requests on different versions search different indexes
                groups.setdefault(id(req.index), []).append(req)
            for reqs in groups.values():
                self._search(reqs)

    def _search(self, reqs: list[_Request]) -> None:
        try:
            k = max(r.k for r in reqs)
            queries = np.stack([r.query for r in reqs])
            results = reqs[0].index.search(queries, k, [r.exclude for r in reqs])
        except Exception as exc:  # a failed search fails its requests, not the server
            log.exception("batched search failed")
            for r in reqs:
                r.future.set_exception(exc)
            return
        self.batches += 1
        self.searched += len(reqs)
        for r, hits in zip(reqs, results):
            r.future.set_result(hits[:r.k])


async def answer_on_newest(watcher: SnapshotWatcher, batcher: SearchBatcher, user_id: str,
                           k: int, overlay: Overlay | None
                           ) -> tuple[ServingState, dict[str, Any]] | None:
    """``/recommend``'s answer for ``user_id`` on the newest version, its search coalesced
    with others'; with the state it came from. None before any version is loaded."""
    planned = plan_on_newest(watcher, user_id, overlay)
    if planned is None:
        return None
    current, plan = planned
    hits = None
    if plan.query is not None:
        hits = await asyncio.wrap_future(
            batcher.search(current.index, plan.query, k, plan.exclude))
    return current, current.answer(user_id, k, plan, hits, overlay)
