"""A gang of ranks trains one model: replicas bitwise equal, counts exact, versions whole.

Ranks run as threads of this process (:class:`ThreadExchange`), with the same
code a process gang runs over torch.distributed. The stream is cut into rounds
of random sizes; rank r gets the events whose partition p (a hash of the user
over 4 partitions) has p mod W = r.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stream_rec import datasets
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model import tables as T
from stream_rec.model.delta import apply_delta
from stream_rec.model.exchange import ThreadExchange
from stream_rec.model.gang import GangModel
from stream_rec.model.gang_state import (
    assemble_delta,
    assemble_full,
    owned,
    replica_digest,
    restore_rank,
    share_of,
)
from stream_rec.model.gang_step import _rank_sum
from stream_rec.model.ids import id_hash

PARTITIONS = 4
EVENTS = list(itertools.islice(datasets.iter_synthetic(n_users=150, n_items=250, seed=5), 4000))
USERS = [e["user_id"] for e in EVENTS]
ITEMS = [e["item_id"] for e in EVENTS]
TS = np.array([e["ts"] for e in EVENTS], dtype=np.int64)
PART = np.array([id_hash(u) % PARTITIONS for u in USERS], dtype=np.int64)
_rng = np.random.default_rng(1)
CUTS = np.unique(np.concatenate([[0], _rng.integers(1, len(EVENTS), 12), [len(EVENTS)]]))
ROUNDS = list(zip(CUTS[:-1].tolist(), CUTS[1:].tolist()))

CONFIGS = {
    "default": {},
    "untied_l2": {"tied": False, "l2": 1e-4},
    "transition_two_steps": {"transition": True, "steps": 2, "inbatch_negatives": 64},
    "admission_shared": {"admit_after": 2, "shared_rows": 8},
    "caps": {"max_users": 60, "max_items": 90, "ttl_ms": 3_600_000},
}


def small(**extra: object) -> ModelConfig:
    return ModelConfig(dim=8, train_chunk=300, negatives=16, replay=200, replay_per_step=60,
                       **extra)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _mine(a: int, b: int, rank: int, world: int) -> np.ndarray:
    idx = np.arange(a, b)
    return idx[PART[idx] % world == rank]


def _round(m: GangModel, a: int, b: int):
    idx = _mine(a, b, m.rank, m.world)
    return m.learn_round([USERS[j] for j in idx], [ITEMS[j] for j in idx], TS[idx],
                         partitions=PART[idx])


def _counts(state, side: str) -> dict[str, int]:
    ids = state.user_ids if side == "user" else state.item_ids
    return {i: int(n) for i, n in zip(ids, state.tables[side + ".events"]) if i and n}


def _single(cfg: ModelConfig, rounds=ROUNDS) -> tuple[StreamingModel, list]:
    m = StreamingModel(cfg, device="cpu")
    return m, [m.learn(USERS[a:b], ITEMS[a:b], TS[a:b]) for a, b in rounds]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_gang_of_one_is_the_single_worker_bit_for_bit(name: str) -> None:
    cfg = small(**CONFIGS[name])
    single, changed = _single(cfg)

    def body(ex: ThreadExchange):
        m = GangModel(cfg, device="cpu", exchange=ex)
        return m, [_round(m, a, b).changed for a, b in ROUNDS]

    [(gang, gchanged)] = ThreadExchange.run(1, body)
    a, b = single.state(), gang.state()
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    for k in a.tables:
        np.testing.assert_array_equal(a.tables[k], b.tables[k], err_msg=k)
    for x, y in zip(changed, gchanged):
        np.testing.assert_array_equal(x.users, y.users)
        np.testing.assert_array_equal(x.items, y.items)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["default", "untied_l2", "transition_two_steps"])
def test_replicas_stay_bitwise_equal_and_count_what_one_worker_counts(name: str,
                                                                      world: int) -> None:
    cfg = small(**CONFIGS[name])
    single, _ = _single(cfg)

    def body(ex: ThreadExchange):
        m = GangModel(cfg, device="cpu", exchange=ex)
        digests = []
        for a, b in ROUNDS:
            _round(m, a, b)
            digests.append(replica_digest(m))
        return m, digests

    out = ThreadExchange.run(world, body)
    for k in range(len(ROUNDS)):
        assert len({digests[k] for _, digests in out}) == 1, f"replicas differ after round {k}"
    state = out[0][0].state()
    assert _counts(state, "item") == _counts(single.state(), "item")
    assert _counts(state, "user") == _counts(single.state(), "user")
    assert out[0][0].step == single.step   # chunks are counted over the whole gang


def _publishing_gang(cfg: ModelConfig, world: int, publish_after: set[int], full_at: int,
                     rounds=ROUNDS, restored=None):
    """Run rounds; after each round in ``publish_after`` rank 0 assembles a version."""

    def body(ex: ThreadExchange):
        m = restore_rank(restored, ex, device="cpu", cfg=cfg) if restored is not None \
            else GangModel(cfg, device="cpu", exchange=ex)
        versions = []
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        for k, (a, b) in enumerate(rounds):
            ch = _round(m, a, b).changed
            users.append(ch.users)
            items.append(ch.items)
            if k not in publish_after:
                continue
            full = k == full_at
            changed_u = np.unique(np.concatenate(users))
            shares = ex.gather(share_of(m, changed_u, full, digest=True))
            if shares is not None:
                assert len({s.digest for s in shares}) == 1
                if full:
                    versions.append(("full", assemble_full(m.state(), shares, cfg)))
                else:
                    own = m.delta(owned(m, changed_u), np.unique(np.concatenate(items)))
                    versions.append(("delta", assemble_delta(own, shares, cfg)))
            users, items = [], []
        return m, versions

    return ThreadExchange.run(world, body)


def test_versions_chain_hold_every_owner_and_a_restart_continues_bit_for_bit() -> None:
    cfg = small()
    world, half = 2, len(ROUNDS) // 2
    out = _publishing_gang(cfg, world, publish_after={2, 4, half - 1}, full_at=2,
                           rounds=ROUNDS[:half])
    versions = out[0][1]
    assert [k for k, _ in versions] == ["full", "delta", "delta"]
    state = versions[0][1]
    for _, delta in versions[1:]:
        state = apply_delta(state, delta)
    whole = _publishing_gang(cfg, world, publish_after={half - 1}, full_at=half - 1,
                             rounds=ROUNDS[:half])[0][1][0][1]
    for k in whole.tables:
        np.testing.assert_array_equal(state.tables[k], whole.tables[k], err_msg=k)
    single, _ = _single(cfg, ROUNDS[:half])
    assert _counts(state, "user") == _counts(single.state(), "user")
    assert _counts(state, "item") == _counts(single.state(), "item")
    # every user row is its owner's
    for r, (m, _) in enumerate(out):
        mine = np.flatnonzero(m.owner[:m.n_users] == r)
        np.testing.assert_array_equal(state.tables[T.USER_HIST][mine], m.fast.hist[mine])
        np.testing.assert_array_equal(state.tables[T.USER_VEC][mine],
                                      m.params.user_vec[mine].numpy())

    # restart from the version and continue: the same as never stopping
    cont = _publishing_gang(cfg, world, set(), -1, rounds=ROUNDS[half:], restored=whole)
    never = _publishing_gang(cfg, world, set(), -1)
    for r, ((a, _), (b, _)) in enumerate(zip(cont, never)):
        assert replica_digest(a) == replica_digest(b)
        sa, sb = a.state(), b.state()
        mine = np.flatnonzero(b.owner[:b.n_users] == r)   # a rank's copy of others' users is
        for k in sa.tables:                              # theirs as of the restore
            if T.kind(k) == "user":
                np.testing.assert_array_equal(sa.tables[k][mine], sb.tables[k][mine], err_msg=k)
            elif k not in T.RAGGED:
                np.testing.assert_array_equal(sa.tables[k], sb.tables[k], err_msg=k)
        for u in mine.tolist():
            np.testing.assert_array_equal(a.seen_rows(u), b.seen_rows(u))


@pytest.mark.parametrize("world_after", [1, 3])
def test_a_version_restores_under_another_gang_size_and_in_a_single_worker(
        world_after: int) -> None:
    cfg = small()
    half = len(ROUNDS) // 2
    version = _publishing_gang(cfg, 2, {half - 1}, half - 1, rounds=ROUNDS[:half])[0][1][0][1]
    assert len(version.tables[T.CHUNK + "user"]) > 0     # pending events travel with it
    single, _ = _single(cfg)
    after = _publishing_gang(cfg, world_after, set(), -1, rounds=ROUNDS[half:],
                             restored=version)
    assert _counts(after[0][0].state(), "item") == _counts(single.state(), "item")
    assert _counts(after[0][0].state(), "user") == _counts(single.state(), "user")
    worker = StreamingModel.from_state(version, device="cpu", cfg=cfg)
    for a, b in ROUNDS[half:]:
        worker.learn(USERS[a:b], ITEMS[a:b], TS[a:b])
    assert _counts(worker.state(), "item") == _counts(single.state(), "item")


def test_gradients_are_summed_in_rank_order() -> None:
    g = torch.Generator().manual_seed(0)
    pieces = [(torch.tensor([1, 4, 9]), torch.randn(3, 5, generator=g)),
              (torch.tensor([4, 7]), torch.randn(2, 5, generator=g)),
              (torch.tensor([1, 4]), torch.randn(2, 5, generator=g) * 1e4)]
    union = torch.tensor([1, 4, 7, 9])
    got = _rank_sum(union, pieces)
    want = torch.zeros(4, 5)
    for rows, vals in pieces:
        for r, v in zip(rows.tolist(), vals):
            k = union.tolist().index(r)
            want[k] = want[k] + v
    assert torch.equal(got, want)


def test_a_gang_refuses_what_it_cannot_keep_consistent() -> None:
    def body(ex: ThreadExchange):
        m = GangModel(small(), device="cpu", exchange=ex)
        with pytest.raises(TypeError):
            m.learn(["u"], ["i"], np.array([1]))
        if ex.world > 1:
            with pytest.raises(ValueError, match="shared_rows"):
                GangModel(small(admit_after=2, shared_rows=4), device="cpu", exchange=ex)
        with pytest.raises(ValueError, match="item text"):   # W is neither read nor summed
            GangModel(small(content_dim=8), device="cpu", exchange=ex)

    ThreadExchange.run(2, body)
