"""The served order: score descending, ties by row, seen rows and -inf removed."""

from __future__ import annotations

import numpy as np

from stream_rec.ranking import Metrics, rank_of


def test_rank_order_and_exclusion() -> None:
    s = np.array([0.5, 0.9, 0.9, 0.1])
    assert rank_of(s, 1, ()) == 0
    assert rank_of(s, 2, ()) == 1          # tie broken by row
    assert rank_of(s, 2, {1}) == 0         # seen removed
    assert rank_of(s, 9, ()) is None
    assert rank_of(np.array([1.0, -np.inf]), 1, ()) is None


def test_metrics_count_misses_and_ranks() -> None:
    m = Metrics()
    for r in (0, 9, 10, None):
        m.add(r)
    out = m.result()
    assert out["hr@10"] == 0.5
    assert abs(out["mrr"] - (1 + 1 / 10 + 1 / 11) / 4) < 1e-12
    assert abs(out["ndcg@10"] - (1 + 1 / np.log2(11)) / 4) < 1e-12
