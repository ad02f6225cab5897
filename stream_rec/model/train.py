"""The slow path: sampled-softmax gradient steps on a completed training chunk.

Each step scores the chunk's events (plus events replayed from the ring)
against candidate items -- every in-batch target and uniform negatives -- and
applies row-wise Adagrad to only the rows it touched.

The work is split in two so that the host can run ahead of the device:

* :func:`prepare_chunk` (host, numpy) draws replayed events and negatives and
  turns the chunk into one packed ``int64`` buffer per step
  (:class:`StepBatch`): rows, inverse indices, history slots, the users' seen
  items, weights and the prior, padded to a bucketed :class:`StepShape`.
  Nothing in it depends on the parameters.
* :meth:`Trainer.run` (device, :mod:`.step`) sends each buffer in one
  asynchronous copy and runs the explicit-gradient step on it: on CPU eagerly,
  on CUDA as a captured graph replayed per shape.

Row numbers in a buffer are table rows + 1: 0 is the tables' scratch row
(:class:`~stream_rec.model.params.Params`), which pads every row list and
stands for an empty history slot, so a buffer stays valid when the tables
grow between its preparation and its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .buffers import Events, ReplayRing
from .config import ModelConfig
from .params import n_buckets
from .seen import SeenLists

MASKED = -1e4   # logit of an excluded (event, candidate) cell and of a padding column


@dataclass(frozen=True)
class StepShape:
    """Padded sizes of one step; every list has at least one padding entry.

    ``n`` events, ``h`` history slots, ``q`` distinct users, ``c`` candidates,
    ``t`` item rows whose history-side gradient is accumulated (tied: history
    rows and candidates; untied: history rows), ``k`` shared negatives (0: every
    candidate is a negative of every event), ``s`` (user, seen item) pairs (0:
    no seen mask). ``csr``: the history side is computed with sparse (CSR)
    products (fast on CPU) rather than gathers and ``index_add_`` (see
    :class:`Plan`). ``x``: items have text vectors, so the step trains on
    effective rows ``free + x W`` and updates W (:mod:`.step`); without, it is
    exactly the step of a model without content.
    """

    n: int
    h: int
    q: int
    c: int
    t: int
    k: int
    s: int
    csr: bool = False
    x: bool = False


def layout(shape: StepShape, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Where each field lies in a step's ``int64`` buffer: name -> (start, length).

    Integer fields are ``int64`` words; the ``f32`` region holds the float32
    fields back to back (``f32:<name>`` -> (start, length) in float32 units
    within it). The one definition shared by the packer and the device step.
    """
    s = shape
    nh = s.n * s.h
    ints = [("user_of", s.n), ("users", s.q), ("hist", nh), ("hist_local", nh), ("slot", nh),
            ("cand", s.c), ("label", s.n), ("rows", s.t)]
    if cfg.tied:
        ints.append(("cand_local", s.c))
    if s.k:
        ints.append(("shared", s.k))
    if s.s:
        ints += [("seen_owner", s.s), ("seen_item", s.s)]
    if s.csr:
        ints += [("perm", nh), ("col_t", nh), ("crow_t", s.t + 1)]
    floats = [("weight", s.n), ("prior", s.c)]
    if cfg.tied and cfg.l2 > 0:
        floats.append(("l2coef", s.t))
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, n in ints:
        out[name] = (pos, n)
        pos += n
    fpos = 0
    for name, n in floats:
        out["f32:" + name] = (fpos, n)
        fpos += n
    out["f32"] = (pos, (fpos + 1) // 2)
    out["total"] = (0, pos + (fpos + 1) // 2)
    return out


@dataclass
class StepBatch:
    """One prepared gradient step: its shape and its packed buffer (see :func:`layout`).

    ``users`` / ``items`` are the real table rows it changes (for ``Changed``).
    """

    shape: StepShape
    buf: np.ndarray
    users: np.ndarray
    items: np.ndarray

    def field(self, cfg: ModelConfig, name: str) -> np.ndarray:
        """A view of one field of ``buf`` (for tests and inspection)."""
        lay = layout(self.shape, cfg)
        if name in lay:
            a, n = lay[name]
            return self.buf[a:a + n]
        a, _ = lay["f32"]
        fa, n = lay["f32:" + name]
        return self.buf[a:].view(np.float32)[fa:fa + n]


@dataclass
class PreparedChunk:
    """The ``cfg.steps`` prepared steps of one chunk and every row they change."""

    steps: list[StepBatch]
    users: np.ndarray
    items: np.ndarray


@dataclass(frozen=True)
class Plan:
    """How steps are laid out for a device: padded sizes and the history-side kernels.

    Sizes are rounded up to a multiple of ``granule`` (tight: little wasted
    work, for CPU), or with ``geometric`` to 2^e * {1, 1.25, 1.5, 1.75}, so a
    stream needs only a handful of distinct shapes -- one CUDA graph each.
    ``csr``: history rows through sparse CSR products (several times faster
    than gathers and ``index_add_`` on CPU); off on CUDA, where the gathers are
    cheap and every kernel is capturable.
    """

    granule: int = 16
    geometric: bool = False
    csr: bool = True

    def size(self, n: int) -> int:
        """Padded size >= n + 1 (room for at least one padding entry)."""
        n = n + 1
        if self.geometric and n > 64:
            e = 1 << (n.bit_length() - 3)          # a quarter of the power of two below n
            return -(-n // e) * e
        g = self.granule
        return -(-n // g) * g

    @classmethod
    def for_device(cls, device_type: str) -> Plan:
        cuda = device_type == "cuda"
        return cls(geometric=cuda, csr=not cuda)


class Workspace:
    """Reusable host scratch arrays of one preparing thread (do not share between threads)."""

    def __init__(self) -> None:
        self._present = np.zeros(0, dtype=bool)
        self._pos = np.zeros(0, dtype=np.int64)

    def unique_inverse(self, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``np.unique(x, return_inverse=True)`` for ints in [0, n), without sorting.

        O(len(x)) work plus one scan of n booleans; the arrays are kept between
        calls, so nothing of size n is allocated or cleared per call.
        """
        if len(self._present) < n:
            cap = max(n, 2 * len(self._present))
            self._present = np.zeros(cap, dtype=bool)
            self._pos = np.zeros(cap, dtype=np.int64)
        present = self._present
        present[x] = True
        uniq = np.flatnonzero(present[:n])
        present[uniq] = False
        self._pos[uniq] = np.arange(len(uniq))
        return uniq, self._pos[x]


def prepare_chunk(cfg: ModelConfig, events: Events, replay: ReplayRing, seen: SeenLists,
                  pop: np.ndarray, n_users: int, step: int, plan: Plan | None = None,
                  ws: Workspace | None = None, content: bool = False) -> PreparedChunk:
    """Host part of a chunk's ``cfg.steps`` gradient steps; independent of the parameters.

    Call it when the chunk closes -- after the fast path has applied exactly the
    chunk's events and expiry has run, before the replay ring receives the
    chunk -- so it reads the chunk-end state: ``seen`` (the users' seen sets, for
    ``mask_seen``), ``pop`` (I,) log popularity of the live item rows,
    ``n_users`` and the ring. It only reads them, copies what it keeps, and
    never touches the parameters or the device, so it may run on another
    thread while the device trains earlier chunks; the result is plain numpy,
    picklable, and valid whatever the tables' capacity when it is run. Draws
    are seeded by ``(seed, 2, step)``, so a replay of the stream draws the
    same negatives. ``content``: some items have text vectors (see
    :class:`StepShape`).
    """
    plan = plan or Plan()
    ws = ws or Workspace()
    rng = np.random.default_rng([cfg.seed, 2, step])
    out: list[StepBatch] = []
    for _ in range(cfg.steps):
        batch = events
        k = min(cfg.replay_per_step, replay.size)
        if k > 0:
            batch = batch.concat(replay.draw(rng, k))
        out.append(prepare_step(cfg, batch, rng, seen, pop, n_users, plan, ws, content))
    return PreparedChunk(steps=out, users=np.concatenate([b.users for b in out]),
                         items=np.concatenate([b.items for b in out]))


def prepare_step(cfg: ModelConfig, ev: Events, rng: np.random.Generator,
                 seen: SeenLists, pop: np.ndarray, n_users: int,
                 plan: Plan, ws: Workspace, content: bool = False) -> StepBatch:
    """Negatives, candidates, inverse indices, seen pairs and prior of one step, packed."""
    c = cfg
    live_items = len(pop)
    n_ev, H = ev.hist.shape
    neg = rng.integers(0, live_items, size=c.negatives) if c.negatives else \
        np.zeros(0, dtype=np.int64)
    if len(neg):
        neg = neg[np.isfinite(pop[neg])]
    if c.inbatch_negatives > 0:
        neg = np.concatenate([rng.choice(ev.item, size=c.inbatch_negatives), neg])
    cand, label = ws.unique_inverse(np.concatenate([ev.item, neg]), live_items)
    label = label[:n_ev]
    uu, u_inv = ws.unique_inverse(ev.user, n_users)
    hist = ev.hist.reshape(-1)
    empty = hist < 0
    # history rows (and, tied, the candidates) as one row list; -1 (empty) becomes 0
    both = np.concatenate([hist, cand]) if c.tied else hist
    rows1, inv = ws.unique_inverse(both + 1, live_items + 1)
    has_empty = bool(len(rows1) and rows1[0] == 0)
    rows1 = rows1[int(has_empty):]                   # real rows, + 1
    shared = np.unique(np.searchsorted(cand, neg)) if c.inbatch_negatives > 0 else None
    pairs = seen_pairs(seen, uu) if c.mask_seen else None

    size = plan.size
    shape = StepShape(n=size(n_ev), h=H, q=size(len(uu)), c=size(len(cand)),
                      t=size(len(rows1)), k=size(len(shared)) if shared is not None else 0,
                      s=size(len(pairs[0])) if pairs is not None else 0, csr=plan.csr,
                      x=content)
    lay = layout(shape, c)
    buf = np.zeros(lay["total"][1], dtype=np.int64)
    fbuf = buf[lay["f32"][0]:].view(np.float32)

    def put(name: str, values: np.ndarray, front: bool = False) -> None:
        """Write a field: real values at the end (``front`` padding) or at the start."""
        a, n = lay[name]
        if front:
            buf[a + n - len(values):a + n] = values
        else:
            buf[a:a + len(values)] = values

    def putf(name: str, values: np.ndarray, fill: float = 0.0, front: bool = False) -> None:
        a, n = lay["f32:" + name]
        fbuf[a:a + n] = fill
        if front:
            fbuf[a + n - len(values):a + n] = values
        else:
            fbuf[a:a + len(values)] = values

    # lists are front-padded (pad entries hold row 0 at local index 0); events are
    # back-padded (weight 0, user and label 0, every slot empty)
    pq, pc, pt = shape.q - len(uu), shape.c - len(cand), shape.t - len(rows1)
    put("users", uu + 1, front=True)
    put("user_of", u_inv + pq)
    put("cand", cand + 1, front=True)                # sorted: padding zeros come first
    put("label", label + pc)
    put("rows", rows1, front=True)
    local = np.where(empty, 0, inv[:len(hist)] - has_empty + pt)
    put("hist", hist + 1)
    put("hist_local", local)
    slot = (np.arange(H)[None, :] * n_buckets(c) + ev.bucket).reshape(-1)
    put("slot", np.where(empty, H * n_buckets(c), slot))
    a, n = lay["slot"]
    buf[a + len(slot):a + n] = H * n_buckets(c)       # padding events: empty slots
    if c.tied:
        put("cand_local", inv[len(hist):] - has_empty + pt, front=True)
    if plan.csr:
        # slots grouped by history row: the transposed (rows x events) CSR pattern
        full_local = np.zeros(shape.n * H, dtype=np.int64)
        full_local[:len(local)] = local
        key = full_local.astype(np.uint16) if shape.t <= 1 << 16 else full_local
        perm = np.argsort(key, kind="stable")
        put("perm", perm)
        put("col_t", perm // H)
        a, _ = lay["crow_t"]
        np.cumsum(np.bincount(full_local, minlength=shape.t), out=buf[a + 1:a + 1 + shape.t])
    if shared is not None:
        put("shared", shared + pc, front=True)
    if pairs is not None:
        owner, items = pairs
        put("seen_owner", owner + pq)
        put("seen_item", items + 1)
    putf("weight", ev.weight)
    putf("prior", _prior(c, cand, label, pop), fill=MASKED, front=True)
    if c.tied and c.l2 > 0:
        # L2 on each distinct history row and on each candidate (a row that is both: twice)
        coef = np.zeros(shape.t, dtype=np.float32)
        coef[local[~empty]] = 1.0
        coef[inv[len(hist):] - has_empty + pt] += 1.0
        putf("l2coef", 2.0 * c.l2 * coef)
    items = rows1 - 1 if c.tied else np.concatenate([rows1 - 1, cand])
    return StepBatch(shape=shape, buf=buf, users=uu, items=items)


def _prior(c: ModelConfig, cand: np.ndarray, label: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """Per-candidate logit offset (C,) f32: weighted log popularity, minus logQ."""
    pc = pop[cand]
    prior = c.pop_weight * (pc - pc.max()) if len(cand) else pc
    if c.logq > 0:
        expected = np.bincount(label, minlength=len(cand)) + c.negatives / max(len(pop), 1)
        prior = prior - c.logq * np.log(expected)
    return prior.astype(np.float32)


def seen_pairs(seen: SeenLists, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into ``users``, item row) of every item the step's distinct users have seen.

    The device matches them against the candidates; the host only lists them.
    """
    ptr, items = seen.gather(users)
    return np.repeat(np.arange(len(users)), np.diff(ptr)), items
