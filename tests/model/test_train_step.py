"""The explicit training step: equal to the autograd reference, deterministic, sync-free.

The reference (:mod:`stream_rec.model.reference`) is the step as autograd
differentiates it; both draw the same replayed events and negatives, so after
many chunks their states differ only by float rounding. Every configuration
family runs through both history-side kernels and through CUDA's plan (graph
buckets, gathers and ``index_add_``), so the code CUDA runs is tested here on CPU.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model.reference import ReferenceTrainer, _seen_mask
from stream_rec.model.reference import prepare_step as reference_prepare
from stream_rec.model.step import _mask, run_step, unpack
from stream_rec.model.train import Plan, Workspace, prepare_chunk, prepare_step

SMALL = {"dim": 16, "history": 8, "negatives": 48, "replay": 300, "replay_per_step": 60,
         "train_chunk": 100}
FAMILIES = {
    "default": {},
    "untied-transition-history-mask": {"tied": False, "transition": True, "mask_seen": False,
                                       "pop_weight": 0.3, "l2": 1e-3},
    "shared-negatives": {"inbatch_negatives": 40, "use_user_vector": False},
    "shared-history-transition": {"inbatch_negatives": 40, "mask_seen": False,
                                  "transition": True},
    "logq-decay-l2-two-steps": {"logq": 1.0, "acc_decay": 0.99, "l2": 1e-3, "steps": 2},
    "no-mask-slots-only": {"mask_seen": False, "mask_history": False, "pos_lr_scale": 1.0,
                           "time_buckets_s": []},
    "expiry-admission": {"ttl_ms": 30_000, "admit_after": 2},
}
PLANS = {"cpu": Plan(), "gather": Plan(csr=False), "cuda-plan": Plan.for_device("cuda")}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded machine a second one makes these small steps wait on
    a descheduled thread at every parallel region (30x slower, same results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream(n: int, seed: int = 0) -> tuple[list, list, np.ndarray]:
    ev = list(itertools.islice(iter_synthetic(n_users=120, n_items=300, seed=seed), n))
    return ([e["user_id"] for e in ev], [e["item_id"] for e in ev],
            np.array([e["ts"] for e in ev], dtype=np.int64))


def _feed(m: StreamingModel, data: tuple, batch: int = 500) -> None:
    users, items, ts = data
    for s in range(0, len(users), batch):
        m.learn(users[s:s + batch], items[s:s + batch], ts[s:s + batch])


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    fin = np.isfinite(b)
    assert np.array_equal(fin, np.isfinite(a))
    a, b = a[fin].astype(np.float64), b[fin].astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [(f, "cpu") for f in FAMILIES] + [(f, "cuda-plan") for f in FAMILIES] + [
    ("default", "gather")]


@pytest.mark.parametrize("family, plan", CASES)
def test_explicit_step_matches_autograd(family: str, plan: str) -> None:
    """40 chunks: every float table within 2e-5 relative of the autograd step's."""
    cfg = ModelConfig(**SMALL, **FAMILIES[family])
    data = _stream(4000)
    new, ref = StreamingModel(cfg, device="cpu"), StreamingModel(cfg, device="cpu")
    new.trainer.plan = PLANS[plan]
    ref.trainer = ReferenceTrainer(cfg, ref.params)  # type: ignore[assignment]
    _feed(new, data)
    _feed(ref, data)
    assert new.step == ref.step == 40
    sa, sb = new.state(), ref.state()
    assert sa.user_ids == sb.user_ids and sa.item_ids == sb.item_ids
    for name, want in sb.tables.items():
        got = sa.tables[name]
        if want.dtype.kind != "f":
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif want.size:
            assert _rel_diff(got, want) < 2e-5, name
    # the step did learn: the tables moved away from their initial values
    assert np.abs(sa.tables["item.bias"]).max() > 1e-3


