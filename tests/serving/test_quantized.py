"""A server holding its vectors as float16 or int8: what it holds, and deltas over it."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from stream_rec.model import ModelState, delta_from_state, quant
from stream_rec.model import tables as T
from stream_rec.serving.state import ServingState, SnapshotWatcher
from stream_rec.snapshot import SnapshotStore
from tests import support

PAIRS = [(store, serve) for store in quant.DTYPES for serve in quant.DTYPES]


@functools.cache
def trained_state(n: int) -> ModelState:
    return support.trained_state(n)


@pytest.mark.parametrize(("store_dtype", "serve_dtype"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_a_delta_over_a_quantized_server_equals_loading_the_version_whole(
        tmp_path: Path, store_dtype: quant.Encoding, serve_dtype: quant.Encoding) -> None:
    """Encoding is row-local, so rows encoded as a delta arrives equal the table encoded
    whole: the state and the index refreshed over the held version are those a server
    starting at the new version builds."""
    store = SnapshotStore(tmp_path / "store", vector_dtype=store_dtype)
    old, new = trained_state(300), trained_state(600)
    full = store.publish(old, offsets={}, watermark=1)
    watcher = SnapshotWatcher(store, vector_dtype=serve_dtype)
    assert watcher.poll_once()
    nu, ni = len(new.user_ids), len(new.item_ids)
    users = np.union1d(np.arange(0, nu, 2), np.arange(len(old.user_ids), nu))  # new rows too
    items = np.union1d(np.arange(0, ni, 3), np.arange(len(old.item_ids), ni))
    store.publish_delta(delta_from_state(new, users, items), parent=full, offsets={},
                        watermark=2)
    assert watcher.poll_once()
    held = watcher.current
    assert held is not None and held.snapshot.base_version == 1   # applied over v1
    fresh = ServingState(store.load(2, tables=T.SERVED),  # type: ignore[arg-type]
                         vector_dtype=serve_dtype)
    for name in quant.SERVING:
        assert quant.encoding(held.state.tables, name) == serve_dtype
    # what serving reads, and nothing else (no training tables held)
    assert {n.removesuffix(quant.SCALE) for n in held.state.tables} == set(T.SERVED) & set(new.tables)
    assert set(held.state.tables) == set(fresh.state.tables)
    for name, arr in fresh.state.tables.items():
        np.testing.assert_array_equal(held.state.tables[name], arr, err_msg=name)
    queries = fresh.state.query(np.arange(len(fresh.state.user_ids)))
    assert held.index.search(queries, 10) == fresh.index.search(queries, 10)


def test_the_vectors_a_server_holds_shrink_with_their_dtype(tmp_path: Path) -> None:
    state = trained_state(600)
    store = SnapshotStore(tmp_path / "store")
    store.publish(state, offsets={}, watermark=1)
    snap = store.load()
    assert snap is not None
    held = {d: ServingState(snap, vector_dtype=d) for d in quant.DTYPES}
    sizes = {d: quant.nbytes(s.state.tables) for d, s in held.items()}
    assert sizes["float32"] == quant.nbytes(state.tables)
    assert sizes["float16"] * 2 == sizes["float32"]
    rows = sum(len(state.tables[n]) for n in quant.SERVING)
    assert sizes["int8"] * 4 == sizes["float32"] + 4 * 4 * rows   # a float32 scale per row
    assert held["float32"].state is snap.state   # nothing to encode: the version as loaded
    user, item = state.user_ids[3], state.item_ids[5]
    for d, s in held.items():
        body = s.recommend(user, 5)
        assert len(body["items"]) == 5 and not body["fallback"], d
        plan = s.plan_similar(item)
        assert plan is not None and plan.query is not None
        assert plan.query.dtype == np.float32 and plan.query.shape == (
            state.tables[T.ITEM_VECTORS].shape[1],)
