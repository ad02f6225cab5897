"""A gang's versions: assembled on rank 0 from every rank's share, restored rank by rank.

One version holds the whole model, whatever the gang's size, in the single
worker's format -- a server, ``snapshots verify`` and a single worker read it
as they read any other. At a publish point:

* every rank ``k`` contributes a :class:`Share`: the :class:`StateDelta` of the
  user rows it owns that changed (all it owns for a full version;
  :func:`user_delta`), its part of the pending chunk and of the replay ring
  with each event's partition (:func:`gang_tables`), and, in test mode, the
  checksum of its replicated tables (:func:`replica_digest`);
* rank 0 assembles the version from its replicated tables and those shares with
  the delta code servers use: :func:`assemble_delta` merges the user deltas
  under its own (:func:`~.delta.merge_deltas`), :func:`assemble_full` applies
  them to its own state (:func:`~.delta.apply_delta`); both put the ranks'
  pending events and replay entries side by side (:func:`combine_gang_tables`).

On a restart every rank loads the same version (:func:`restore_rank`) and takes
the pending events and replay entries of its partitions (p mod W = rank), so a
gang may restart with another size. A version written by a single worker has
no partitions: rank 0 takes its pending events and replay ring.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from . import export
from . import tables as T
from .buffers import COLUMNS, ReplayRing
from .config import ModelConfig, config_of_state, restore_changes
from .delta import StateDelta, apply_delta, merge_deltas, select_rows
from .exchange import Exchange
from .gang import GangModel, share
from .state import ModelState


@dataclass
class Share:
    """What one rank sends rank 0 at a publish point."""

    delta: StateDelta | None            # its owned user rows (None from rank 0)
    gang: dict[str, np.ndarray]         # its pending chunk events and replay entries
    digest: str | None = None           # checksum of its replicated tables (test mode)


def owned(model: GangModel, rows: np.ndarray | None) -> np.ndarray:
    """The rows among ``rows`` (None: all) whose published values this rank holds.

    Its own users; rank 0 also answers for rows no rank has touched since the
    restore (equal on every rank).
    """
    rows = select_rows(rows, model.n_users)
    who = model.owner[rows]
    mine = who == model.rank
    if model.rank == 0:
        mine |= who < 0
    return rows[mine]


def user_delta(model: GangModel, users: np.ndarray) -> StateDelta:
    """The :class:`StateDelta` of user rows ``users`` alone (no item rows, no globals)."""
    urows = select_rows(users, model.n_users)
    tables = export.row_tables(model, urows, np.zeros(0, dtype=np.int64))
    ptr, seen = export.seen_csr(model, urows)
    uids = model.fast.users.ids
    return StateDelta(config=model.cfg.model_dump(), n_users=model.n_users,
                      n_items=model.n_items, user_rows=urows,
                      item_rows=np.zeros(0, dtype=np.int64),
                      user_ids=[uids[r] for r in urows.tolist()], item_ids=[], tables=tables,
                      seen_indptr=ptr, seen_items=seen)


def gang_tables(model: GangModel) -> dict[str, np.ndarray]:
    """This rank's pending chunk events and replay ring (in its layout), with partitions."""
    chunk = model.chunk
    out = chunk.buffer.tables(T.CHUNK, chunk.queued)
    out[T.GANG_CHUNK_PARTITION] = (np.concatenate(model.chunk_part) if model.chunk_part
                                   else np.zeros(0, dtype=np.int64))
    ring = model.replay
    out.update(ring.buffer.tables(T.REPLAY, ring.size))
    out[T.GANG_REPLAY_PARTITION] = model.replay_part[:ring.size].copy()
    out[T.GANG_REPLAY_RINGS] = np.array([[ring.size, ring.pos]], dtype=np.int64)
    return out


def share_of(model: GangModel, changed_users: np.ndarray, full: bool,
             digest: bool = False) -> Share:
    """This rank's :class:`Share` of a delta (or, ``full``, a full) version."""
    delta = None
    if model.rank != 0:
        delta = user_delta(model, owned(model, None if full else changed_users))
    return Share(delta=delta, gang=gang_tables(model),
                 digest=replica_digest(model) if digest else None)


