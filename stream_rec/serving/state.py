"""What a serving process answers from, and how it is swapped without blocking.

A :class:`ServingState` is immutable once built: a verified snapshot plus the
FAISS index over its item vectors. :class:`SnapshotWatcher` polls the store,
builds the next state off the request path and swaps it in by replacing one
reference, so requests in flight finish on the version they started with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_rec.index import ItemIndex
from stream_rec.model import ModelState, quant
from stream_rec.model import tables as T
from stream_rec.model.content import YOUNG_MAX_EVENTS, text_term, young
from stream_rec.serving.overlay import Overlay, UserClicks
from stream_rec.snapshot import CorruptSnapshot, Snapshot, SnapshotStore

log = logging.getLogger(__name__)


Hits = list[tuple[int, float]]


@dataclass(frozen=True)
class Plan:
    """The search an answer needs: a query vector (D,) and the item rows it must not return.

    ``query`` is ``None`` when there is nothing to search (an unknown user gets
    recently popular items instead). ``scored`` (rows, scores): items already
    scored here -- the young items, with the content term -- that the index
    search skips (they are in ``exclude``) and the answer merges in.
    """

    query: np.ndarray | None
    exclude: np.ndarray
    overlay_events: int = 0  # the user's clicks past the version that the query includes
    overlay_reach: dict[int, int] | None = None  # how far the overlay had read, at planning
    # The overlay moved on to a newer version than this state's: the clicks that version
    # covers are no longer in it, so the answer must be planned on the newer state.
    stale: bool = False
    scored: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Click:
    """One of a user's recent clicks: the item and its event time (epoch ms)."""

    item_id: str
    ts: int


@dataclass(frozen=True)
class Swap:
    """A version this process swapped in, for the operator's page: versions over time."""

    version: int
    kind: str          # "full" or "delta"
    created_at: float  # epoch s, on the worker
    swapped_at: float  # epoch s, here
    watermark: int | None
    events: int | None  # events learned into the state, all-time (None: not recorded)
    load_s: float      # load + verify + index


