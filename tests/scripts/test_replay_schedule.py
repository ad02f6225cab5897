"""The think-time replay order used by scripts/bench_served_quality.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from replay_schedule import think_time_schedule


def _bursty_users(n: int, seed: int = 0) -> np.ndarray:
    """Users clicking in bursts, as in MovieLens: runs of 1-29 clicks by one of 1 000 users."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        out.extend([int(rng.integers(1000))] * int(rng.integers(1, 30)))
    return np.asarray(out[:n])


@pytest.mark.parametrize(("rate", "think_s"), [(1000, 0.1), (300, 1.0), (50, 0.0)])
def test_order_think_time_and_rate_hold(rate: float, think_s: float) -> None:
    users = _bursty_users(20_000)
    s = think_time_schedule(users, rate, think_s)
    assert sorted(s.order.tolist()) == list(range(len(users)))      # every event, once
    assert np.all(np.diff(s.at_s) >= 1 / rate - 1e-6)                # never above the rate
    sent_users = users[s.order]
    for u in np.unique(users):
        pos = np.flatnonzero(sent_users == u)
        assert np.all(np.diff(s.order[pos]) > 0)                      # the user's own order
        assert np.all(np.diff(s.at_s[pos]) >= think_s - 1e-6)         # the think time
    # While enough users may click, every slot is used: the aggregate rate is kept.
    half = len(users) // 2
    assert s.at_s[half] == pytest.approx(half * round(1e6 / rate) / 1e6)  # slots in whole µs


def test_others_go_ahead_and_dataset_order_breaks_ties() -> None:
    s = think_time_schedule(["a", "a", "a", "b", "c", "b"], rate=1000, think_s=0.0025)
    # a's burst is spread out (2.5 ms: the next 1 ms slot is at 3 ms); b and c go in
    # between; at 5 ms nobody may click, so the clock waits for a at 5.5 ms.
    assert s.order.tolist() == [0, 3, 4, 1, 5, 2]
    assert s.at_s.tolist() == [0.0, 0.001, 0.002, 0.003, 0.004, 0.0055]
    assert s.full_rate_until(1000) == 0.004


def test_the_clock_jumps_when_nobody_may_click_and_prefixes_are_schedules() -> None:
    s = think_time_schedule([7, 7, 7], rate=100, think_s=1.0)
    assert s.at_s.tolist() == [0.0, 1.0, 2.0]
    assert s.until(1.5).order.tolist() == [0, 1]
    assert s.until(None).order.tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        think_time_schedule([1], rate=0, think_s=1.0)