def combine_gang_tables(gangs: list[dict[str, np.ndarray]], cfg: ModelConfig
                        ) -> dict[str, np.ndarray]:
    """Every rank's pending events and replay entries, in rank order, as global tables.

    A single worker restoring the version reads them as its chunk and ring (the
    whole gang's pending events are fewer than a chunk, its rings hold at most
    ``replay`` entries).
    """
    names = [T.CHUNK + c for c in COLUMNS] + [T.REPLAY + c for c in COLUMNS] + \
        [T.GANG_CHUNK_PARTITION, T.GANG_REPLAY_PARTITION, T.GANG_REPLAY_RINGS]
    out = {name: np.concatenate([g[name] for g in gangs]) for name in names}
    n = len(out[T.REPLAY + "user"])
    out[T.REPLAY_POS] = np.array([n % cfg.replay if cfg.replay else 0], dtype=np.int64)
    return out


def assemble_delta(own: StateDelta, shares: list[Share], cfg: ModelConfig) -> StateDelta:
    """Rank 0's delta (items, globals, its users) with every other rank's user rows."""
    others = [s.delta for s in shares[1:] if s.delta is not None]
    merged = merge_deltas(others + [own]) if others else own
    merged.tables.update(combine_gang_tables([s.gang for s in shares], cfg))
    return merged


def assemble_full(own: ModelState, shares: list[Share], cfg: ModelConfig) -> ModelState:
    """Rank 0's full state with every other rank's user rows written over it."""
    gang = combine_gang_tables([s.gang for s in shares], cfg)
    others = [s.delta for s in shares[1:] if s.delta is not None]
    if not others:
        own.tables.update(gang)
        return own
    users = merge_deltas(others)
    globals_ = {k: v for k, v in own.tables.items()
                if T.kind(k) == "global" and k not in T.RAGGED}
    users.tables.update(globals_)
    users.tables.update(gang)
    users.n_users, users.n_items = len(own.user_ids), len(own.item_ids)
    users.config = dict(own.config)
    return apply_delta(own, users)


def replica_digest(model: GangModel) -> str:
    """Checksum of everything every rank must hold identically (bitwise).

    Item rows and their accumulators, counters and popularity; slot weights
    and the transition; the id tables, free rows and admission counts; every
    user's counters; the step, the reference time, the watermark and the
    chunk's fill and new rows.
    """
    h = hashlib.blake2b(digest_size=16)
    p, f, ni, nu = model.params, model.fast, model.n_items, model.n_users

    def put(a: np.ndarray) -> None:
        h.update(np.ascontiguousarray(a).tobytes())

    for name in p.ITEM_ROWS:
        put(p.full[name][:ni + 1].detach().cpu().numpy())
    for t in (p.pos_w, p.pos_acc, p.transition, p.transition_acc):
        put(t.detach().cpu().numpy())
    for a in (f.i_events[:ni], f.i_last[:ni], f.pop[:ni], f.u_events[:nu], f.u_last[:nu]):
        put(a)
    for table in (f.users, f.items):
        h.update("\x00".join(table.ids).encode())
        put(np.asarray(table.free, dtype=np.int64))
        for a in table.pending_tables():
            put(a)
    put(np.array([model.step, f.t_ref or -1, f.watermark or -1, model.chunk.filled],
                 dtype=np.int64))
    put(np.asarray(model.chunk.new_users + [-1] + model.chunk.new_items, dtype=np.int64))
    return h.hexdigest()