class ServingState:
    """One snapshot, indexed and ready for queries.

    Built over the previous state when the new version was loaded as deltas on
    top of it: the index is then copied once and only the changed item rows are
    refreshed, instead of indexing every item again.

    A watcher loads only the tables serving reads (:data:`~stream_rec.model.tables.SERVED`),
    so a server holds none of the training state. The vectors among them
    (:data:`quant.SERVING`) are held in ``vector_dtype``;
    a version loaded over the previous state already holds them so (a delta's
    rows take the encoding of the table they are written into), one loaded
    whole is encoded here, once. Queries and refreshes decode only the rows
    they read; the index is built from the decoded vectors.
    """

    def __init__(self, snapshot: Snapshot, previous: ServingState | None = None,
                 index_kind: str = "flat", nprobe: int = 16,
                 content_alpha: float = 0.0, vector_dtype: quant.Encoding = "float32") -> None:
        state = snapshot.state
        tables = quant.encoded(state.tables, quant.SERVING, vector_dtype)
        if any(tables[n] is not state.tables.get(n) for n in tables):
            state = ModelState(config=state.config, user_ids=state.user_ids,
                               item_ids=state.item_ids, tables=tables)
            snapshot = dataclasses.replace(snapshot, state=state)
        self.snapshot = snapshot   # the next version is loaded over this one
        self.manifest = snapshot.manifest
        self.state = state
        self.vector_dtype = vector_dtype
        rows = snapshot.changed_items
        self.index: ItemIndex
        if previous is not None and rows is not None \
                and snapshot.base_version == previous.version \
                and previous.index.kind == index_kind:
            expired = np.array([r for r in rows.tolist() if not self.state.item_ids[r]],
                               dtype=np.int64)
            self.index = previous.index.refreshed(rows, self.state.index_vectors(rows), expired)
        else:
            ids = np.asarray(self.state.item_ids, dtype=object)
            dead = np.flatnonzero(ids == "") if len(ids) else None
            self.index = ItemIndex.build(self.state.index_vectors(), dead, kind=index_kind,
                                         nprobe=nprobe)
        self.content = YoungItems.of(self.state, content_alpha)
        # Id lookups and the popular list are built here, on the watcher's thread,
        # never by the first request that needs them (about 0.26 s at 1M users).
        self.state.user_row("")
        self.state.item_row("")
        self.state.popular(0)
        self.loaded_at = time.time()

    @property
    def version(self) -> int:
        return self.manifest.version

    def meta(self) -> dict[str, Any]:
        return {"version": self.manifest.version, "watermark": self.manifest.watermark}

    def status(self, follow: Any | None = None) -> dict[str, Any]:
        """The body of ``/readyz``: what is served, and how far into the topic it reaches.

        ``follow`` (a topic follower, or a bare overlay) adds the overlay's
        state; a server that cannot reach the broker stays ready and says so.
        """
        m = self.manifest
        body = {"ready": True, **self.meta(), "created_at": m.created_at,
                "offsets": m.offsets, "counts": m.counts}
        if isinstance(follow, Overlay):
            body["overlay"] = {"following": False, "reach": dict(follow.reach),
                               **follow.stats()}
        elif follow is not None:
            body["overlay"] = follow.status()
        return body

    def recent_clicks(self, user_id: str, limit: int | None = None,
                      overlay: Overlay | None = None) -> list[Click]:
        """A user's most recent clicks, newest first: the overlay's, then the version's.

        The one place that says what a user recently did (the dashboard reads
        it). The version keeps the last ``model.history`` clicks of each user;
        the overlay adds those read from the topic past the version's offsets.
        """
        clicks: list[Click] = []
        if overlay is not None:
            mine = overlay.clicks(user_id)
            clicks = [Click(i, int(ts)) for i, ts in zip(mine.items, mine.ts)]
        row = self.state.user_row(user_id)
        if row is not None:
            hist = self.state.tables[T.USER_HIST][row]
            stamps = self.state.tables[T.USER_HIST_TS][row]
            ids = self.state.item_ids
            clicks += [Click(ids[r], int(ts)) for r, ts in zip(hist.tolist(), stamps.tolist())
                       if r >= 0 and ids[r]]
        return clicks[:limit] if limit is not None else clicks

    # -- answers: plan, search (batched by the app, directly here), answer --
    def plan(self, user_id: str, overlay: Overlay | None = None) -> Plan:
        """What ``user_id``'s answer searches: their query, minus the items they saw.

        The query is the version's parameters applied to the user's recent
        history: the version's, preceded by the user's clicks in ``overlay``
        (those past the version's offsets), newest first. A user the version
        does not know but the overlay does gets a query from those clicks alone.
        """
        row = self.state.query_row(user_id)  # own row, else a shared one (admission pending)
        clicks = overlay.clicks(user_id) if overlay is not None else None
        reach = clicks.reach if clicks is not None else None
        if clicks is not None and clicks.base_version is not None \
                and clicks.base_version > self.version:
            return Plan(None, np.zeros(0, dtype=np.int64), 0, reach, stale=True)
        if clicks is None or not clicks.events:
            if row is None:
                return Plan(None, np.zeros(0, dtype=np.int64), 0, reach)
            query = self.state.query(np.array([row], dtype=np.int64))[0]
            exclude = np.asarray(self.state.seen(row), dtype=np.int64)
            return self._with_content(Plan(query, exclude, 0, reach),
                                      self.state.tables[T.USER_HIST][row])
        hist, hist_ts = self._history(row, clicks)
        query = self.state.query_history(hist[None, :], hist_ts[None, :],
                                         np.array([-1 if row is None else row]))[0]
        seen_rows = [r for r in map(self.state.item_row, clicks.seen) if r is not None]
        exclude = np.asarray(seen_rows, dtype=np.int64)
        if row is not None:
            exclude = np.union1d(self.state.seen(row), exclude)
        return self._with_content(Plan(query, exclude, clicks.events, reach), hist)

    def _with_content(self, plan: Plan, hist: np.ndarray) -> Plan:
        """``plan`` with the content term for young items, from the history the query used."""
        if self.content is None or plan.query is None:
            return plan
        term = self.content.user_term(hist)
        return plan if term is None else self.content.plan(plan, term)

    def _history(self, row: int | None, clicks: UserClicks) -> tuple[np.ndarray, np.ndarray]:
        """(H,) item rows and times: the overlay's clicks, then the version's history.

        An item the version does not know yet has no embedding: its slot stays
        empty (-1), keeping the others' positions.
        """
        t = self.state.tables
        H = t[T.USER_HIST].shape[1]
        if row is None:
            old, old_ts = np.full(H, -1, dtype=np.int64), np.zeros(H, dtype=np.int64)
        else:
            old, old_ts = t[T.USER_HIST][row], t[T.USER_HIST_TS][row]
        new = [r if r is not None else -1 for r in map(self.state.item_row, clicks.items)]
        hist = np.concatenate([np.asarray(new, dtype=np.int64), old])[:H]
        hist_ts = np.concatenate([np.asarray(clicks.ts, dtype=np.int64), old_ts])[:H]
        return hist, hist_ts

    def answer(self, user_id: str, k: int, plan: Plan, hits: Hits | None,
               overlay: Overlay | None = None) -> dict[str, Any]:
        """The body of ``/recommend``: the searched ``hits``, or popular items without a query.

        With an ``overlay``, the answer also says how far it reaches: the
        next offset per partition it has read, and how many of the user's
        clicks past the version the query included.
        """
        if plan.query is None:
            items, fallback = self.popular(k), True
        else:
            items, fallback = self.named(merged(hits or [], plan, k)), False
        body = {"user_id": user_id, **self.meta(), "fallback": fallback,
                "items": [{"item_id": i, "score": s} for i, s in items]}
        if overlay is not None:
            reach = plan.overlay_reach if plan.overlay_reach is not None else overlay.reach
            body["overlay"] = {"events": plan.overlay_events,
                               "offsets": {str(p): o for p, o in reach.items()}}
        return body

    def recommend(self, user_id: str, k: int, overlay: Overlay | None = None) -> dict[str, Any]:
        """``/recommend``'s body, searching the index on the calling thread."""
        plan = self.plan(user_id, overlay)
        hits = None if plan.query is None else \
            self.index.search(plan.query[None, :], k, [plan.exclude])[0]
        return self.answer(user_id, k, plan, hits, overlay)

    def named(self, hits: Hits) -> list[tuple[str, float]]:
        return [(self.state.item_ids[r], s) for r, s in hits]

    def popular(self, k: int) -> list[tuple[str, float]]:
        rows = self.state.popular(k)
        n = len(rows)
        return [(self.state.item_ids[int(r)], float(n - i) / max(n, 1))
                for i, r in enumerate(rows)]

    def plan_similar(self, item_id: str) -> Plan | None:
        """What ``/similar`` searches: the item's vector, minus the item; None if unknown.

        An item nobody clicked yet but the catalogue announced has a vector
        from its text alone. With content, young items also get the content
        term against the item's own text (the gate is 1: the item is the
        whole history).
        """
        row = self.state.item_row(item_id)
        if row is None:
            return None
        plan = Plan(self.state.item_query(row), np.array([row], dtype=np.int64))
        if self.content is None:
            return plan
        term = self.content.item_term(row)
        return plan if term is None else self.content.plan(plan, term)

    def answer_similar(self, item_id: str, hits: Hits, plan: Plan | None = None,
                       k: int | None = None) -> dict[str, Any]:
        if plan is not None and k is not None:
            hits = merged(hits, plan, k)
        return {"item_id": item_id, **self.meta(),
                "items": [{"item_id": i, "score": s} for i, s in self.named(hits)]}


