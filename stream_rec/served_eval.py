"""Prequential ranks through the served state: what a server answers, not the model in process.

For each tested event, the model's state as of that event is published through
a :class:`~stream_rec.snapshot.SnapshotStore` (a delta of the rows that changed
since the previous publication, a full version every ``full_every``), a
:class:`~stream_rec.serving.state.SnapshotWatcher` loads it over the version it
holds, exactly as a server does (verify, apply, refresh a copy of the index),
and the event's item is ranked in the answer
:meth:`~stream_rec.serving.state.ServingState.recommend` gives its user. One
:class:`ServedConfig` per way of serving: how the store writes the vectors,
how the server holds them, which index kind it searches.

Versions are published just before each tested event, so the served state
has no lag: with float32 everywhere and an exact index the served ranks are
the model's own, and any difference between configurations is the encoding's
(or the index's) alone. :func:`stream_rec.evaluation.run_eval` runs it when
given ``served`` (``stream-rec eval --served float32,int8``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_rec.index.item_index import KINDS
from stream_rec.model import ModelState, delta_from_state, quant
from stream_rec.model import tables as T
from stream_rec.model.delta import seen_slices
from stream_rec.ranking import K, Metrics
from stream_rec.serving.state import SnapshotWatcher
from stream_rec.snapshot import Manifest, SnapshotStore


@dataclass(frozen=True)
class ServedConfig:
    """One way of serving: the store's and the server's vector dtypes and the index kind."""

    store_dtype: quant.Encoding = "float32"
    serve_dtype: quant.Encoding = "float32"
    index: str = "flat"

    @property
    def name(self) -> str:
        dtypes = self.store_dtype if self.store_dtype == self.serve_dtype \
            else f"{self.store_dtype}>{self.serve_dtype}"
        return dtypes if self.index == "flat" else f"{dtypes}:{self.index}"

    @classmethod
    def parse(cls, spec: str) -> ServedConfig:
        """``DTYPE[:INDEX]`` (store and server alike) or ``STORE>SERVE[:INDEX]``."""
        dtypes, _, index = spec.strip().partition(":")
        store, _, serve = dtypes.partition(">")
        serve = serve or store
        for d in (store, serve):
            if d not in quant.DTYPES:
                raise ValueError(f"{spec!r}: vector dtype {d!r} is not one of {quant.DTYPES}")
        index = index or "flat"
        if index not in KINDS:
            raise ValueError(f"{spec!r}: index {index!r} is not one of {KINDS}")
        return cls(store, serve, index)  # type: ignore[arg-type]


def changed_rows(old: ModelState | None, new: ModelState) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, item rows) int64 whose ids, row tables or seen lists differ in ``new``."""
    nu, ni = len(new.user_ids), len(new.item_ids)
    if old is None:
        return np.arange(nu, dtype=np.int64), np.arange(ni, dtype=np.int64)
    masks = {"user": np.zeros(nu, dtype=bool), "item": np.zeros(ni, dtype=bool)}
    for kind, a, b in (("user", old.user_ids, new.user_ids), ("item", old.item_ids, new.item_ids)):
        n = min(len(a), len(b))
        masks[kind][n:] = True
        if n:
            masks[kind][:n] = np.asarray(a[:n], dtype=object) != np.asarray(b[:n], dtype=object)
    for name, arr in new.tables.items():
        kind = T.kind(name)
        if kind == "global" or name not in old.tables:
            continue
        prev = old.tables[name]
        n = min(len(arr), len(prev))
        masks[kind][:n] |= (arr[:n] != prev[:n]).reshape(n, -1).any(axis=1)
    old_ptr, new_ptr = old.tables[T.SEEN_PTR], new.tables[T.SEEN_PTR]
    n = min(len(old_ptr), len(new_ptr)) - 1
    other_len = np.diff(old_ptr)[:n] != np.diff(new_ptr)[:n]
    masks["user"][:n] |= other_len
    same_len = np.flatnonzero(~other_len)
    _, a_items = seen_slices(old_ptr, old.tables[T.SEEN_ITEMS], same_len)
    ptr, b_items = seen_slices(new_ptr, new.tables[T.SEEN_ITEMS], same_len)
    differ = np.flatnonzero(a_items != b_items)
    if len(differ):
        masks["user"][same_len[np.searchsorted(ptr, differ, side="right") - 1]] = True
    return np.flatnonzero(masks["user"]), np.flatnonzero(masks["item"])


