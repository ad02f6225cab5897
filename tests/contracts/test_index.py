"""One list of checks, run over every index kind (the river ``checks`` pattern).

Every kind promises the same things to serving: a query's seen items and
tombstoned rows are never returned, a catalogue smaller than k gives what it
has, rows past the end can be added, ``refreshed()`` never changes the index
requests are reading, and a refreshed index answers like one built from
scratch on the final vectors -- identically for exact kinds, up to a recall
bound for approximate ones.

Catalogues are small (3 000 rows, 16 columns), so kinds run with parameters
that suit that size: 16 IVF lists all probed, PQ of 8 sub-quantizers, a wide
HNSW search. The recall bounds sit well under what these kinds measure here
(0.94 to 1.0 against exact search) so that they catch a broken refresh, not noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import faiss
import numpy as np
import pytest

from stream_rec.index import KINDS, ItemIndex, Options
from stream_rec.index import item_index as item_index_module

N, D = 3000, 16  # D columns: 15 embedding + 1 bias (the query's last entry is 1)
OPTIONS = Options(nlist=16, nprobe=16, pq_m=8, k_factor=8, ef_search=128)
EXACT = {"flat", "auto"}  # "auto" is exact at this size
RECALL_BOUND = 0.9  # approximate kinds, against exact search on the same vectors

Check = Callable[[str], None]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """As serving searches (one OpenMP thread); many threads only contend on a shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def catalogue(n: int = N, seed: int = 0) -> np.ndarray:
    """Clustered rows with spread norms and a bias column, like the model's item vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(24, D - 1)).astype(np.float32)
    v = np.empty((n, D), dtype=np.float32)
    v[:, :-1] = centres[rng.integers(0, 24, n)] + 0.6 * rng.normal(size=(n, D - 1))
    v[:, :-1] *= rng.lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32)
    v[:, -1] = 0.2 * rng.normal(size=n)
    return v


def queries(vectors: np.ndarray, b: int = 64, seed: int = 1) -> np.ndarray:
    """A taste: the mean of a few rows plus noise, last entry 1."""
    rng = np.random.default_rng(seed)
    q = np.ones((b, D), dtype=np.float32)
    picks = rng.integers(0, len(vectors), (b, 3))
    q[:, :-1] = vectors[picks, :-1].mean(axis=1) + 0.3 * rng.normal(size=(b, D - 1))
    return q


def rows_of(hits: list[tuple[int, float]]) -> list[int]:
    return [r for r, _ in hits]


def exact_top(vectors: np.ndarray, q: np.ndarray, k: int, banned: set[int]) -> list[int]:
    scores = vectors @ q
    order = [int(r) for r in np.argsort(-scores, kind="stable") if int(r) not in banned]
    return order[:k]


def recall(got: list[list[int]], want: list[list[int]]) -> float:
    """Share of the wanted rows found; an empty answer to an empty want counts as complete."""
    return float(np.mean([len(set(g) & set(w)) / len(w) if w else float(not g)
                          for g, w in zip(got, want)]))


def answers(idx: ItemIndex, qs: np.ndarray, k: int,
            exclude: list[np.ndarray] | None = None) -> list[list[int]]:
    """Single-query answers (FAISS path) and batched ones (the batcher's path) must agree."""
    exclude = exclude or [np.empty(0, np.int64)] * len(qs)
    single = [rows_of(idx.search(q[None, :], k, [e])[0]) for q, e in zip(qs, exclude)]
    batched = [rows_of(h) for h in idx.search(qs, k, exclude)]
    if idx.layout.exact:
        assert single == batched
    else:
        assert recall(batched, single) >= 0.95
    return single


def build(kind: str, vectors: np.ndarray, dead: np.ndarray | None = None) -> ItemIndex:
    return ItemIndex.build(vectors, dead, kind=kind, options=OPTIONS)


@check
def exclusions_are_honoured(kind: str) -> None:
    v = catalogue()
    idx = build(kind, v)
    qs = queries(v)
    top = [exact_top(v, q, 30, set()) for q in qs]
    rng = np.random.default_rng(2)
    exclude = [np.array(t[:20] + rng.choice(N, 50).tolist(), dtype=np.int64) for t in top]
    got = answers(idx, qs, 10, exclude)
    for g, e in zip(got, exclude):
        assert len(g) == 10 and not set(g) & set(e.tolist())
    want = [exact_top(v, q, 10, set(e.tolist())) for q, e in zip(qs, exclude)]
    assert recall(got, want) >= (1.0 if kind in EXACT else RECALL_BOUND)


@check
def tombstones_are_never_returned(kind: str) -> None:
    v = catalogue()
    qs = queries(v)
    rng = np.random.default_rng(3)
    best = {r for q in qs for r in exact_top(v, q, 5, set())}
    dead = np.array(sorted(best | set(rng.choice(N, 300).tolist())), dtype=np.int64)
    built = build(kind, v, dead)
    later = build(kind, v)
    later.tombstone(dead)
    refreshed = build(kind, v).refreshed(np.empty(0, np.int64), np.empty((0, D)), dead)
    for idx in (built, later, refreshed):
        got = answers(idx, qs, 10)
        assert all(len(g) == 10 and not set(g) & set(dead.tolist()) for g in got)
    want = [exact_top(v, q, 10, set(dead.tolist())) for q in qs]
    assert recall(answers(refreshed, qs, 10), want) >= (1.0 if kind in EXACT else RECALL_BOUND)


@check
def a_catalogue_smaller_than_k_gives_what_it_has(kind: str) -> None:
    v = catalogue(6)
    idx = build(kind, v, dead=np.array([1]))
    qs = queries(v, 8)
    for g in answers(idx, qs, 10):
        assert sorted(g) == [0, 2, 3, 4, 5]
    for g in answers(idx, qs, 10, [np.array([0, 5])] * len(qs)):
        assert sorted(g) == [2, 3, 4]
    empty = build(kind, np.zeros((0, D), np.float32))
    assert empty.ntotal == 0 and answers(empty, qs, 10) == [[]] * len(qs)


@check
def rows_past_the_end_can_be_added(kind: str) -> None:
    v = catalogue()
    idx = build(kind, v)
    q = queries(v, 1)[0]
    far = np.zeros(D, dtype=np.float32)
    far[:-1] = q[:-1] * 10  # scores far above every row
    new = idx.refreshed(np.array([N + 4]), far[None, :])
    assert new.ntotal == N + 5 and idx.ntotal == N
    (row, score), = new.search(q[None, :], 1)[0]
    # far outside what a quantizer was trained on: kept exact beside it, not clipped
    assert row == N + 4 and score == pytest.approx(float(far @ q), rel=1e-2)
    got = answers(new, queries(v), 10)
    assert not {N, N + 1, N + 2, N + 3} & {r for g in got for r in g}  # skipped rows: no vectors
    idx.upsert(np.array([N, N + 1]), np.stack([far, far * 2]))  # in place, too
    assert idx.ntotal == N + 2 and sorted(rows_of(idx.search(q[None, :], 2)[0])) == [N, N + 1]


@check
def refreshed_leaves_the_original_untouched(kind: str) -> None:
    v = catalogue()
    idx = build(kind, v, dead=np.arange(0, 100))
    qs = queries(v)
    before = answers(idx, qs, 10)
    dead_before, n_before = set(idx.dead), idx.ntotal
    rng = np.random.default_rng(4)
    rows = rng.choice(N, 600, replace=False)
    idx.refreshed(np.r_[rows, N, N + 1], -catalogue(602, seed=9), dead=np.arange(100, 400))
    assert answers(idx, qs, 10) == before
    assert idx.dead == dead_before and idx.ntotal == n_before


@check
def refresh_equals_rebuild(kind: str) -> None:
    v0 = catalogue()
    v1 = np.concatenate([v0, catalogue(200, seed=5)])
    rng = np.random.default_rng(6)
    changed = rng.choice(N, N // 10, replace=False)
    v1[changed] = catalogue(len(changed), seed=7) * 1.5  # longer: they take most top-10s
    expired = rng.choice(N + 200, 150, replace=False)
    revived = np.arange(0, 40)  # dead at first, given vectors by the refresh
    idx = build(kind, v0, dead=revived)
    rows = np.r_[changed, np.arange(N, N + 200), revived]
    refreshed = idx.refreshed(rows, v1[rows], expired)
    rebuilt = build(kind, v1, expired)
    assert refreshed.ntotal == rebuilt.ntotal == N + 200
    assert refreshed.dead == rebuilt.dead == set(expired.tolist())
    qs = queries(v1)
    got, again = answers(refreshed, qs, 10), answers(rebuilt, qs, 10)
    want = [exact_top(v1, q, 10, set(expired.tolist())) for q in qs]
    if kind in EXACT:
        assert got == again == want
    else:
        assert recall(got, want) >= RECALL_BOUND and recall(again, want) >= RECALL_BOUND
        assert abs(recall(got, want) - recall(again, want)) <= 0.05
    for q, hits in zip(qs, refreshed.search(qs, 10)):  # scores are those of the new vectors
        exact = v1[rows_of(hits)] @ q
        assert np.allclose([s for _, s in hits], exact, atol=0.1 * float(np.abs(exact).max()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("contract", CHECKS, ids=lambda c: c.__name__)
def test_index_contract(contract: Check, kind: str) -> None:
    contract(kind)


def test_auto_is_exact_when_small_and_outgrows_it_in_a_refresh(monkeypatch) -> None:
    monkeypatch.setattr(item_index_module, "AUTO_EXACT_MAX", 2500)
    v = catalogue()
    small = build("auto", v[:2000])
    assert small.layout.name == "flat" and small.kind == "auto"
    rows = np.arange(2000, N)
    grown = small.refreshed(rows, v[rows])
    assert grown.kind == "auto" and grown.layout.name == item_index_module.AUTO_ANN
    assert small.layout.name == "flat" and small.ntotal == 2000
    qs = queries(v)
    want = [exact_top(v, q, 10, set()) for q in qs]
    assert recall(answers(grown, qs, 10), want) >= RECALL_BOUND


def test_hnsw_compacts_superseded_nodes() -> None:
    v = catalogue()
    idx = build("hnsw_sq8", v)
    rng = np.random.default_rng(8)
    for step in range(4):  # 20 % of rows re-added per refresh; compaction past 25 %
        rows = rng.choice(N, N // 5, replace=False)
        v[rows] = catalogue(len(rows), seed=20 + step)
        idx = idx.refreshed(rows, v[rows])
        layout = idx.layout
        assert layout.superseded.sum() <= OPTIONS.rebuild_fraction * N  # type: ignore[attr-defined]
    qs = queries(v)
    want = [exact_top(v, q, 10, set()) for q in qs]
    assert recall(answers(idx, qs, 10), want) >= RECALL_BOUND


def test_every_kind_can_be_configured() -> None:
    from typing import get_args

    from stream_rec.settings import ServeSettings

    assert set(get_args(ServeSettings.model_fields["index"].annotation)) == set(KINDS)
    assert ServeSettings().index == "auto"


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown index kind"):
        ItemIndex(8, kind="lsh")
