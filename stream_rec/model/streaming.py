"""Two-speed streaming recommender.

Fast path (per event, numpy/Python, microseconds; :mod:`.fastpath`): id -> row
mapping with admission and growth, the user's recent-items history and seen
set, event counters and the item's decayed popularity. Because the query is a
mix of the user's most recent items, a click changes its user's next answer at
once, before any gradient step.

Slow path (per training chunk, torch on ``cpu`` or ``cuda``; :mod:`.train`): a
few sampled-softmax gradient steps (in-batch targets + uniform negatives, plus
events replayed from a small buffer of recent ones) with row-wise Adagrad on
only the rows touched.

:class:`StreamingModel` ties them together: it cuts the stream into fixed
chunks, initialises new rows and expires idle ones at each chunk's end, and
reports the rows every call changed. Export and restore live in
:mod:`.export`, in-memory scoring in :mod:`.scoring`. See ``docs/MODEL.md``
for the design and measured ablations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from . import content, export, scoring
from .buffers import Events
from .config import ModelConfig, config_of_state, restore_changes
from .core import ModelCore, resolve_device
from .delta import StateDelta
from .expiry import expire
from .state import Changed, ModelState

__all__ = ["StreamingModel", "resolve_device"]

log = logging.getLogger(__name__)


class StreamingModel(ModelCore):
    """Streaming two-tower model whose user tower reads the user's recent items.

    The state is :class:`~stream_rec.model.core.ModelCore`'s. Not thread-safe: call :meth:`learn`,
    :meth:`recommend` and :meth:`state` from one thread; hand the
    :class:`ModelState` returned by :meth:`state` to others.
    """

    # ------------------------------------------------------------------ learn
    def learn(self, user_ids: Sequence[str], item_ids: Sequence[str], ts_ms: np.ndarray,
              weights: np.ndarray | None = None,
              before_event: Callable[[int], None] | None = None) -> Changed:
        """Apply events in stream order; train on every chunk they complete.

        The fast path runs event by event. Gradient steps run on fixed chunks of
        ``cfg.train_chunk`` events counted from the start of the stream, so the
        result does not depend on how the stream is split into calls (a replay
        or a restart with other micro-batch boundaries ends in the same state,
        bitwise on CPU). Events of an incomplete chunk wait in the state.
        ``before_event(j)``, when given, is called before event ``j`` of this
        call touches any state -- the prequential evaluator uses it to test each
        event against the state it would have been served from. ``ts_ms`` (N,)
        int64 event time in ms; ``weights`` (N,) float, default 1.
        """
        n = len(user_ids)
        ts = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
        w_in = (np.ones(n, dtype=np.float32) if weights is None
                else np.asarray(weights, dtype=np.float32).reshape(-1))
        if len(item_ids) != n or len(ts) != n or len(w_in) != n:
            raise ValueError("user_ids, item_ids, ts_ms and weights must have equal length")
        C = self.cfg.train_chunk
        ch_u: list[np.ndarray] = []
        ch_i: list[np.ndarray] = []
        s = 0
        while s < n:
            e = min(n, s + C - self.chunk.filled)
            cb = None if before_event is None else (
                lambda j, s=s: before_event(j + s))  # type: ignore[misc]
            events, new_u, new_i = self.fast.apply(user_ids[s:e], item_ids[s:e], ts[s:e],
                                                   w_in[s:e], cb)
            self.chunk.add(events, new_u, new_i)
            ch_u.extend([events.user, np.asarray(new_u, dtype=np.int64)])
            ch_i.extend([events.item, np.asarray(new_i, dtype=np.int64)])
            self.chunk.filled += e - s
            s = e
            if self.chunk.filled >= C:
                self._end_chunk(ch_u, ch_i)
        self._take_touched(ch_u, ch_i)
        if not ch_u:
            empty = np.zeros(0, dtype=np.int64)
            return Changed(users=empty, items=empty.copy())
        users_c = np.unique(np.concatenate(ch_u)).astype(np.int64)
        items_c = np.unique(np.concatenate(ch_i)).astype(np.int64)
        return Changed(users=users_c[users_c >= 0], items=items_c[items_c >= 0])

    def _take_touched(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """Add the rows changed outside training (expiry, restore cuts) to a call's changed
        rows, and start collecting afresh."""
        if self.touched_users or self.touched_items:
            ch_u.append(np.asarray(self.touched_users, dtype=np.int64))
            ch_i.append(np.asarray(self.touched_items, dtype=np.int64))
            self.touched_users, self.touched_items = [], []

    def _open_rows(self, new_u: np.ndarray, new_i: np.ndarray
                   ) -> tuple[bool, np.ndarray, np.ndarray]:
        """A closed chunk's rows: re-anchor popularity, initialise the new rows, expire idle
        ids. Returns (whether every item row changed by re-anchoring, expired users, items)."""
        all_items_changed = self.fast.reanchor(self.n_items)
        if len(new_u):
            self.params.init_users(new_u.tolist())
        if len(new_i):
            self.params.init_items(new_i.tolist(), self.step)
        exp_u, exp_i = expire(self)
        return all_items_changed, exp_u, exp_i

    @staticmethod
    def _alive(events: Events, exp_u: np.ndarray, exp_i: np.ndarray) -> np.ndarray | None:
        """Which of a chunk's ``events`` keep their rows after expiry (None: all of them);
        expired items leave the events' histories (slot set to -1) in place."""
        if not len(exp_u) and not len(exp_i):
            return None
        if len(exp_i):
            events.hist[np.isin(events.hist, exp_i)] = -1
        return ~(np.isin(events.user, exp_u) | np.isin(events.item, exp_i))

    def _end_chunk(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """Close a full chunk: initialise its new rows, expire idle ids, train, fill replay.

        Appends every row this changes to ``ch_u`` / ``ch_i``.
        """
        events, new_u, new_i = self.chunk.close()
        all_items_changed, exp_u, exp_i = self._open_rows(new_u, new_i)
        alive = self._alive(events, exp_u, exp_i)
        if alive is not None:
            events = events.select(alive)
        ch_u.extend([exp_u, new_u])
        ch_i.extend([exp_i, new_i])
        if len(events):
            tu, ti = self.trainer.train_chunk(events, self.replay, self.fast.seen,
                                              self.fast.pop[:self.n_items], self.n_users,
                                              self.step)
            ch_u.append(tu)
            ch_i.append(ti)
            self.replay.push(events)
        self.step += 1
        if all_items_changed:
            ch_i.append(np.arange(self.n_items, dtype=np.int64))

    def announce(self, item_ids: Sequence[str], vectors: np.ndarray,
                 ts_ms: int | None = None) -> Changed:
        """Catalogue items and their text vectors (B, K): rows before any click.

        See :func:`.content.announce`; the rows it changed are returned like
        :meth:`learn`'s (they belong in the next version).
        """
        items = content.announce(self, item_ids, vectors, ts_ms)
        return Changed(users=np.zeros(0, dtype=np.int64), items=items)

    # ------------------------------------------------------------ in-memory reads
    def score_user(self, user_id: str) -> np.ndarray | None:
        """Scores (I,) float32 of every item row for a known user (seen not removed)."""
        return scoring.score_user(self, user_id)

    def popular_rows(self, k: int) -> np.ndarray:
        """Up to ``k`` live item rows, by decayed popularity."""
        return scoring.popular_rows(self, k)

    def recommend(self, user_id: str, k: int) -> list[tuple[str, float]]:
        """Top-``k`` unseen items for ``user_id``; unknown users get decayed-popular items."""
        return scoring.recommend(self, user_id, k)

    # ---------------------------------------------------------------- state
    def state(self) -> ModelState:
        """A consistent CPU numpy copy of everything (see :class:`ModelState`)."""
        return export.export_state(self)

    def delta(self, users: np.ndarray | None, items: np.ndarray | None) -> StateDelta:
        """The :class:`~stream_rec.model.delta.StateDelta` of rows ``users`` / ``items``.

        Equal field by field (bitwise) to ``delta_from_state(self.state(), users,
        items)``, but it gathers only the requested rows: O(rows + global tables)
        instead of copying every (U, D) and (I, D + 1) table. ``users`` / ``items``
        are int64 row numbers in any order, duplicates and out-of-range rows
        ignored; ``None`` means every row.
        """
        return export.export_delta(self, users, items)

    @classmethod
    def from_state(cls, state: ModelState, device: str = "auto",
                   cfg: ModelConfig | None = None) -> StreamingModel:
        """Exact restore: learning continues as if never interrupted (bitwise on CPU).

        ``cfg`` (the worker passes ``settings.model``) is the configuration to
        continue under; ``None`` keeps the state's. A setting that differs from
        the state's is applied from here on and logged, or, when the state's
        tables depend on it (``config.FIXED_ON_RESTORE``), refused with
        :class:`~stream_rec.model.config.RestoreRefused` naming it. Rows a
        changed bound alters at once (seen lists cut to a smaller ``seen_max``;
        every item's vector under a new ``pop_weight``) are reported by the
        next :meth:`learn`.
        """
        old = config_of_state(state.config)
        changes = [] if cfg is None else restore_changes(old, cfg, export.chunk_filled(state))
        if changes:
            log.info("restoring a state built with other model settings; applying %s",
                     ", ".join(changes))
        model = cls(cfg or old, device=device)
        export.restore(model, state, old)
        return model
