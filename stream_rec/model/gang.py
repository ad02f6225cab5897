"""One model trained by a gang of ranks: users on their owner, items replicated bitwise.

Kafka keys clicks by user, so a user's events all arrive on one partition and,
in a gang of W ranks where rank r reads the partitions p with p mod W = r, on
one rank: the **owner**. What is a user's alone -- history, seen list, user
vector -- lives and is learned on its owner. Everything the users share --
item rows, biases, popularity and counters, slot weights, the id tables, the
step counter -- is **replicated**: every rank holds all of it and applies the
same updates in the same order, so the replicas stay bitwise equal on CPU.

The gang moves in **rounds**; every rank calls :meth:`GangModel.learn_round`
once per round with the events it polled (possibly none). The round's stream
is the ranks' events concatenated in rank order, and it is cut into the same
fixed training chunks a single worker uses (``train_chunk`` events of the
whole gang). For each piece up to a chunk boundary the ranks exchange their
events' known rows, the ids they do not know and the events' times, weights
and partitions (one ``all_gather``); then every rank

* maps the unknown ids of every rank, in rank order then first seen, so the
  id tables (admission counts, row reuse, growth) stay equal;
* applies its own events' user side (history, seen list) -- the fast path's
  compiled loop without the counters;
* applies every rank's events' counters (events, newest times, decayed
  popularity) in rank order, and notes each user's owner.

At a chunk's end every rank initialises the same new rows and expires the same
ids (decided from replicated counters), then trains: each rank prepares its own
events with its share of replayed events and negatives drawn from
``(seed, 2, step, rank)``, applies its users' gradients itself and exchanges
the rest (:mod:`.gang_step`). A rank with no events in the chunk contributes
nothing and waits for nobody longer than one round. A gang of one is the single
worker, bit for bit.

Publishing and restoring a gang (each rank's share of the pending chunk and
replay ring, owned user rows, the replica checksum) is :mod:`.gang_state`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import kernels
from .buffers import Events, ReplayRing
from .config import GANG_WITHOUT_CONTENT, ModelConfig
from .exchange import Exchange
from .gang_step import exchange_step
from .state import Changed
from .step import apply_user_grads, step_grads
from .streaming import StreamingModel
from .train import draw_negatives, prepare_step


def share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total`` split as evenly as possible over ``world`` ranks."""
    return total // world + (1 if rank < total % world else 0)


@dataclass
class Round:
    """What one :meth:`GangModel.learn_round` did, the same on every rank but ``changed``.

    ``notes``: every rank's note, in rank order; ``events``: events the ranks
    brought (valid, learned or not); ``top_ts``: the newest of their times (ms).
    """

    changed: Changed
    notes: list[Any]
    events: int
    top_ts: int | None


