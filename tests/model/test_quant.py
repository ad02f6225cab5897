"""Vector encodings: the error each one promises, row-local encoding, and deltas across them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rec.model import ModelState, apply_delta, delta_from_state, merge_deltas, quant
from stream_rec.model import tables as T
from tests import support

QUANTIZED = ["float16", "int8"]


@functools.cache
def trained_state(n: int) -> ModelState:
    """Shared by the tests (none mutates a state: they build new tables dicts)."""
    return support.trained_state(n)


def _bound(x: np.ndarray, dtype: str) -> np.ndarray:
    """The largest error |decode(encode(x)) - x| an encoding promises, per element."""
    if dtype == "int8":
        step = np.abs(x).max(axis=1, keepdims=True) / 127
        return step / 2 * (1 + 1e-6) + 1e-30
    return np.abs(x) * 2.0 ** -11 + 2.0 ** -25  # half an ulp (and of a subnormal)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(0, 40), dim=st.integers(1, 70),
       log_scale=st.floats(-6, 3))
def test_decoding_stays_within_the_promised_error(seed: int, rows: int, dim: int,
                                                  log_scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, dim)) * 10.0 ** log_scale).astype(np.float32)
    if rows:
        x[0] = 0.0  # an all-zero row: scale 0, decodes to zeros
    for dtype in QUANTIZED:
        codes, scales = quant.encode(x, dtype)
        back = quant.decode(codes, scales)
        assert back.dtype == np.float32 and back.shape == x.shape
        assert (np.abs(back - x) <= _bound(x, dtype)).all(), dtype
    codes, scales = quant.encode(x, "int8")
    assert codes.dtype == np.int8 and scales is not None and scales.shape == (rows,)
    assert np.abs(codes.astype(np.int64)).max(initial=0) <= 127


def test_float32_is_the_table_itself_and_float16_clips_instead_of_overflowing() -> None:
    x = np.array([[1.0, -2.0], [7e4, -1e9]], dtype=np.float32)
    codes, scales = quant.encode(x, "float32")
    assert scales is None and np.array_equal(codes, x)
    codes, _ = quant.encode(x, "float16")
    assert np.isfinite(codes).all() and codes[1, 0] == np.float16(65504)
    with pytest.raises(ValueError, match="unknown vector dtype"):
        quant.encode(x, "int4")  # type: ignore[arg-type]


def test_take_decodes_only_the_rows_asked_for_in_any_shape() -> None:
    state = trained_state(300)
    for dtype in QUANTIZED:
        tables = quant.encoded(state.tables, quant.SERVING, dtype)
        q = ModelState(state.config, state.user_ids, state.item_ids, tables)
        rows = np.array([[3, 1], [0, 3]])
        got = q.vectors(T.ITEM_IN, rows)
        assert got.shape == (2, 2, state.tables[T.ITEM_IN].shape[1])
        np.testing.assert_array_equal(got[0, 0], q.vectors(T.ITEM_IN)[3])
        np.testing.assert_array_equal(q.vectors(T.USER_VEC, 2), q.vectors(T.USER_VEC)[2])
        x = state.tables[T.ITEM_VECTORS]
        assert (np.abs(q.vectors(T.ITEM_VECTORS) - x) <= _bound(x, dtype)).all()
        assert quant.nbytes(tables) < quant.nbytes(state.tables)


def test_encoding_is_row_local_so_rows_encoded_alone_equal_the_whole_table() -> None:
    x = trained_state(300).tables[T.ITEM_VECTORS]
    for dtype in QUANTIZED:
        whole_c, whole_s = quant.encode(x, dtype)
        part_c, part_s = quant.encode(x[5:9], dtype)
        np.testing.assert_array_equal(part_c, whole_c[5:9])
        if whole_s is not None:
            assert part_s is not None
            np.testing.assert_array_equal(part_s, whole_s[5:9])


@pytest.mark.parametrize("base_dtype", quant.DTYPES)
@pytest.mark.parametrize("delta_dtype", quant.DTYPES)
def test_a_delta_applies_over_a_base_held_in_another_encoding(base_dtype: str,
                                                              delta_dtype: str) -> None:
    """The delta's rows take the base's encoding: the result equals the new state encoded
    whole in the base's encoding (decoded rows re-encode to the codes they had)."""
    old, new = trained_state(300), trained_state(600)
    users, items = np.arange(0, len(new.user_ids), 3), np.arange(len(new.item_ids))
    base = ModelState(old.config, old.user_ids, old.item_ids,
                      quant.encoded(old.tables, quant.SERVING, base_dtype))
    delta = delta_from_state(new, users, items)
    delta.tables = quant.encoded(delta.tables, quant.SERVING, delta_dtype)
    got = apply_delta(base, delta)
    want = apply_delta(old, delta_from_state(new, users, items))
    for name in quant.SERVING:
        assert quant.encoding(got.tables, name) == base_dtype
        exact = want.tables[name]
        err = np.abs(got.vectors(name) - exact)
        tol = sum(_bound(exact, d) for d in {base_dtype, delta_dtype} - {"float32"}) + 1e-7
        assert (err <= tol).all(), name
    if base_dtype == delta_dtype:  # one encoding: exactly the state encoded whole
        whole = quant.encoded(want.tables, quant.SERVING, base_dtype)
        for name in quant.SERVING:
            np.testing.assert_array_equal(got.tables[name], whole[name])


def test_merging_deltas_of_different_encodings_merges_them_as_float32() -> None:
    a, b = trained_state(300), trained_state(600)
    d1 = delta_from_state(a, np.arange(5), np.arange(7))
    d2 = delta_from_state(b, np.arange(3, 9), np.arange(4, 12))
    d1.tables = quant.encoded(d1.tables, quant.SERVING, "int8")
    merged = merge_deltas([d1, d2])
    assert quant.encoding(merged.tables, T.ITEM_VECTORS) == "float32"
    assert T.ITEM_VECTORS + quant.SCALE not in merged.tables
    np.testing.assert_array_equal(merged.tables[T.ITEM_VECTORS][4:],
                                  b.tables[T.ITEM_VECTORS][4:12])
    d2.tables = quant.encoded(d2.tables, quant.SERVING, "int8")
    same = merge_deltas([d1, d2])   # one encoding: codes and scales merged as they are
    assert quant.encoding(same.tables, T.ITEM_VECTORS) == "int8"
    np.testing.assert_array_equal(same.tables[T.ITEM_VECTORS + quant.SCALE][4:],
                                  d2.tables[T.ITEM_VECTORS + quant.SCALE])


@pytest.mark.parametrize("break_it", ["no-scale", "scale-shape", "negative-scale", "stray-scale",
                                      "f16-inf", "wrong-dtype"])
def test_check_refuses_tables_a_reader_could_not_decode(break_it: str) -> None:
    tables = quant.encoded(trained_state(300).tables, quant.SERVING, "int8")
    quant.check(tables)
    scale = T.ITEM_VECTORS + quant.SCALE
    if break_it == "no-scale":
        del tables[scale]
    elif break_it == "scale-shape":
        tables[scale] = tables[scale][:-1]
    elif break_it == "negative-scale":
        tables[scale] = -tables[scale]
    elif break_it == "stray-scale":
        tables[T.ITEM_OUT + quant.SCALE] = tables[scale]
    elif break_it == "f16-inf":
        tables[T.ITEM_IN] = np.full((3, 4), np.inf, dtype=np.float16)
        del tables[T.ITEM_IN + quant.SCALE]
    else:
        tables[T.USER_VEC] = tables[T.USER_VEC].astype(np.int16)
    with pytest.raises(ValueError):
        quant.check(tables)