def _scratch() -> str:
    """A directory for the stores: in memory (tmpfs) where there is one, so that thousands
    of versions cost no disk flushes. A local store, not ``memory://``: fsspec's memory
    filesystem lists a folder by scanning every file it holds."""
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix="served-eval-",
                            dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)


class ServedRanker:
    """One served configuration: its own store (a scratch directory) and watcher."""

    def __init__(self, cfg: ServedConfig, full_every: int) -> None:
        self.cfg = cfg
        self.full_every = full_every
        self.root = _scratch()
        self.store = SnapshotStore(self.root, keep_versions=2, vector_dtype=cfg.store_dtype)
        self.watcher = SnapshotWatcher(self.store, index_kind=cfg.index,
                                       vector_dtype=cfg.serve_dtype)
        self.parent: Manifest | None = None
        self.vector_bytes = 0  # bytes of the vectors the server holds, at the last swap

    def publish(self, state: ModelState, users: np.ndarray, items: np.ndarray) -> None:
        """Publish ``state`` (a delta of ``users``/``items`` over the last one) and swap it in."""
        if self.parent is None or self.parent.chain + 1 >= self.full_every:
            self.parent = self.store.publish(state, offsets={}, watermark=None)
        else:
            self.parent = self.store.publish_delta(
                delta_from_state(state, users, items), parent=self.parent, offsets={},
                watermark=None)
        if not self.watcher.poll_once():
            raise RuntimeError(f"{self.cfg.name}: version {self.parent.version} not swapped in")
        assert self.watcher.current is not None
        self.vector_bytes = quant.nbytes(self.watcher.current.state.tables)

    def answer(self, user: str, k: int) -> list[str]:
        """The item ids the server answers ``user`` with, best first."""
        current = self.watcher.current
        assert current is not None
        return [x["item_id"] for x in current.recommend(user, k)["items"]]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class ServedRankers:
    """Every configuration, fed one export of the model per tested event."""

    def __init__(self, configs: Sequence[ServedConfig], full_every: int = 100) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"served configurations repeat: {names}")
        self.rankers = [ServedRanker(c, full_every) for c in configs]
        self._last: ModelState | None = None
        # a line per swap would be thousands of lines per run
        logging.getLogger("stream_rec.serving.state").setLevel(logging.WARNING)

    def ranks(self, model: Any, user: str, item: str, k: int
              ) -> dict[str, tuple[int | None, list[str]]]:
        """Per configuration: the rank of ``item`` in ``user``'s served answer (None: absent
        or unknown item) and the top ``k`` item ids, with ``model`` published first."""
        state = model.state()
        users, items = changed_rows(self._last, state)
        self._last = state
        out = {}
        for r in self.rankers:
            r.publish(state, users, items)
            answer = r.answer(user, max(k, len(state.item_ids)))
            rank = answer.index(item) if item in answer else None
            out[r.cfg.name] = (rank, answer[:k])
        return out

    def close(self) -> None:
        for r in self.rankers:
            r.close()


class ServedMetrics:
    """HR@10, NDCG@10 and MRR through the served state, one set per configuration, and how
    often (and how much) each served top-10 is the model's own."""

    def __init__(self, specs: Sequence[str], full_every: int = 100) -> None:
        self.rankers = ServedRankers([ServedConfig.parse(s) for s in specs], full_every)
        self.metrics = {r.cfg.name: Metrics() for r in self.rankers.rankers}
        self.same = dict.fromkeys(self.metrics, 0)
        self.overlap = dict.fromkeys(self.metrics, 0)

    def test(self, model: Any, user: str, item: str, mine: list[str]) -> None:
        """Rank ``item`` for ``user`` in every configuration; ``mine``: the model's top-10."""
        for name, (rank, top) in self.rankers.ranks(model, user, item, K).items():
            self.metrics[name].add(rank)
            self.same[name] += top == mine
            self.overlap[name] += len(set(top) & set(mine))

    def result(self) -> dict[str, dict[str, Any]]:
        """Per configuration name: the metrics, the agreement with the model, the bytes held."""
        self.rankers.close()
        out = {}
        for r in self.rankers.rankers:
            name = r.cfg.name
            m = self.metrics[name]
            res: dict[str, Any] = dict(m.result())
            res.pop("events_per_s")
            res.update(top10_same_as_model=self.same[name] / max(m.n, 1),
                       overlap_at_10_with_model=self.overlap[name] / max(K * m.n, 1),
                       store_dtype=r.cfg.store_dtype, serve_dtype=r.cfg.serve_dtype,
                       index=r.cfg.index, served_vector_bytes=r.vector_bytes)
            out[name] = res
        return out
