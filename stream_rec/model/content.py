"""Item content in the model: catalogue items announced before any click, and the
content term that serving adds for young items (``docs/CONTENT.md``).

With ``content_dim`` K > 0 an item's embedding is its free row plus its text
vector through a learned projection, ``item.out[i] + item.text[i] @ W``
(:mod:`.step` trains both on the clicks). :func:`announce` gives a catalogue
item its row, and so a vector (``x W``), before its first click.

The content term is a scoring-time boost for **young** items -- live, with a
text vector, at most :data:`YOUNG_MAX_EVENTS` events -- and only for users who
browse the tail::

    score_i += alpha * g_u * cos(x_u, x_i)

``x_u`` is the user's recent items' text vectors weighted ``0.9 ** h`` (h = 0
newest), ``g_u`` the share (weighted ``0.6 ** h``) of those items that have at
most :data:`TAIL_EVENTS` events. Text vectors are unit length, so the cosine is
``x̂_u · x_i``. ``alpha`` is a serving setting, not a parameter: learned by the
training softmax it went negative, while it lifts HR@10 on young items
(measured in ``docs/CONTENT.md``). The functions here are numpy, shared by the
evaluator (on the model's host arrays) and the servers (on a snapshot's
tables), so both rank the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .core import ModelCore

YOUNG_MAX_EVENTS = 9     # items with at most this many events get the term
TAIL_EVENTS = 12         # a history item this rare counts towards the user's gate
TEXT_RECENCY = 0.9       # weight of history slot h in x_u
TAIL_RECENCY = 0.6       # weight of history slot h in g_u


def announce(model: ModelCore, item_ids: Sequence[str], vectors: np.ndarray,
             ts_ms: int | None = None) -> np.ndarray:
    """Give catalogue items their text vectors, and a row now if they have none yet.

    ``vectors`` (B, K) float, one per id (a repeated id: the last wins). A new
    item is admitted at once (whatever ``admit_after``) with a zero free row,
    bias and Adagrad sums, so its vector is ``x W`` until clicks move it; it
    has no events and no popularity, so it is never drawn as a uniform
    negative, and its idle clock (``ttl_ms``) starts at ``ts_ms`` or the
    watermark, whichever is later. A known item keeps its learned free row and
    takes the new text vector. Returns the item rows changed (sorted).
    """
    cfg = model.cfg
    if not cfg.content_dim:
        raise ValueError("announce needs a model with content_dim > 0")
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(item_ids), -1)
    if vectors.shape[1] != cfg.content_dim:
        raise ValueError(f"text vectors of width {vectors.shape[1]}, the model takes "
                         f"{cfg.content_dim}")
    last = {str(iid): j for j, iid in enumerate(item_ids)}
    f = model.fast
    rows = np.empty(len(last), dtype=np.int64)
    fresh: list[int] = []
    for k, key in enumerate(last):
        row, new = f.items.admit(key)
        if new:
            f.grow_items(row + 1)
            fresh.append(row)
        rows[k] = row
    if fresh:
        fr = np.asarray(fresh, dtype=np.int64)
        model.params.clear_items(fr)
        f.i_events[fr] = 0
        f.pop[fr] = -np.inf
        f.i_last[fr] = max(ts_ms or 0, f.watermark or 0)
    model.params.set_text(rows, vectors[list(last.values())])
    return np.unique(rows)


def text_term(hist: np.ndarray, events: np.ndarray, text: np.ndarray) -> np.ndarray | None:
    """``g_u · x̂_u`` (K,) float32 for a history, or ``None`` when the term is zero.

    ``hist`` (H,) item rows newest first (-1 empty); ``events`` (I,) each item
    row's event count; ``text`` (I, K) the rows' text vectors (zero: none) --
    any array indexable by row, only the history's rows are read.
    """
    slots = np.flatnonzero(hist >= 0)
    if not len(slots):
        return None
    h = hist[slots]
    xu = (TEXT_RECENCY ** slots.astype(np.float32)) @ np.asarray(text[h], dtype=np.float32)
    norm = float(np.linalg.norm(xu))
    if norm == 0.0:
        return None
    wt = TAIL_RECENCY ** slots.astype(np.float64)
    gate = float((wt * (events[h] <= TAIL_EVENTS)).sum() / wt.sum())
    if gate == 0.0:
        return None
    return (xu * np.float32(gate / (norm + 1e-8))).astype(np.float32)


def young(events: np.ndarray, has_text: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Item rows (int64) that get the term: live, with a text vector, few events."""
    return np.flatnonzero(live & has_text & (events <= YOUNG_MAX_EVENTS)).astype(np.int64)


def term_scores(model: ModelCore, user_row: int) -> np.ndarray | None:
    """The term without ``alpha`` for every item row (I,) float32 of the in-memory model
    (zero for items that are not young), or ``None`` when it is zero for this user."""
    if not model.cfg.content_dim or not model.params.n_text:
        return None
    n = model.n_items
    f, p = model.fast, model.params
    t = text_term(f.hist[user_row], f.i_events[:n], _HostText(p.item_text))
    if t is None:
        return None
    rows = young(f.i_events[:n], p.has_text[:n], model.live_items())
    out = np.zeros(n, dtype=np.float32)
    if len(rows):
        out[rows] = _HostText(p.item_text)[rows] @ t
    return out


class _HostText:
    """Rows of a device text table, gathered on demand as float32 numpy."""

    def __init__(self, table: object) -> None:
        self.table = table

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        import torch

        t = self.table
        assert isinstance(t, torch.Tensor)
        return t[torch.as_tensor(rows, device=t.device)].to(torch.float32).cpu().numpy()
