"""The training step on the device: explicit gradients, static shapes, no host syncs.

:func:`run_step` is one sampled-softmax step written out by hand -- softmax
minus one-hot, two matrix products, ``index_add_`` into the touched rows,
row-wise Adagrad -- 76 operations that do work on CUDA's plan, 83 on CPU's (views
not counted; the autograd step dispatches 111, forward and backward, default
configuration), on the packed buffer of a :class:`~stream_rec.model.train.StepBatch`. Every
size comes from its :class:`~stream_rec.model.train.StepShape`, nothing reads a
value back to the host (no ``.item()``, no ``nonzero``, no boolean indexing),
and padding is inert: padding rows point at the tables' scratch row (zero, and
it stays zero: its gradients are exactly zero), padding events weigh 0 and
padding columns carry a ``MASKED`` prior. So the same function runs eagerly on
CPU and is captured once per shape as a CUDA graph.

On CPU every operation used is deterministic run to run (``index_add_`` adds
in index order; no ``index_put_(accumulate=True)``, whose parallel CPU kernel
is not), so a given stream ends in the same state bit for bit.
:mod:`.reference` keeps the autograd formulation this is tested against.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .params import Params, n_buckets
from .train import MASKED, StepBatch, StepShape, layout

log = logging.getLogger(__name__)
# torch warns once per process that sparse CSR tensors are "beta"; the two products
# used here (CSR @ dense, sampled_addmm) are tested against the dense formulation
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta",
                        category=UserWarning)

EPS = 1e-8


def unpack(buf: torch.Tensor, shape: StepShape, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Views of the fields of a step's buffer (on the device)."""
    lay = layout(shape, cfg)
    fa, fn = lay["f32"]
    floats = buf[fa:fa + fn].view(torch.float32)
    out: dict[str, torch.Tensor] = {}
    for name, (a, n) in lay.items():
        if name.startswith("f32:"):
            out[name[4:]] = floats[a:a + n]
        elif name not in ("f32", "total"):
            out[name] = buf[a:a + n]
    return out