def test_deterministic_with_two_threads() -> None:
    """The same stream twice with 2 torch threads: bitwise equal (the autograd step is not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = _stream(6000, seed=4)
        states = []
        for _ in range(2):
            m = StreamingModel(ModelConfig(dim=64, train_chunk=1000), device="cpu")
            _feed(m, data, batch=1000)
            states.append(m.state())
    finally:
        torch.set_num_threads(threads)
    for name, a in states[0].tables.items():
        assert a.tobytes() == states[1].tables[name].tobytes(), name


@pytest.mark.parametrize("plan", list(PLANS))
def test_scratch_rows_stay_zero(plan: str) -> None:
    """Padding reads and writes only the scratch row, and every gradient it gets is 0."""
    cfg = ModelConfig(**SMALL, transition=True, l2=1e-3)
    m = StreamingModel(cfg, device="cpu")
    m.trainer.plan = PLANS[plan]
    _feed(m, _stream(1500, seed=2))
    for name, t in m.params.full.items():
        assert not t[0].any(), name


def _chunk_inputs(cfg: ModelConfig, seed: int = 1) -> tuple[StreamingModel, tuple]:
    """A model fed 2 000 events, and the arguments of a prepare call on its state."""
    m = StreamingModel(cfg, device="cpu")
    _feed(m, _stream(1500, seed=seed))
    events = m.replay.buffer.take(slice(0, 100))
    return m, (events, m.replay, m.fast.seen, m.fast.pop[:m.n_items], m.n_users, 99)


def test_preparation_ignores_parameters_and_capacity() -> None:
    """A chunk prepared before the parameters change and the tables grow trains exactly
    like one prepared after."""
    cfg = ModelConfig(**SMALL)
    m, args = _chunk_inputs(cfg)
    early = prepare_chunk(cfg, *args)
    twin = StreamingModel.from_state(m.state(), device="cpu")
    m.trainer.run(prepare_chunk(cfg, *args))                   # the parameters move
    again = prepare_chunk(cfg, *args)
    for a, b in zip(early.steps, again.steps):
        assert a.shape == b.shape and np.array_equal(a.buf, b.buf)
    twin.params.grow_items(4 * twin.n_items)                    # capacity changes
    twin.params.grow_users(4 * twin.n_users)
    twin.trainer.run(early)
    sa, sb = m.state(), twin.state()
    for name in ("item.out", "item.bias", "user.vec", "global.pos_w"):
        assert sa.tables[name].tobytes() == sb.tables[name].tobytes(), name


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["default", "untied-transition-history-mask",
                                    "shared-history-transition", "logq-decay-l2-two-steps"])
def test_step_never_reads_back_to_the_host(family: str) -> None:
    """No operation whose output size or value the host must wait for (CUDA graph-safe)."""
    cfg = ModelConfig(**SMALL, **FAMILIES[family])
    m, args = _chunk_inputs(cfg)
    chunk = prepare_chunk(cfg, *args, plan=Plan.for_device("cuda"))
    with _Ops() as ops:
        for b in chunk.steps:
            run_step(m.params, cfg, b.shape, torch.from_numpy(b.buf))
    syncing = {"nonzero", "_local_scalar_dense", "item", "masked_select", "unique",
               "_unique2", "index_put_", "_index_put_impl_", "bincount", "repeat_interleave"}
    names = [n.split(".")[0] for n in ops.names]
    assert not syncing & set(names)
    views = {"slice", "view", "unsqueeze", "select", "t", "squeeze", "lift_fresh", "detach",
             "values"}
    assert sum(n not in views for n in names) / len(chunk.steps) < 110


@pytest.mark.parametrize("which", ["mask_seen", "mask_history"])
def test_device_mask_is_the_host_mask(which: str) -> None:
    """The (event, candidate) cells masked on the device are those the host computed."""
    cfg = ModelConfig(**SMALL, mask_seen=which == "mask_seen", mask_history=True)
    _, (events, _, seen, pop, n_users, _) = _chunk_inputs(cfg, seed=5)
    b = prepare_step(cfg, events, np.random.default_rng(3), seen, pop, n_users, Plan(), Workspace())
    old = reference_prepare(cfg, events, np.random.default_rng(3), seen, pop, n_users)
    f = unpack(torch.from_numpy(b.buf), b.shape, cfg)
    mask = _mask(f, cfg, b.shape, f["cand"])
    mask.scatter_(1, f["label"].unsqueeze(1), False)
    ev_idx, col = np.nonzero(mask.numpy())
    cand = f["cand"].numpy()
    # items that are not candidates land in the padding columns (row 0), masked anyway
    got = {(e, int(cand[c]) - 1) for e, c in zip(ev_idx.tolist(), col.tolist()) if cand[c]}
    assert ev_idx.max() < len(events)
    if which == "mask_seen":
        rows, cols = _seen_mask(events, seen, old.cand, old.label, len(pop))
    else:
        rows, cols = old.mask_rows, old.mask_cols
    want = set(zip(rows.tolist(), old.cand[cols].tolist()))
    assert got == want and len(want) > 20


def test_params_key_changes_when_a_tensor_is_replaced() -> None:
    """A captured graph is keyed on the tensors it addresses: growth and restore change it."""
    m = StreamingModel(ModelConfig(**SMALL), device="cpu")
    _feed(m, _stream(600))
    k0 = m.params.key()
    assert m.params.key() == k0
    m.params.grow_items(10 * m.n_items)
    k1 = m.params.key()
    assert k1 != k0
    m2 = StreamingModel.from_state(m.state(), device="cpu")
    assert m2.params.key() != k1