class GangModel(StreamingModel):
    """The model as rank ``exchange.rank`` of a gang of ``exchange.world`` holds it.

    ``owner`` (rows,) int32: the rank whose events last touched each user row
    (-1: none since the restore; such rows are equal on every rank). Learning
    goes through :meth:`learn_round` only.
    """

    def __init__(self, cfg: ModelConfig | None = None, device: str = "auto",
                 exchange: Exchange | None = None) -> None:
        if exchange is None:
            raise ValueError("a gang model needs the exchange of its gang")
        super().__init__(cfg, device)
        c = self.cfg
        self.exchange = exchange
        self.rank, self.world = exchange.rank, exchange.world
        if c.content_dim:
            raise ValueError(GANG_WITHOUT_CONTENT)
        if c.shared_rows and self.world > 1:
            raise ValueError("shared_rows > 0 is not supported by a gang of more than one rank "
                             "(shared user rows would be learned on several ranks)")
        self.replay = ReplayRing(share(c.replay, self.rank, self.world), c.history)
        self.replay_part = np.full(self.replay.capacity, -1, dtype=np.int64)
        self.chunk_part: list[np.ndarray] = []   # partitions of the chunk's own learned events
        self.chunk_learned = 0                   # learned events of the gang in the chunk
        self.owner = np.full(self.fast.hist.shape[0], -1, dtype=np.int32)
        grow_params = self.fast._grow_users_hook
        self.fast._grow_users_hook = lambda cap: (grow_params(cap), self._grow_owner(cap))
        self.salt = (self.rank,) if self.world > 1 else ()
        self.draws = share(c.replay_per_step, self.rank, self.world)
        self.negatives = c.negatives if not self.world > 1 or c.inbatch_negatives \
            else share(c.negatives, self.rank, self.world)
        # rounds, chunks and steps so far; seconds of the steps (all of it), of preparing
        # them and of their exchanges (inside the steps)
        self.stats = {"rounds": 0, "chunks": 0, "steps": 0, "step_s": 0.0, "prepare_s": 0.0,
                      "step_exchange_s": 0.0}

    def _grow_owner(self, cap: int) -> None:
        out = np.full(cap, -1, dtype=np.int32)
        out[:len(self.owner)] = self.owner
        self.owner = out

    def learn(self, *args: Any, **kwargs: Any) -> Changed:
        raise TypeError("a gang's rank learns in rounds, with its gang: use learn_round()")

    # ----------------------------------------------------------------- a round
    def learn_round(self, user_ids: Sequence[str], item_ids: Sequence[str], ts_ms: np.ndarray,
                    weights: np.ndarray | None = None, partitions: np.ndarray | None = None,
                    before_event: Callable[[int], None] | None = None,
                    note: Any = None) -> Round:
        """Apply this rank's events of one round, with the gang (a collective call).

        ``partitions`` (N,) int: each event's partition (kept with the events
        the state holds, so a restore under another gang size gives each to its
        new owner; default this rank). ``note``: any small picklable object,
        delivered to every rank in :attr:`Round.notes` (the worker's control
        messages ride on the round's first exchange). ``before_event(j)`` runs
        before event ``j``'s user side; every rank's ids of the piece are
        mapped and the counters of the piece are applied after it.
        """
        n = len(user_ids)
        ts = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
        w = (np.ones(n, dtype=np.float32) if weights is None
             else np.asarray(weights, dtype=np.float32).reshape(-1))
        parts = (np.full(n, self.rank, dtype=np.int64) if partitions is None
                 else np.asarray(partitions, dtype=np.int64).reshape(-1))
        if len(item_ids) != n or len(ts) != n or len(w) != n or len(parts) != n:
            raise ValueError("user_ids, item_ids, ts_ms, weights and partitions must have "
                             "equal length")
        heads = self.exchange.all_gather((n, int(ts.max()) if n else None, note))
        ns = [h[0] for h in heads]
        tops = [h[1] for h in heads if h[1] is not None]
        starts = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
        total = int(starts[-1])
        lo_mine = int(starts[self.rank])
        ch_u: list[np.ndarray] = []
        ch_i: list[np.ndarray] = []
        C = self.cfg.train_chunk
        pos = 0
        while pos < total:
            end = min(total, pos + C - self.chunk.filled)
            a = min(max(pos - lo_mine, 0), n)
            b = min(max(end - lo_mine, 0), n)
            self._piece(user_ids, item_ids, ts, w, parts, a, b, before_event, ch_u, ch_i)
            self.chunk.filled += end - pos
            pos = end
            if self.chunk.filled >= C:
                self._end_chunk(ch_u, ch_i)
        self._take_touched(ch_u, ch_i)
        self.stats["rounds"] += 1
        empty = np.zeros(0, dtype=np.int64)
        users = np.unique(np.concatenate(ch_u)) if ch_u else empty
        items = np.unique(np.concatenate(ch_i)) if ch_i else empty
        return Round(changed=Changed(users=users[users >= 0], items=items[items >= 0]),
                     notes=[h[2] for h in heads], events=total,
                     top_ts=max(tops) if tops else None)

    def _piece(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
               w: np.ndarray, parts: np.ndarray, a: int, b: int,
               before_event: Callable[[int], None] | None,
               ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """Every rank's events of one piece of the round (no chunk boundary inside)."""
        fast = self.fast
        uid, iid = user_ids[a:b], item_ids[a:b]
        m = b - a
        rows_u = np.fromiter((fast.users.index.get(str(x), -2) for x in uid), np.int64, m)
        rows_i = np.fromiter((fast.items.index.get(str(x), -2) for x in iid), np.int64, m)
        unknown = np.flatnonzero((rows_u == -2) | (rows_i == -2))
        pairs = [(str(uid[j]), str(iid[j])) for j in unknown.tolist()]
        gathered = self.exchange.all_gather(
            (rows_u, rows_i, unknown, pairs, ts[a:b], w[a:b], parts[a:b]))
        new_u: list[int] = []
        new_i: list[int] = []
        mapped = []
        for ru, ri, unk, prs, tk, wk, pk in gathered:   # rank order, then first seen
            ru, ri = ru.copy(), ri.copy()
            for j, (u, i) in zip(unk.tolist(), prs):
                ru[j], ri[j] = fast._lookup(u, i, new_u, new_i)
            mapped.append((ru, ri, tk, wk, pk))
        first = next((tk[0] for _, _, tk, _, _ in mapped if len(tk)), None)
        if first is None:
            return
        if fast.t_ref is None:
            fast.t_ref = int(first)
        kept = [(ru >= 0) & (ri >= 0) for ru, ri, _, _, _ in mapped]
        # this rank's events: the user side (history and seen list), in order
        ru, ri, tk, wk, pk = mapped[self.rank]
        keep = np.flatnonzero(kept[self.rank])
        eu, ei, et = ru[keep], ri[keep], tk[keep]
        H = self.cfg.history
        hist_out = np.empty((len(keep), H), dtype=np.int64)
        bucket_out = np.empty((len(keep), H), dtype=np.int64)
        if before_event is None:
            self._user_side(0, len(keep), eu, ei, et, hist_out, bucket_out)
        else:
            k = 0
            for j in range(m):
                before_event(a + j)
                if k < len(keep) and keep[k] == j:
                    self._user_side(k, k + 1, eu, ei, et, hist_out, bucket_out)
                    k += 1
        # every rank's events: counters in rank order, owners, the watermark
        all_u = np.concatenate([m_[0][k_] for m_, k_ in zip(mapped, kept)])
        all_i = np.concatenate([m_[1][k_] for m_, k_ in zip(mapped, kept)])
        all_t = np.concatenate([m_[2][k_] for m_, k_ in zip(mapped, kept)])
        all_w = np.concatenate([m_[3][k_] for m_, k_ in zip(mapped, kept)])
        kernels.count_events(all_u, all_i, all_t, fast.pop_mass(all_t, all_w), fast.u_events,
                             fast.i_events, fast.u_last, fast.i_last, fast.pop)
        for r, (m_, k_) in enumerate(zip(mapped, kept)):
            self.owner[m_[0][k_]] = r
        if len(all_t):
            base = fast.watermark if fast.watermark is not None else int(first)
            fast.watermark = max(base, int(all_t.max()))
        elif fast.watermark is None:
            fast.watermark = int(first)
        events = Events(user=eu, item=ei, weight=wk[keep], hist=hist_out, bucket=bucket_out)
        self.chunk.add(events, new_u, new_i)
        self.chunk_part.append(pk[keep])
        self.chunk_learned += len(all_t)
        ch_u.extend([eu, np.asarray(new_u, dtype=np.int64)])
        ch_i.extend([all_i, np.asarray(new_i, dtype=np.int64)])

    def _user_side(self, start: int, stop: int, eu: np.ndarray, ei: np.ndarray, et: np.ndarray,
                   hist_out: np.ndarray, bucket_out: np.ndarray) -> None:
        """The fast path's user side of this rank's events ``start .. stop - 1``."""
        f, s = self.fast, self.fast.seen
        while start < stop:
            start = kernels.apply_user_events(
                start, stop, eu, ei, et, f.users.shared, f.items.shared, f.hist, f.hist_ts,
                f._edges, hist_out, bucket_out, s.off, s.length, s.cls, s.arena, s.sizes,
                s.free_head, s.meta, s.limit)
            if start < stop:
                s.reserve_arena()

    # --------------------------------------------------------------- chunk end
    def _end_chunk(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """:meth:`StreamingModel._end_chunk` for a gang: the same rows initialised and
        expired on every rank, then the gang's training step."""
        events, new_u, new_i = self.chunk.close()
        parts = np.concatenate(self.chunk_part) if self.chunk_part else np.zeros(0, np.int64)
        self.chunk_part = []
        learned, self.chunk_learned = self.chunk_learned, 0
        all_items_changed, exp_u, exp_i = self._open_rows(new_u, new_i)
        alive = self._alive(events, exp_u, exp_i)
        if alive is not None:
            events, parts = events.select(alive), parts[alive]
            self.owner[exp_u] = -1
        ch_u.extend([exp_u, new_u])
        ch_i.extend([exp_i, new_i])
        if learned:
            tu, ti = self._train(events)
            ch_u.append(tu)
            ch_i.append(ti)
            if len(events):
                self._push_replay(events, parts)
        self.step += 1
        self.stats["chunks"] += 1
        if all_items_changed:
            ch_i.append(np.arange(self.n_items, dtype=np.int64))

    def _train(self, events: Events) -> tuple[np.ndarray, np.ndarray]:
        """The gang's steps on this rank's events of the chunk; (users, items) changed.

        Each step: this rank draws its share of the replayed events and of the
        uniform negatives from ``(seed, 2, step, rank)``; the ranks exchange
        their steps' targets and negatives, and every rank scores its events
        against all of them -- the candidates one worker would score its whole
        chunk against; then the gradients are exchanged
        (:func:`~.gang_step.exchange_step`). Draws follow
        :func:`~.train.prepare_chunk`'s order, so a gang of one prepares exactly
        the single worker's steps. (With ``inbatch_negatives`` > 0 each rank
        keeps its own candidates.)
        """
        cfg, p, ex = self.cfg, self.params, self.exchange
        trainer = self.trainer
        rng = np.random.default_rng([cfg.seed, 2, self.step, *self.salt])
        pop = self.fast.pop[:self.n_items]
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        empty = np.zeros(0, dtype=np.int64)
        pooled = self.world > 1 and cfg.inbatch_negatives == 0
        for _ in range(cfg.steps):
            t0, x0 = time.perf_counter(), ex.seconds
            batch, neg = None, empty
            if len(events):
                batch = events
                k = min(self.draws, self.replay.size)
                if k > 0:
                    batch = batch.concat(self.replay.draw(rng, k))
                neg = draw_negatives(rng, pop, self.negatives)
            extra = None
            if pooled:
                mine = np.unique(np.concatenate([batch.item, neg])) if batch is not None \
                    else empty
                theirs = [t.cpu().numpy().view(np.int64) for t in ex.all_gather_bytes(
                    torch.from_numpy(np.ascontiguousarray(mine).view(np.uint8)).to(p.device))]
                extra = np.unique(np.concatenate(theirs))
            g = None
            if batch is not None:
                t1 = time.perf_counter()
                b = prepare_step(cfg, batch, rng, self.fast.seen, pop, self.n_users,
                                 trainer.plan, trainer.ws, neg=neg, extra_cand=extra)
                self.stats["prepare_s"] += time.perf_counter() - t1
                users.append(b.users)
                g = step_grads(p, cfg, b.shape, p.to_device(b.buf))
                apply_user_grads(p, cfg, g)
            applied = exchange_step(ex, p, cfg, g)
            if applied is not None:
                items += [applied.rows.cpu().numpy() - 1, applied.cand.cpu().numpy() - 1]
            self.stats["step_s"] += time.perf_counter() - t0
            self.stats["step_exchange_s"] += ex.seconds - x0
            self.stats["steps"] += 1
        return (np.concatenate(users) if users else empty,
                np.concatenate(items) if items else empty)

    def _push_replay(self, events: Events, parts: np.ndarray) -> None:
        """Push onto this rank's ring, keeping each slot's partition beside it."""
        ring = self.replay
        R = ring.capacity
        if R <= 0:
            return
        if len(parts) > R:
            parts = parts[len(parts) - R:]
        self.replay_part[(ring.pos + np.arange(len(parts))) % R] = parts
        ring.push(events)