def _adagrad_rows(full: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor,
                  value: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> None:
    """Row-wise Adagrad on ``rows`` of ``full`` (cap + 1, D).

    ``decay`` < 1 shrinks the accumulator of touched rows first, so step sizes
    stop shrinking for ever. ``rows`` may repeat only the scratch row 0, whose
    value and gradient are zero, so every duplicate writes the same zero.
    """
    a = acc.index_select(0, rows)
    if decay != 1.0:
        a.mul_(decay)
    a.add_(grad.pow(2).mean(dim=1))
    acc.index_copy_(0, rows, a)
    full.index_copy_(0, rows, torch.addcdiv(value, grad, a.sqrt_().add_(EPS).unsqueeze(1),
                                            value=-lr))


def _mask(f: dict[str, torch.Tensor], cfg: ModelConfig, shape: StepShape,
          cand: torch.Tensor) -> torch.Tensor | None:
    """Bool (N, C): cells where the candidate is in the user's seen set (``mask_seen``)
    or in the event's history (``mask_history``); the event's own target included.

    Items are matched to candidate columns by ``searchsorted`` on the sorted
    candidates; an item that is not a candidate lands in column 0, padding.
    """
    N, C = shape.n, shape.c
    if cfg.mask_seen:
        items, owner, rows = f["seen_item"], f["seen_owner"], shape.q
    elif cfg.mask_history:
        items = f["hist"]
        owner = torch.arange(N * shape.h, device=cand.device) // shape.h
        rows = N
    else:
        return None
    col = torch.searchsorted(cand, items).clamp_(max=C - 1)
    col = col * cand.index_select(0, col).eq(items)
    m = torch.zeros(rows * C, dtype=torch.bool, device=cand.device)
    m.index_fill_(0, owner * C + col, True)
    m = m.view(rows, C)
    return m.index_select(0, f["user_of"]) if cfg.mask_seen else m


def run_step(p: Params, cfg: ModelConfig, shape: StepShape, buf: torch.Tensor) -> None:
    """One sampled-softmax step with row-wise Adagrad, gradients written out.

    ``buf`` is the step's packed buffer on ``p.device``. Forward: the query of
    event n is ``q_n = Σ_h w[h, age] E[hist_nh] (+ E[hist_n0] M) (+ U[user_n])``,
    logits ``scale · q_n · E[c] + bias[c] + prior[c]``, seen cells masked.
    Backward: ``G = weight · (softmax − onehot(target))``; ``dq = scale · G E``;
    ``dE_out = scale · Gᵀ q``; the history rows get ``w · dq`` and the slot
    weights ``dq · E``.

    With text vectors (``shape.x``; tied only), every row in the step is its
    effective vector ``E = F + X W`` (``F`` the free row, ``X`` the text
    vector): the step reads ``E`` everywhere above, gives its gradient ``g``
    to the free rows (row-wise Adagrad, L2 on ``F``) and ``Xᵀ g`` to W
    (element-wise Adagrad at ``content_lr``).
    """
    c = cfg
    f = unpack(buf, shape, cfg)
    N, H, D = shape.n, shape.h, c.dim
    NB = n_buckets(c)
    dev = buf.device
    full = p.full
    E_out = full["item_out"]
    E_in = E_out if c.tied else full["item_in"]

    # ---- forward: the query
    rows = f["rows"]
    Er = E_in.index_select(0, rows)                               # (T, D) rows, before update
    content = shape.x
    if content:                                                   # effective rows F + X W
        Xr = full["item_text"].index_select(0, rows).to(torch.float32)   # (T, K)
        Ee = torch.addmm(Er, Xr, p.content_w)
    else:
        Ee = Er
    pw = torch.cat([p.pos_w.reshape(-1), torch.zeros(1, device=dev)])
    psw = pw.index_select(0, f["slot"])                           # (N * H,) empty slots: 0
    if shape.csr:
        # W (N, T): event n's slot weights on its history rows; q = W Er
        crow = torch.arange(0, N * H + 1, H, device=dev)
        W = torch.sparse_csr_tensor(crow, f["hist_local"], psw, (N, shape.t),
                                    check_invariants=False)
        q = W @ Ee
        E0 = None
        if c.transition:
            E0 = Ee.index_select(0, f["hist_local"].view(N, H)[:, 0]) if content else \
                E_in.index_select(0, f["hist"].view(N, H)[:, 0])
    else:
        Eh = (Ee.index_select(0, f["hist_local"]) if content            # empty: local 0, zero
              else E_in.index_select(0, f["hist"])).view(N, H, D)  # empty slots: scratch row (0)
        q = torch.bmm(psw.view(N, 1, H), Eh).squeeze(1)           # (N, D)
        E0 = Eh[:, 0]
    if c.transition:
        q = q + E0 @ p.transition
    if c.use_user_vector:
        Uq = full["user_vec"].index_select(0, f["users"])         # (Q, D)
        q = q + Uq.index_select(0, f["user_of"])
    qs = c.scale * q

    # ---- logits, softmax, G = dloss/dlogits
    cand, label, w = f["cand"], f["label"], f["weight"]
    Eo = Ee.index_select(0, f["cand_local"]) if content \
        else E_out.index_select(0, cand)                          # (C, D)
    bias_c = full["item_bias"].index_select(0, cand)
    b = bias_c + f["prior"]
    mask = _mask(f, c, shape, cand)
    if not shape.k:
        # the bias rides in the product as one more column: no separate (N, C) pass
        ones = torch.ones(N, 1, device=dev)
        logits = torch.cat([qs, ones], 1) @ torch.cat([Eo, b.unsqueeze(1)], 1).t()   # (N, C)
        if mask is not None:
            mask.scatter_(1, label.unsqueeze(1), False)
            logits.masked_fill_(mask, MASKED)
        G = torch.softmax(logits, dim=1)
        G.mul_(w.unsqueeze(1))
        G.scatter_add_(1, label.unsqueeze(1), -w.unsqueeze(1))
        dqs = G @ Eo                                              # (N, D)
        dEo = G.t() @ qs                                          # (C, D)
        dB = G.sum(0)                                             # (C,)
    else:
        shared = f["shared"]
        Esh = Eo.index_select(0, shared)                          # (K, D)
        Elab = Eo.index_select(0, label)                          # (N, D)
        pos = (qs * Elab).sum(1) + b.index_select(0, label)
        negl = torch.addmm(b.index_select(0, shared), qs, Esh.t())   # (N, K)
        hit = shared.unsqueeze(0).eq(label.unsqueeze(1))          # accidental hits
        if mask is not None:
            hit |= mask.index_select(1, shared)
        negl.masked_fill_(hit, MASKED)
        G = torch.softmax(torch.cat([pos.unsqueeze(1), negl], dim=1), dim=1)
        G.mul_(w.unsqueeze(1))
        G[:, 0].sub_(w)
        g0, gn = G[:, :1], G[:, 1:]
        dqs = g0 * Elab + gn @ Esh
        dEo = torch.zeros(shape.c, D, device=dev)
        dEo.index_add_(0, label, g0 * qs).index_add_(0, shared, gn.t() @ qs)
        dB = torch.zeros(shape.c, device=dev)
        dB.index_add_(0, label, G[:, 0]).index_add_(0, shared, gn.sum(0))
    dq = c.scale * dqs

    # ---- backward into the history: slot weights (dq . E) and history rows (w dq)
    if shape.csr:
        dpsw = torch.sparse.sampled_addmm(W, dq, Ee.t(), beta=0.0).values()
        Wt = torch.sparse_csr_tensor(f["crow_t"], f["col_t"],
                                     psw.index_select(0, f["perm"]), (shape.t, N),
                                     check_invariants=False)
        g_rows = Wt @ dq                                          # (T, D)
    else:
        dpsw = torch.bmm(Eh, dq.unsqueeze(2)).view(N * H)
        g_rows = torch.zeros(shape.t, D, device=dev)
        g_slot = psw.view(N, H, 1) * dq.unsqueeze(1)              # (N, H, D)
        g_rows.index_add_(0, f["hist_local"], g_slot.view(N * H, D))
    if c.transition:
        # q += E0 M: E0 gets dq Mᵀ (an empty slot 0 is the scratch row: nothing), M gets E0ᵀ dq
        live0 = f["hist"].view(N, H)[:, 0].ne(0).to(torch.float32).unsqueeze(1)
        g_rows.index_add_(0, f["hist_local"].view(N, H)[:, 0],
                          (dq @ p.transition.t()) * live0)
        dM = E0.t() @ dq
    dpos = torch.zeros(H * NB + 1, device=dev).index_add_(0, f["slot"], dpsw)[:-1].view(H, NB)

    # ---- updates
    lr, decay = c.lr, c.acc_decay
    if c.tied:
        g_rows.index_add_(0, f["cand_local"], dEo)
        if content:                                               # W's share: Xᵀ g (K, D)
            dW = Xr.t() @ g_rows
            if decay != 1.0:
                p.content_acc.mul_(decay)
            p.content_acc.addcmul_(dW, dW)
            p.content_w.addcdiv_(dW, p.content_acc.sqrt().add_(EPS), value=-c.content_lr)
        if c.l2 > 0:
            g_rows += f["l2coef"].unsqueeze(1) * Er
        _adagrad_rows(E_out, full["acc_out"], rows, Er, g_rows, lr, decay)   # item_in aliases it
    else:
        if c.l2 > 0:
            g_rows += 2.0 * c.l2 * Er
            dEo = dEo + 2.0 * c.l2 * Eo
        _adagrad_rows(E_in, full["acc_in"], rows, Er, g_rows, lr, decay)
        _adagrad_rows(E_out, full["acc_out"], cand, Eo, dEo, lr, decay)
    acc_b = full["acc_bias"]
    ab = acc_b.index_select(0, cand)
    if decay != 1.0:
        ab.mul_(decay)
    ab.addcmul_(dB, dB)
    acc_b.index_copy_(0, cand, ab)
    full["item_bias"].index_copy_(0, cand, torch.addcdiv(bias_c, dB, ab.sqrt_().add_(EPS),
                                                         value=-lr))
    p.pos_acc.addcmul_(dpos, dpos)
    p.pos_w.addcdiv_(dpos, p.pos_acc.sqrt().add_(EPS), value=-c.pos_lr_scale * lr)
    if c.use_user_vector:
        dU = torch.zeros(shape.q, D, device=dev).index_add_(0, f["user_of"], dq)
        if c.l2 > 0:
            dU += 2.0 * c.l2 * Uq
        _adagrad_rows(full["user_vec"], full["user_acc"], f["users"], Uq, dU, lr, decay)
    if c.transition:
        p.transition_acc.addcmul_(dM, dM)
        p.transition.addcdiv_(dM, p.transition_acc.sqrt().add_(EPS), value=-c.pos_lr_scale * lr)


class StepRunner:
    """Runs prepared steps: eagerly on CPU; on CUDA from pinned staging buffers, one
    asynchronous copy per step, each shape captured once as a CUDA graph and replayed.

    A graph is valid for the shape it was captured with and the tensors it
    addresses (:meth:`Params.key`): when a table grows or is replaced, every
    graph is dropped and shapes are captured again. The first step of a shape
    runs eagerly (it is the warm-up capture requires) and is then captured;
    capture does not execute, so no step runs twice. If capture fails the
    runner logs it and stays eager. ``counts`` says what happened.
    """

    MAX_GRAPHS = 64
    STAGING = 4

    def __init__(self, params: Params, cfg: ModelConfig, graphs: bool | None = None) -> None:
        self.p = params
        self.cfg = cfg
        cuda = params.device.type == "cuda"
        self.graphs = cuda if graphs is None else (graphs and cuda)
        self._cache: OrderedDict[Any, tuple[Any, torch.Tensor]] = OrderedDict()
        self._key: Any = None
        self._staging: deque[tuple[torch.Tensor, Any]] = deque()
        self.counts = {"eager": 0, "captures": 0, "replays": 0, "capture_failures": 0}

    def run(self, b: StepBatch) -> None:
        """Run (CPU) or enqueue (CUDA) one step; never waits for the device except to
        reuse a staging buffer when the device is ``STAGING`` steps behind."""
        if self.p.device.type != "cuda":
            run_step(self.p, self.cfg, b.shape, torch.from_numpy(b.buf))
            self.counts["eager"] += 1
            return
        with torch.cuda.device(self.p.device):    # streams and events of the model's GPU
            self._run_cuda(b)

    def _run_cuda(self, b: StepBatch) -> None:
        pkey = self.p.key()
        if pkey != self._key:
            self._cache.clear()
            self._key = pkey
        entry = self._cache.get(b.shape) if self.graphs else None
        if entry is not None:
            graph, static_in = entry
            self._copy_in(static_in, b.buf)
            graph.replay()
            self._cache.move_to_end(b.shape)
            self.counts["replays"] += 1
            return
        dev_buf = torch.empty(len(b.buf), dtype=torch.int64, device=self.p.device)
        self._copy_in(dev_buf, b.buf)
        if not self.graphs:
            run_step(self.p, self.cfg, b.shape, dev_buf)
            self.counts["eager"] += 1
            return
        self._run_and_capture(b.shape, dev_buf)

    def _copy_in(self, dst: torch.Tensor, src: np.ndarray) -> None:
        """Host buffer -> device in one asynchronous copy through a pinned buffer.

        Pinned buffers are reused round robin; one is rewritten only once the copy
        that last read it has completed (a wait only when the device is
        ``STAGING`` copies behind).
        """
        n = len(src)
        pinned: torch.Tensor | None = None
        if len(self._staging) >= self.STAGING:
            pinned, done = self._staging.popleft()
            if not done.query():
                done.synchronize()
            if pinned.numel() < n:
                pinned = None
        if pinned is None:
            pinned = torch.empty(max(n, 1 << 16), dtype=torch.int64, pin_memory=True)
        pinned[:n].numpy()[:] = src
        dst.copy_(pinned[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._staging.append((pinned, done))

    def _run_and_capture(self, shape: StepShape, dev_buf: torch.Tensor) -> None:
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):          # the real step, doubling as the warm-up
            run_step(self.p, self.cfg, shape, dev_buf)
        cur.wait_stream(side)
        self.counts["eager"] += 1
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                run_step(self.p, self.cfg, shape, dev_buf)
        except Exception as e:  # noqa: BLE001 -- any capture failure: stay correct, go eager
            log.warning("CUDA graph capture failed (%s); training steps run eagerly", e)
            self.graphs = False
            self._cache.clear()
            self.counts["capture_failures"] += 1
            return
        self._cache[shape] = (graph, dev_buf)
        self.counts["captures"] += 1
        while len(self._cache) > self.MAX_GRAPHS:
            self._cache.popitem(last=False)
