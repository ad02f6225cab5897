"""A gang's training step: every rank's item gradients summed in rank order, applied alike.

Each rank computes the gradients of its own events with the ordinary step
(:func:`~.step.step_grads`) and applies the user-vector part itself: its
users are its own. The rest -- item rows and biases, slot weights, the
transition -- belongs to the replicated tables, so each rank packs it into one
``uint8`` buffer (:func:`pack`), every rank receives every buffer
(:meth:`~.exchange.Exchange.all_gather_bytes`), and every rank sums them in
rank order over the union of the rows they touch (:func:`sum_in_rank_order`)
and applies the sum with the ordinary Adagrad update
(:func:`~.step.apply_item_grads`). Same inputs, same operations, same order:
the replicas stay bitwise equal on CPU. A gang of one applies exactly what the
single worker applies.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .exchange import Exchange
from .params import Params, n_buckets
from .step import StepGrads, apply_item_grads

_HEADER = 3  # int64 words: present, rows, candidates


def pack(g: StepGrads | None, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """The replicated part of ``g`` as one ``uint8`` buffer; ``None`` packs "no events".

    Layout: header (present, T, C) int64; rows (T,) and candidates (C,) int64
    (full-table rows, padding dropped); then float32: row gradients (T, D),
    bias gradients (C,), slot weights (H, NB), the transition's (D, D) if
    any, untied target-side rows (C, D). int64 sections first keep every
    section aligned for :meth:`torch.Tensor.view`.
    """
    if g is None:
        return torch.zeros(_HEADER, dtype=torch.int64, device=device).view(torch.uint8)
    live_r = g.rows.ne(0)
    live_c = g.cand.ne(0)
    rows, cand = g.rows[live_r], g.cand[live_c]
    head = torch.tensor([1, rows.numel(), cand.numel()], dtype=torch.int64, device=device)
    parts = [head, rows, cand, g.g_rows[live_r], g.dB[live_c], g.dpos]
    if cfg.transition:
        assert g.dM is not None
        parts.append(g.dM)
    if not cfg.tied:
        assert g.dEo is not None
        parts.append(g.dEo[live_c])
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in parts])


def unpack(buf: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """Views of the sections of a :func:`pack` buffer; ``None`` when it holds no events."""
    head = buf[:_HEADER * 8].view(torch.int64)
    if int(head[0].item()) == 0:
        return None
    T, C = int(head[1].item()), int(head[2].item())
    D, H, NB = cfg.dim, cfg.history, n_buckets(cfg)
    pos = _HEADER * 8
    out: dict[str, torch.Tensor] = {}

    def take(name: str, n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        nonlocal pos
        size = n * (8 if dtype == torch.int64 else 4)
        out[name] = buf[pos:pos + size].view(dtype).view(shape)
        pos += size

    take("rows", T, torch.int64, (T,))
    take("cand", C, torch.int64, (C,))
    take("g_rows", T * D, torch.float32, (T, D))
    take("dB", C, torch.float32, (C,))
    take("dpos", H * NB, torch.float32, (H, NB))
    if cfg.transition:
        take("dM", D * D, torch.float32, (D, D))
    if not cfg.tied:
        take("dEo", C * D, torch.float32, (C, D))
    return out


def _rank_sum(union: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> torch.Tensor:
    """Rows ``union`` (U,) of the sum of (rows, values) pieces, added in the order given.

    The first piece is copied, not added to zeros, so a gang of one applies
    exactly its own gradient (no ``0.0 + -0.0``).
    """
    shape = (union.numel(),) + tuple(pieces[0][1].shape[1:])
    out = torch.zeros(shape, dtype=pieces[0][1].dtype, device=union.device)
    for k, (rows, vals) in enumerate(pieces):
        at = torch.searchsorted(union, rows)
        if k == 0:
            out.index_copy_(0, at, vals)
        else:
            out.index_add_(0, at, vals)
    return out


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].clone()
    for t in parts[1:]:
        out += t
    return out


def sum_in_rank_order(p: Params, cfg: ModelConfig, bufs: list[torch.Tensor]
                      ) -> StepGrads | None:
    """The gang's step: every rank's replicated gradients summed in rank order.

    Returns a :class:`StepGrads` over the union of the rows (values read from
    ``p`` now, before the update), or ``None`` when no rank had events.
    """
    got = [d for d in (unpack(b, cfg) for b in bufs) if d is not None]
    if not got:
        return None
    rows = torch.unique(torch.cat([d["rows"] for d in got]))
    cand = torch.unique(torch.cat([d["cand"] for d in got]))
    full = p.full
    E_out = full["item_out"]
    E_in = E_out if cfg.tied else full["item_in"]
    return StepGrads(
        rows=rows, Er=E_in.index_select(0, rows),
        g_rows=_rank_sum(rows, [(d["rows"], d["g_rows"]) for d in got]),
        cand=cand, Eo=E_out.index_select(0, cand),
        dEo=None if cfg.tied else _rank_sum(cand, [(d["cand"], d["dEo"]) for d in got]),
        bias_c=full["item_bias"].index_select(0, cand),
        dB=_rank_sum(cand, [(d["cand"], d["dB"]) for d in got]),
        dpos=_total([d["dpos"] for d in got]),
        dM=_total([d["dM"] for d in got]) if cfg.transition else None,
        users=rows[:0], Uq=None, dU=None)


def exchange_step(ex: Exchange, p: Params, cfg: ModelConfig, g: StepGrads | None
                  ) -> StepGrads | None:
    """Send this rank's replicated gradients, sum every rank's, apply the sum.

    Returns what was applied (its ``rows`` / ``cand`` are the item rows the
    step changed on every replica), ``None`` when no rank had events.
    """
    summed = sum_in_rank_order(p, cfg, ex.all_gather_bytes(pack(g, cfg, p.device)))
    if summed is not None:
        apply_item_grads(p, cfg, summed)
    return summed
