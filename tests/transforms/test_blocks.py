"""Block layout and the exact merge of moments, against NumPy float64."""

import pickle

import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import assert_close
from transforms import blocks
from transforms.blocks import Moments


def moments_of(keys: list, values: np.ndarray) -> Moments:
    """Moments of each row on its own: n=1, mean=row, comoment=0."""
    n_rows, n_features = values.shape
    return Moments(
        keys=pa.array(keys),
        n_rows=np.ones(n_rows, np.int64),
        weight=np.ones(n_rows),
        weight_sq=np.ones(n_rows),
        shift=values.copy(),
        mean=np.zeros_like(values),
        comoment=np.zeros((n_rows, n_features, n_features)),
    )


def test_merge_of_single_rows_gives_numpy_mean_and_comoment():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.1]
    keys = list(rng.integers(0, 4, size=200))

    merged = blocks.merge_moments([moments_of(keys, values)])

    for i, key in enumerate(merged.keys.to_pylist()):
        rows = values[np.array(keys) == key]
        centred = rows - rows.mean(axis=0)
        assert merged.n_rows[i] == len(rows)
        # float64 sums of a few hundred terms: round-off about 1e-14.
        np.testing.assert_allclose(merged.full_mean[i], rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(
            merged.comoment[i], centred.T @ centred, rtol=1e-12, atol=1e-12
        )


def test_split_then_merge_equals_one_pass():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(300, 4))
    keys = list(rng.integers(0, 5, size=300))
    one_pass = blocks.merge_moments([moments_of(keys, values)])

    parts = [
        blocks.merge_moments([moments_of(keys[a:b], values[a:b])])
        for a, b in [(0, 7), (7, 150), (150, 151), (151, 300)]
    ]
    merged = blocks.merge_moments(parts)

    order_a = np.argsort(one_pass.keys.to_pylist())
    order_b = np.argsort(merged.keys.to_pylist())
    np.testing.assert_array_equal(one_pass.n_rows[order_a], merged.n_rows[order_b])
    np.testing.assert_allclose(
        one_pass.full_mean[order_a], merged.full_mean[order_b], rtol=1e-13
    )
    np.testing.assert_allclose(
        one_pass.comoment[order_a], merged.comoment[order_b], rtol=1e-12, atol=1e-12
    )


def test_merge_with_large_offset_keeps_the_covariance():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(10_000, 2)) + 1e9
    parts = [
        blocks.merge_moments([moments_of([0] * 1000, values[i : i + 1000])])
        for i in range(0, 10_000, 1000)
    ]

    merged = blocks.merge_moments(parts)

    covariance = merged.comoment[0] / (merged.n_rows[0] - 1)
    expected = np.cov(values, rowvar=False)
    # The values themselves hold about 1e-7 absolute at 1e9; 1e-6 relative
    # is the stage's promise for this case.
    np.testing.assert_allclose(covariance, expected, rtol=0, atol=1e-6)


def test_parts_without_rows_are_ignored():
    part = moments_of(["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    empty = blocks.empty_moments(pa.string(), 2)
    zero = Moments(
        pa.array(["a"]),
        np.zeros(1, np.int64),
        np.zeros(1),
        np.zeros(1),
        np.full((1, 2), 7.0),
        np.full((1, 2), 7.0),
        np.full((1, 2, 2), 7.0),
    )

    merged = blocks.merge_moments([empty, part, zero])

    assert merged.keys.to_pylist() == ["a", "b"]
    np.testing.assert_array_equal(merged.full_mean, [[1.0, 2.0], [3.0, 4.0]])


def test_int64_keys_above_2_to_53_stay_distinct():
    big = 2**53
    part = moments_of([big, big + 1], np.array([[1.0], [2.0]]))

    merged = blocks.merge_moments([part, part])

    assert sorted(merged.keys.to_pylist()) == [big, big + 1]
    np.testing.assert_array_equal(merged.n_rows, [2, 2])


def test_moments_survive_pickling():
    part = moments_of(["x", "y"], np.array([[1.0, 2.0], [3.0, 5.0]]))

    restored = pickle.loads(pickle.dumps(part))

    assert restored.keys.equals(part.keys)
    np.testing.assert_array_equal(restored.comoment, part.comoment)


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_layout_puts_every_row_in_one_slot_of_its_group(block_size):
    group = np.array([2, 0, 2, 2, 1, 0, 2, 2, 2])

    layout = blocks.layout_blocks(group, 3, block_size)

    cells = set(zip(layout.block.tolist(), layout.slot.tolist(), strict=True))
    assert len(cells) == len(group)
    assert (layout.slot < block_size).all()
    np.testing.assert_array_equal(layout.block_group[layout.block], group[layout.order])


def test_block_sizes_fit_each_group_within_bounds():
    counts = np.array([0, 1, 8, 9, 13, 100, 5000])

    np.testing.assert_array_equal(
        blocks.block_sizes(counts, 1024), [8, 8, 8, 12, 16, 128, 1024]
    )
    np.testing.assert_array_equal(blocks.block_sizes(counts, 1), [1] * 7)
    np.testing.assert_array_equal(
        blocks.block_sizes(counts, 100), [8, 8, 8, 12, 16, 100, 100]
    )


def test_layouts_by_size_cover_every_row_once():
    rng = np.random.default_rng(4)
    # One large group and many small ones, as with a hot key.
    group = rng.permutation(np.repeat(np.arange(6), [3000, 2, 5, 9, 30, 1]))

    layouts = blocks.layouts_by_size(group, 6, 1024, n_features=2**20)

    assert [layout.block_size for layout in layouts] == [1024, 32, 12, 8]
    rows = np.concatenate([layout.order for layout in layouts])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(group)))
    for layout in layouts:
        np.testing.assert_array_equal(
            layout.block_group[layout.block], group[layout.order]
        )
        assert (layout.slot < layout.block_size).all()


def test_segment_sums_match_reduceat():
    rng = np.random.default_rng(12)
    for _ in range(100):
        n = int(rng.integers(1, 80))
        group = np.sort(rng.integers(0, int(rng.integers(1, 25)), n))
        starts = blocks.segment_starts(group)
        matrices = rng.normal(size=(n, 3, 2))
        counts = rng.integers(0, 9, n)
        # Sums of real numbers may round differently in another order.
        assert_close(
            blocks.segment_sums(matrices, starts),
            np.add.reduceat(matrices, starts),
            rtol=1e-14,
        )
        assert np.array_equal(
            blocks.segment_sums(counts, starts), np.add.reduceat(counts, starts)
        )


def test_merge_of_mixed_single_and_repeated_keys():
    rng = np.random.default_rng(9)
    values = rng.normal(size=(50, 2)) + 1e6
    keys = [0, 1, 1, 2] + [3] * 46
    single_rows = moments_of(keys, values)
    expected = blocks.merge_moments([single_rows])

    by_pairs = [
        blocks.merge_moments([moments_of(keys[a : a + 2], values[a : a + 2])])
        for a in range(0, 50, 2)
    ]
    merged = blocks.merge_moments(by_pairs)

    assert merged.keys.to_pylist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(merged.n_rows, [1, 2, 1, 46])
    np.testing.assert_allclose(merged.full_mean, expected.full_mean, rtol=1e-15)
    np.testing.assert_allclose(merged.comoment, expected.comoment, atol=1e-8)
