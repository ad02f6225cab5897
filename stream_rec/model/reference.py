"""The autograd formulation of the training step: the specification :mod:`.step` is
tested against, and the baseline ``scripts/bench_train.py --step autograd``
measures. The model does not use it.

It is the step as it was before gradients were written out: the host prepares
rows, inverse indices and the masked (event, candidate) cells; the device
builds the loss and lets ``torch.autograd.grad`` differentiate it. Its draws
(replay, negatives) come from the same generator in the same order as
:func:`~stream_rec.model.train.prepare_chunk`'s, so both formulations see the
same steps and differ only by float rounding. On CPU with more than one thread
it is not bitwise reproducible: the backward of its row gathers is a parallel
``index_put_(accumulate=True)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .buffers import Events, ReplayRing
from .config import ModelConfig
from .params import Params, n_buckets
from .seen import SeenLists


@dataclass
class AutogradBatch:
    """One gradient step over N events with history length H, prepared on the host.

    ``users`` (Q,) distinct user rows and ``user_of`` (N,) each event's index in
    it; ``hist_rows`` (R,) distinct item rows of the histories and
    ``hist_index`` (N * H,) each slot's index into ``hist_rows`` -- shifted by
    one when ``has_pad``, index 0 then being the empty slot (a zero row);
    ``slot_weight`` (N * H,) each slot's index into the flattened (H, NB)
    slot weights. ``cand`` (C,) candidate item rows, ``label`` (N,) each
    event's target in ``cand``, ``prior`` (C,) f32 added to the logits,
    ``weight`` (N,) f32. ``shared`` (K,) indexes the candidates used as
    negatives for every event (the event's own target is then scored apart),
    ``None`` scoring all C. ``mask_rows`` / ``mask_cols`` name (event, logit
    column) cells excluded from the softmax.
    """

    users: np.ndarray
    user_of: np.ndarray
    hist_rows: np.ndarray
    hist_index: np.ndarray
    has_pad: bool
    n: int
    h: int
    slot_weight: np.ndarray
    cand: np.ndarray
    label: np.ndarray
    prior: np.ndarray
    weight: np.ndarray
    shared: np.ndarray | None
    mask_rows: np.ndarray
    mask_cols: np.ndarray


class ReferenceTrainer:
    """Drop-in for :class:`~stream_rec.model.train.Trainer` (``model.trainer``) that
    trains with the autograd step."""

    def __init__(self, cfg: ModelConfig, params: Params) -> None:
        self.cfg = cfg
        self.params = params
        self.stats = {"chunks": 0, "steps": 0, "prepare_s": 0.0, "step_s": 0.0}

    def train_chunk(self, events: Events, replay: ReplayRing, seen: SeenLists,
                    pop: np.ndarray, n_users: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        out = train_chunk(self.params, self.cfg, events, replay, seen, pop, n_users, step)
        self.stats["step_s"] += time.perf_counter() - t0
        self.stats["chunks"] += 1
        self.stats["steps"] += self.cfg.steps
        return out


def train_chunk(params: Params, cfg: ModelConfig, events: Events, replay: ReplayRing,
                seen: SeenLists, pop: np.ndarray, n_users: int, step: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.steps`` gradient steps on a chunk's ``events``; returns (users, items) touched.

    ``pop`` (I,) is the log popularity of the live item rows; ``seen`` the
    users' seen sets (for ``mask_seen``). Draws are seeded by ``(seed, 2,
    step)``, so a replay of the stream draws the same negatives.
    """
    rng = np.random.default_rng([cfg.seed, 2, step])
    touched_u: list[np.ndarray] = []
    touched_i: list[np.ndarray] = []
    for _ in range(cfg.steps):
        batch = events
        k = min(cfg.replay_per_step, replay.size)
        if k > 0:
            batch = batch.concat(replay.draw(rng, k))
        prepared = prepare_step(cfg, batch, rng, seen, pop, n_users)
        sgd_step(params, cfg, prepared)
        touched_u.append(prepared.users)
        touched_i.extend([prepared.cand, prepared.hist_rows])
    return np.concatenate(touched_u), np.concatenate(touched_i)


def prepare_step(cfg: ModelConfig, ev: Events, rng: np.random.Generator,
                 seen: SeenLists, pop: np.ndarray, n_users: int) -> AutogradBatch:
    """Negatives, candidates, inverse indices, masks and prior of one step (host only)."""
    c = cfg
    live_items = len(pop)
    neg = rng.integers(0, live_items, size=c.negatives) if c.negatives else \
        np.zeros(0, dtype=np.int64)
    if len(neg):
        neg = neg[np.isfinite(pop[neg])]
    shared = None
    if c.inbatch_negatives > 0:
        neg = np.concatenate([rng.choice(ev.item, size=c.inbatch_negatives), neg])
    cand, label = _unique_inverse(np.concatenate([ev.item, neg]), live_items)
    label = label[: len(ev.item)]
    if c.inbatch_negatives > 0:
        shared = np.unique(np.searchsorted(cand, neg))
    uu, u_inv = _unique_inverse(ev.user, n_users)
    # history slots: -1 (empty) maps to a zero row 0, item r to r + 1
    hh, h_inv = _unique_inverse(ev.hist.reshape(-1) + 1, live_items + 1)
    has_pad = bool(len(hh) and hh[0] == 0)
    hrows = (hh[1:] if has_pad else hh) - 1
    slot_w = (np.arange(ev.hist.shape[1])[None, :] * n_buckets(c) + ev.bucket).reshape(-1)
    mask = None
    if c.mask_seen:
        mask = _seen_mask(ev, seen, cand, label, live_items)
    elif c.mask_history:
        # (event, candidate) pairs where the candidate is already in the history
        bh = ev.hist
        pos = np.minimum(np.searchsorted(cand, bh), len(cand) - 1)
        hit = (cand[pos] == bh) & (pos != label[:, None])
        evs = np.broadcast_to(np.arange(len(bh))[:, None], bh.shape)
        mask = (evs[hit], pos[hit])
    pc = pop[cand]
    prior = c.pop_weight * (pc - pc.max())
    if c.logq > 0:
        expected = np.bincount(label, minlength=len(cand)) + c.negatives / max(len(pop), 1)
        prior = prior - c.logq * np.log(expected)
    mrow = mcol = np.zeros(0, dtype=np.int64)
    if shared is None:
        if mask is not None:
            mrow, mcol = mask
    else:
        col = np.full(len(cand), -1, dtype=np.int64)
        col[shared] = np.arange(1, len(shared) + 1)
        hit_r = np.flatnonzero(col[label] > 0)                                 # accidental hits
        mrow, mcol = hit_r, col[label[hit_r]]
        if mask is not None and len(mask[0]):
            keep = col[mask[1]] > 0
            mrow = np.concatenate([mrow, mask[0][keep]])
            mcol = np.concatenate([mcol, col[mask[1][keep]]])
    n, h = ev.hist.shape
    return AutogradBatch(users=uu, user_of=u_inv, hist_rows=hrows, hist_index=h_inv,
                     has_pad=has_pad, n=n, h=h, slot_weight=slot_w, cand=cand, label=label,
                     prior=prior.astype(np.float32), weight=ev.weight, shared=shared,
                     mask_rows=mrow, mask_cols=mcol)


def _seen_mask(ev: Events, seen: SeenLists, cand: np.ndarray, label: np.ndarray,
               live_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(event, candidate) pairs where the candidate is in the user's seen set (not the target).

    Seen rows of each distinct user, then expanded to that user's events.
    """
    bu = ev.user
    uniq_u, u_pos = np.unique(bu, return_inverse=True)
    uptr, uflat = seen.gather(uniq_u)
    ulen = np.diff(uptr)
    # candidate column of each (distinct user, seen item); most are not candidates,
    # so keep the pairs that are before expanding them to the user's events
    col = np.full(live_items, -1, dtype=np.int64)
    col[cand] = np.arange(len(cand))
    ucol = col[uflat]
    keep = ucol >= 0
    pair_col = ucol[keep]
    per_user = np.bincount(np.repeat(np.arange(len(uniq_u)), ulen)[keep],
                           minlength=len(uniq_u))
    pstart = np.cumsum(per_user) - per_user
    lens = per_user[u_pos]
    evs = np.repeat(np.arange(len(bu)), lens)
    # index of each (event, k) into pair_col: start of its user's pairs + k
    offs = np.arange(len(evs)) - np.repeat(np.cumsum(lens) - lens, lens)
    pos = pair_col[pstart[u_pos][evs] + offs]
    hit = pos != label[evs]
    return evs[hit], pos[hit]


def sgd_step(p: Params, cfg: ModelConfig, b: AutogradBatch) -> None:
    """One sampled-softmax step on the device: loss, gradients, row-wise Adagrad."""
    c = cfg
    dev = p.device
    t_uu = torch.as_tensor(b.users, device=dev)
    t_hr = torch.as_tensor(b.hist_rows, device=dev)
    t_c = torch.as_tensor(b.cand, device=dev)
    U = p.user_vec[t_uu].requires_grad_(c.use_user_vector)
    content = c.content_dim > 0 and p.n_text > 0
    if c.tied:
        rows = np.union1d(b.hist_rows, b.cand)
        t_r = torch.as_tensor(rows, device=dev)
        Er = p.item_out[t_r].requires_grad_(True)
        Ee = Er                                  # effective rows: free + text @ W
        if content:
            Wc = p.content_w.clone().requires_grad_(True)
            Ee = Er + p.item_text[t_r].to(torch.float32) @ Wc
        at_hist = torch.as_tensor(np.searchsorted(rows, b.hist_rows), device=dev)
        at_cand = torch.as_tensor(np.searchsorted(rows, b.cand), device=dev)
        Ei, Eo = Ee[at_hist], Ee[at_cand]
        Fi, Fo = Er[at_hist], Er[at_cand]        # L2 acts on the free rows
    else:
        Ei = p.item_in[t_hr].requires_grad_(True)
        Eo = p.item_out[t_c].requires_grad_(True)
        Fi, Fo = Ei, Eo
    Bc = p.item_bias[t_c].requires_grad_(True)
    pw = p.pos_w.clone().requires_grad_(True)
    # weighted sum of history input embeddings, one bag per event (N, D)
    N, H = b.n, b.h
    idx = torch.as_tensor(b.hist_index, device=dev)
    psw = pw.reshape(-1)[torch.as_tensor(b.slot_weight, device=dev)]            # (N * H,)
    if b.has_pad:
        Ei_full = torch.cat([torch.zeros(1, Ei.shape[1], device=dev), Ei])
        psw = psw * (idx > 0).to(torch.float32)
    else:
        Ei_full = Ei
    offsets = torch.arange(0, N * H, H, device=dev)
    q = torch.nn.functional.embedding_bag(idx, Ei_full, offsets, mode="sum",
                                          per_sample_weights=psw)
    if c.transition:
        Mv = p.transition.clone().requires_grad_(True)
        last = idx.view(N, H)[:, 0]
        q = q + Ei_full[last] @ Mv
    if c.use_user_vector:
        q = q + U[torch.as_tensor(b.user_of, device=dev)]
    prior = torch.as_tensor(b.prior, device=dev)
    qs = c.scale * q
    t_label = torch.as_tensor(b.label, device=dev)
    if b.shared is None:
        logits = qs @ Eo.T + (Bc + prior)                                       # (N, C)
        target = t_label
    else:
        t_sh = torch.as_tensor(b.shared, device=dev)
        pos = (qs * Eo[t_label]).sum(1) + (Bc + prior)[t_label]               # (N,)
        negl = qs @ Eo[t_sh].T + (Bc + prior)[t_sh]                            # (N, K)
        logits = torch.cat([pos[:, None], negl], dim=1)                        # (N, 1 + K)
        target = torch.zeros(len(b.label), dtype=torch.long, device=dev)
    if len(b.mask_rows):
        # in place: the preceding add does not need its output for backward
        logits.index_put_((torch.as_tensor(b.mask_rows, device=dev),
                           torch.as_tensor(b.mask_cols, device=dev)),
                          torch.tensor(-1e4, device=dev))
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    loss = (ce * torch.as_tensor(b.weight, device=dev)).sum()
    if c.l2 > 0:
        loss = loss + c.l2 * (Fi.pow(2).sum() + Fo.pow(2).sum() + U.pow(2).sum())
    params = [Er, Er, Bc, pw] if c.tied else [Ei, Eo, Bc, pw]
    params += [U] if c.use_user_vector else []
    params += [Mv] if c.transition else []
    params += [Wc] if content else []
    grads = torch.autograd.grad(loss, params[1:] if c.tied else params)
    if c.tied:  # the tied table's gradient arrives through the output side
        grads = (None,) + grads  # type: ignore[assignment]
    lr = c.lr
    with torch.no_grad():
        if c.tied:
            _adagrad_rows(p.item_out, p.acc_out, t_r, Er, grads[1], lr, c.acc_decay)
            p.item_in[t_r] = p.item_out[t_r]
        else:
            _adagrad_rows(p.item_in, p.acc_in, t_hr, Ei, grads[0], lr, c.acc_decay)
            _adagrad_rows(p.item_out, p.acc_out, t_c, Eo, grads[1], lr, c.acc_decay)
        acc = c.acc_decay * p.acc_bias[t_c] + grads[2].pow(2)
        p.acc_bias[t_c] = acc
        p.item_bias[t_c] = Bc.detach() - lr * grads[2] / (acc.sqrt() + 1e-8)
        p.pos_acc += grads[3].pow(2)
        p.pos_w -= c.pos_lr_scale * lr * grads[3] / (p.pos_acc.sqrt() + 1e-8)
        if c.use_user_vector:
            _adagrad_rows(p.user_vec, p.user_acc, t_uu, U, grads[4], lr, c.acc_decay)
        if c.transition:
            g = grads[4 + c.use_user_vector]
            p.transition_acc += g.pow(2)
            p.transition -= c.pos_lr_scale * lr * g / (p.transition_acc.sqrt() + 1e-8)
        if content:
            g = grads[-1]
            p.content_acc.mul_(c.acc_decay).add_(g.pow(2))
            p.content_w -= c.content_lr * g / (p.content_acc.sqrt() + 1e-8)


def _adagrad_rows(table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor,
                  value: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> None:
    """Row-wise Adagrad on the unique ``rows`` (R,) of ``table`` (cap, D).

    ``decay`` < 1 shrinks the accumulator of touched rows first, so step sizes
    stop shrinking for ever -- items keep adapting as tastes drift.
    """
    a = decay * acc[rows] + grad.pow(2).mean(dim=1)
    acc[rows] = a
    table[rows] = value.detach() - lr * grad / (a.sqrt()[:, None] + 1e-8)


def _unique_inverse(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True)`` for ints in [0, n) in O(len(x) + n)."""
    present = np.zeros(n, dtype=bool)
    present[x] = True
    uniq = np.flatnonzero(present)
    pos = np.cumsum(present) - 1
    return uniq.astype(np.int64), pos[x].astype(np.int64)