def merged(hits: Hits, plan: Plan, k: int) -> Hits:
    """The index's ``hits`` and the plan's already-scored items, best ``k`` first (ties by row).

    Both are exact top lists of disjoint item sets (the scored ones were
    excluded from the search), so their merge is the exact top ``k``.
    """
    if plan.scored is None:
        return hits
    rows, scores = plan.scored
    top = np.argsort(-scores, kind="stable")[:k]
    both = hits + [(int(r), float(s)) for r, s in zip(rows[top], scores[top])]
    both.sort(key=lambda h: (-h[1], h[0]))
    return both[:k]


class YoungItems:
    """The young items of a version and their index vectors, for the content term.

    Built once per version on the watcher's thread (:meth:`of`): the rows
    that get the term (live, with text, at most ``YOUNG_MAX_EVENTS`` events)
    and their vectors, (Y, D + 1 + K) float32. A plan scores them exactly with
    the query plus ``alpha * term`` in the text block, so the main index and
    its vectors stay what they are.
    """

    def __init__(self, state: ModelState, alpha: float) -> None:
        t = state.tables
        self.alpha = alpha
        self.state = state
        self.dim = int(t[T.ITEM_VECTORS].shape[1])               # D + 1
        live = np.array([bool(i) for i in state.item_ids], dtype=bool)
        events = t[T.ITEM_EVENTS]
        few = np.flatnonzero(live & (events <= YOUNG_MAX_EVENTS))   # text read for these only
        has_text = np.zeros(len(events), dtype=bool)
        has_text[few] = t[T.ITEM_TEXT][few].any(axis=1)
        self.rows = young(events, has_text, live)
        self.vectors = state.index_vectors(self.rows)

    @classmethod
    def of(cls, state: ModelState, alpha: float) -> YoungItems | None:
        """``None`` when the version has no text or the term is off."""
        return cls(state, alpha) if alpha > 0 and state.content_dim else None

    def user_term(self, hist: np.ndarray) -> np.ndarray | None:
        """``g_u x̂_u`` (K,) of a history (H,) of this version's rows, or None."""
        t = self.state.tables
        return text_term(np.asarray(hist, dtype=np.int64), t[T.ITEM_EVENTS], t[T.ITEM_TEXT])

    def item_term(self, row: int) -> np.ndarray | None:
        """The term of ``/similar``: the item's own (unit) text vector, gate 1."""
        x = self.state.tables[T.ITEM_TEXT][row].astype(np.float32)
        norm = float(np.linalg.norm(x))
        return x / norm if norm > 0 else None

    def plan(self, plan: Plan, term: np.ndarray) -> Plan:
        """``plan`` with the young items scored here and excluded from the index search."""
        assert plan.query is not None
        if not len(self.rows):
            return plan
        q = plan.query.copy()
        q[self.dim:] += np.float32(self.alpha) * term
        keep = ~np.isin(self.rows, plan.exclude)
        rows = self.rows[keep]
        scores = (self.vectors @ q)[keep].astype(np.float32, copy=False)
        return dataclasses.replace(plan, exclude=np.union1d(plan.exclude, self.rows),
                                   scored=(rows, scores))


