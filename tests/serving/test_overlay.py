"""The overlay: a user's clicks past the served version shape the answer, and count once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from stream_rec.events import decode_columns, encode_event
from stream_rec.model import tables as T
from stream_rec.serving.overlay import Overlay
from stream_rec.serving.state import ServingState
from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state

TOPIC = "clicks"
NOW = 1_700_000_000_000


def _batch(clicks: list[tuple[int, int, str, str]]):
    """Decoded columns of (partition, offset, user, item) clicks."""
    records = [SimpleNamespace(topic=TOPIC, partition=p, offset=o, key=u.encode(),
                               value=encode_event({"user_id": u, "item_id": i,
                                                   "ts": NOW + o}), timestamp=NOW)
               for p, o, u, i in clicks]
    return decode_columns(records)


def _serving(tmp_path: Path, offsets: dict[int, int], seed: int = 0) -> ServingState:
    store = SnapshotStore(tmp_path / f"store{seed}")
    store.publish(trained_state(600, seed=seed), offsets={TOPIC: offsets}, watermark=NOW)
    snap = store.load()
    assert snap is not None
    return ServingState(snap)


def test_a_click_past_the_version_shapes_the_answer_and_counts_once(tmp_path: Path) -> None:
    v1 = _serving(tmp_path, {0: 10})
    state = v1.state
    user = state.user_ids[0]
    row = state.user_row(user)
    seen = set(state.seen(row).tolist())
    item = next(i for r, i in enumerate(state.item_ids) if i and r not in seen)
    overlay = Overlay(history=state.tables[T.USER_HIST].shape[1])
    overlay.rebase({0: 10})
    assert overlay.apply(_batch([(0, 9, user, item), (0, 10, user, item)])) == 1  # 9 is covered
    before = v1.plan(user)
    after = v1.plan(user, overlay)
    assert after.overlay_events == 1 and before.overlay_events == 0
    assert state.item_row(item) in after.exclude and state.item_row(item) not in before.exclude
    assert not np.array_equal(before.query, after.query)
    body = v1.recommend(user, 10, overlay)
    assert item not in [x["item_id"] for x in body["items"]]
    assert body["overlay"] == {"events": 1, "offsets": {"0": 11}}
    hist, _ts = v1._history(row, overlay.clicks(user))
    assert hist[0] == state.item_row(item) and list(hist[1:]) == list(
        state.tables[T.USER_HIST][row][:-1])
    # A newer version covers the click: the overlay drops it, so it is not counted twice.
    overlay.rebase({0: 11})
    assert not overlay.clicks(user).events and overlay.stats() == {"users": 0, "events": 0}
    assert v1.plan(user, overlay).overlay_events == 0


def test_a_user_only_the_overlay_knows_gets_a_personalised_answer(tmp_path: Path) -> None:
    v1 = _serving(tmp_path, {0: 0})
    state = v1.state
    items = [i for i in state.item_ids if i][:3]
    overlay = Overlay(history=state.tables[T.USER_HIST].shape[1])
    overlay.rebase({0: 0})
    overlay.apply(_batch([(0, k, "brand-new", i) for k, i in enumerate(items)]))
    assert v1.recommend("brand-new", 10)["fallback"]            # the version alone: popular
    body = v1.recommend("brand-new", 10, overlay)
    got = [x["item_id"] for x in body["items"]]
    assert not body["fallback"] and len(got) == 10 and not set(got) & set(items)
    assert got != [x["item_id"] for x in v1.recommend("brand-new", 10)["items"]]
    assert body["overlay"]["events"] == 3


def test_an_older_version_empties_the_overlay_to_be_read_again(tmp_path: Path) -> None:
    overlay = Overlay(history=5)
    overlay.rebase({0: 100})
    overlay.apply(_batch([(0, 100, "u", "i1"), (0, 101, "u", "i2")]))
    overlay.rebase({0: 50})                 # an operator pinned an older version
    assert not overlay.clicks("u").events and overlay.reach == {0: 50}


def test_the_overlay_keeps_at_most_max_events(tmp_path: Path) -> None:
    overlay = Overlay(history=5, max_events=10)
    overlay.rebase({0: 0})
    for b in range(5):
        overlay.apply(_batch([(0, b * 4 + k, f"u{b}", f"i{k}") for k in range(4)]))
    stats = overlay.stats()
    assert stats["events"] <= 10 and overlay.clicks("u4").events
    assert not overlay.clicks("u0").events   # the oldest clicks went first


def test_a_swap_between_reading_the_state_and_planning_is_planned_again(tmp_path: Path) -> None:
    from stream_rec.serving.state import plan_on_newest

    v1 = _serving(tmp_path, {0: 10})
    newer = _serving(tmp_path, {0: 20}, seed=1)
    newer.manifest.version = v1.version + 1
    overlay = Overlay(history=v1.state.tables[T.USER_HIST].shape[1])
    overlay.rebase({0: 20}, version=newer.version)   # the newer version is served meanwhile
    user = v1.state.user_ids[0]
    assert v1.plan(user, overlay).stale               # its clicks left the overlay already

    class Watcher:  # the first read sees the old state, the next one the swapped-in state
        reads = iter([v1, newer])

        @property
        def current(self) -> ServingState:
            return next(self.reads)

    planned = plan_on_newest(Watcher(), user, overlay)  # type: ignore[arg-type]
    assert planned is not None and planned[0] is newer and not planned[1].stale