def restore_rank(state: ModelState, exchange: Exchange, device: str = "auto",
                 cfg: ModelConfig | None = None) -> GangModel:
    """Rank ``exchange.rank``'s model from a version (any gang size wrote it, or a worker).

    Everything replicated is loaded whole; of the pending chunk and the replay
    ring the rank keeps the events of its partitions (the newest that fit its
    ring), and every rank notes the same owners for those events' users.
    """
    old = config_of_state(state.config)
    if cfg is not None:
        restore_changes(old, cfg, export.chunk_filled(state))
    model = GangModel(cfg or old, device=device, exchange=exchange)
    export.restore(model, state, old)
    t = state.tables
    W, r = model.world, model.rank
    chunk_parts = t.get(T.GANG_CHUNK_PARTITION)
    n_chunk = len(t.get(T.CHUNK + "user", ()))
    model.chunk_learned = n_chunk
    if T.GANG_REPLAY_RINGS not in t and W == 1:
        # a single worker's version: restored exactly as the worker would
        model.chunk_part = [np.full(n_chunk, -1, dtype=np.int64)]
        return model
    if chunk_parts is None:
        chunk_parts = np.full(n_chunk, -1, dtype=np.int64)
    rank_of = np.where(chunk_parts >= 0, chunk_parts % W, 0)
    mine = rank_of == r
    chunk = model.chunk
    chunk.buffer.load({T.CHUNK + c: t[T.CHUNK + c][mine] for c in COLUMNS}, T.CHUNK)
    chunk.queued = int(mine.sum())
    model.chunk_part = [chunk_parts[mine]]
    if n_chunk:
        model.owner[t[T.CHUNK + "user"]] = rank_of
    _restore_ring(model, t, old)
    return model


def _restore_ring(model: GangModel, t: dict[str, np.ndarray], built_with: ModelConfig) -> None:
    """This rank's replay entries: its own ring as it was when the gang had this size, else
    the entries of its partitions, oldest first, the newest that fit."""
    n = len(t.get(T.REPLAY + "user", ()))
    W, r = model.world, model.rank
    cap = model.replay.capacity
    rings = t.get(T.GANG_REPLAY_RINGS)
    if rings is None:   # a worker's ring: oldest first from its next write
        pos = int(t[T.REPLAY_POS][0]) if T.REPLAY_POS in t else 0
        segments = [((pos + np.arange(n)) % n if n and n >= built_with.replay
                     else np.arange(n))]
        parts = np.full(n, -1, dtype=np.int64)
    else:
        parts = t[T.GANG_REPLAY_PARTITION]
        starts = np.concatenate([[0], np.cumsum(rings[:, 0])])
        if len(rings) == W and built_with.replay == model.cfg.replay:
            # the same gang size: rank r's ring, layout and all
            lo, (size, pos) = int(starts[r]), rings[r]
            _load_ring(model, t, parts, np.arange(lo, lo + size), int(pos))
            _note_owners(model, t, parts)
            return
        segments = []
        for k, (size, pos) in enumerate(rings.tolist()):
            full = size == share(built_with.replay, k, len(rings))
            order = (pos + np.arange(size)) % size if full and size else np.arange(size)
            segments.append(int(starts[k]) + order)
    order = np.concatenate(segments) if segments else np.zeros(0, dtype=np.int64)
    rank_of = np.where(parts >= 0, parts % W, 0)
    sel = order[rank_of[order] == r]
    sel = sel[max(0, len(sel) - cap):]
    _load_ring(model, t, parts, sel, len(sel) % cap if cap else 0)
    _note_owners(model, t, parts)


def _load_ring(model: GangModel, t: dict[str, np.ndarray], parts: np.ndarray,
               sel: np.ndarray, pos: int) -> None:
    cap = model.replay.capacity
    ring = ReplayRing(cap, model.cfg.history)
    if cap:
        ring.load({T.REPLAY + c: t[T.REPLAY + c][sel] for c in COLUMNS}, T.REPLAY, pos, cap)
    model.replay = ring
    model.replay_part = np.full(cap, -1, dtype=np.int64)
    model.replay_part[:len(sel)] = parts[sel]


def _note_owners(model: GangModel, t: dict[str, np.ndarray], parts: np.ndarray) -> None:
    """Every rank notes the same owner for the users of every restored replay entry."""
    if len(parts):
        model.owner[t[T.REPLAY + "user"]] = np.where(parts >= 0, parts % model.world, 0)