class SnapshotWatcher:
    """Polls a store and hot-swaps newer verified versions into :attr:`current`."""

    def __init__(self, store: SnapshotStore, poll_interval_s: float = 0.1,
                 metrics: Any | None = None, index_kind: str = "flat",
                 nprobe: int = 16,
                 on_swap: Callable[[ServingState], None] | None = None,
                 content_alpha: float = 0.0,
                 vector_dtype: quant.Encoding = "float32") -> None:
        self.store = store
        self.content_alpha = content_alpha
        self.vector_dtype = vector_dtype
        self.on_swap = on_swap  # runs on the watcher's thread, after the swap
        self.index_kind = index_kind
        self.nprobe = nprobe
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        self.current: ServingState | None = None
        # The versions swapped in, oldest first (bounded: at 10 versions/s, about 7 min).
        self.history: deque[Swap] = deque(maxlen=4096)
        self._refused: set[int] = set()
        self._retry_at = 0.0      # monotonic time before which a failed target is not retried
        self._backoff_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Load the version to serve (pinned, else latest) if it is new and valid.

        Returns ``True`` when a swap happened. A pin to an older version swaps
        back to it; unpinning returns to the latest.
        """
        target = self.store.serving_version()
        have = self.current.version if self.current else None
        if target is None or target == have or target in self._refused \
                or time.monotonic() < self._retry_at:
            return False
        t0 = time.perf_counter()
        current = self.current
        try:
            snapshot = self.store.load(target, base=current.snapshot if current else None,
                                       tables=T.SERVED)
        except (CorruptSnapshot, OSError, ValueError) as exc:
            self._failed(target, exc, have)
            return False
        if snapshot is None:
            return False
        new_state = ServingState(snapshot, current, self.index_kind, self.nprobe,
                                 self.content_alpha, self.vector_dtype)
        self._backoff_s = 0.0
        self.current = new_state  # the swap: one reference, atomic under the GIL
        load_s = time.perf_counter() - t0
        m = new_state.manifest
        self.history.append(Swap(m.version, m.kind, m.created_at, new_state.loaded_at,
                                 m.watermark, m.counts.get("events"), load_s))
        if self.on_swap is not None:
            self.on_swap(new_state)
        if self.metrics:
            self.metrics.observe_swap(new_state, load_s)
        log.info("serving version %d (watermark %s)", new_state.version,
                 new_state.manifest.watermark)
        return True

    def _failed(self, target: int, exc: Exception, have: int | None) -> None:
        """Refuse ``target`` for good on a checksum or format error; retry anything else.

        A version pruned while it was being read, or an I/O error of the
        store, says nothing about the version: it is retried with a doubling
        backoff (up to 5 s). A version whose manifest is still there but whose
        bytes do not verify is refused and counted.
        """
        transient = not isinstance(exc, CorruptSnapshot) or \
            not self.store.backend.exists(self.store.version_dir(target) + "/manifest.json")
        if transient:
            self._backoff_s = min(5.0, max(0.05, self._backoff_s * 2))
            self._retry_at = time.monotonic() + self._backoff_s
            log.warning("loading version %s failed (%s): retrying in %.2f s (still serving %s)",
                        target, exc, self._backoff_s, have)
            return
        self._refused.add(target)
        log.error("refusing snapshot version %s: %s (still serving %s)", target, exc, have)
        if self.metrics:
            self.metrics.refused.inc()

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


def plan_on_newest(watcher: SnapshotWatcher, user_id: str, overlay: Overlay | None
                   ) -> tuple[ServingState, Plan] | None:
    """The state an answer is planned on, and its plan; ``None`` before any version.

    When a swap comes between reading the state and planning, the overlay has
    already dropped the clicks the newer version covers: plan again on it.
    """
    while True:
        current = watcher.current
        if current is None:
            return None
        plan = current.plan(user_id, overlay)
        if not plan.stale:
            return current, plan
