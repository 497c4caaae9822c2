"""The TensorFlow ops against NumPy float64, computed in each test."""

import concurrent.futures
import threading

import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import assert_close, oracle
from transforms import pca, tensor_ops


def test_block_moments_match_numpy_per_block():
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(5, 16, 3))
    mask = (rng.random(size=(5, 16)) < 0.7).astype(np.float64)
    mask[:, 0] = 1
    blocks *= mask[:, :, None]

    n_rows, weight, _, mean, comoment = tensor_ops.block_moments(
        blocks, mask, batch_blocks=2
    )

    for b in range(5):
        rows = blocks[b][mask[b] == 1]
        centred = rows - rows.mean(axis=0)
        assert n_rows[b] == len(rows) == weight[b]
        np.testing.assert_allclose(mean[b], rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(comoment[b], centred.T @ centred, atol=1e-12)


@pytest.mark.parametrize("ddof", [0, 1])
def test_decompose_matches_numpy_for_many_groups(ddof):
    rng = np.random.default_rng(4)
    groups = [rng.normal(size=(n, 5)) @ rng.normal(size=(5, 5)) for n in (6, 40, 300)]
    n_rows = np.array([len(g) for g in groups])
    comoment = np.stack([(g - g.mean(0)).T @ (g - g.mean(0)) for g in groups])

    outputs = tensor_ops.decompose(n_rows - ddof, comoment)

    names = [
        "covariance",
        "correlation",
        "components",
        "explained_variance",
        "explained_variance_ratio",
    ]
    for i, values in enumerate(groups):
        expected = oracle(values, ddof)
        for name, result in zip(names, outputs[:5], strict=True):
            # float64 eigen-solvers agree to about 1e-13 relative to the
            # largest eigenvalue for well-separated eigenvalues.
            assert_close(result[i], expected[name], rtol=1e-9)


def test_sign_rule_makes_the_largest_entry_positive():
    comoment = np.array([[[2.0, -1.9], [-1.9, 2.0]], [[1.0, 0.0], [0.0, 3.0]]])

    _, _, components, _, _, _ = tensor_ops.decompose(np.array([9.0, 9.0]), comoment)

    for axes in components:
        largest = axes[np.arange(2), np.abs(axes).argmax(axis=1)]
        assert (largest > 0).all()


def test_projection_by_gathered_bases_matches_numpy():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(100, 4))
    group = rng.integers(0, 3, size=100)
    moments = pca.batch_moments(pa.array(group), values, "float64", 16, 4)
    bases, _ = pca.fit_bases(moments, ddof=1, n_components=3)

    index = pca.lookup_groups(bases, pa.array(group))
    scores = pca.Projector(bases, "float64").project(index, values)

    for g in range(3):
        rows = values[group == g]
        expected_axes = oracle(rows)["components"][:3]
        expected = (rows - rows.mean(axis=0)) @ expected_axes.T
        assert_close(scores[group == g], expected, rtol=1e-9)


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_gathered_matmul_over_many_chunks_matches_numpy(monkeypatch, dtype, rtol):
    rng = np.random.default_rng(8)
    rows = rng.normal(size=(1000, 5)) + 1e3
    group = rng.integers(0, 7, size=1000)
    offsets = rng.normal(size=(7, 5)) + 1e3
    matrices = rng.normal(size=(7, 3, 5))
    # 64 gathered entries a chunk: 4 rows of 3 x 5, so 250 chunks.
    monkeypatch.setattr(tensor_ops, "GATHER_VALUES", 64)

    scores = tensor_ops.gathered_matmul(
        rows, group, offsets, matrices.astype(dtype), transpose_b=True
    )
    rebuilt = tensor_ops.gathered_matmul(
        scores, group, np.zeros((7, 3)), matrices.astype(dtype)
    )

    centred = rows - offsets[group]
    expected = np.einsum("nm,npm->np", centred, matrices[group])
    assert_close(scores, expected, rtol=rtol)
    assert_close(rebuilt, np.einsum("np,npm->nm", expected, matrices[group]), rtol)


def test_block_moments_in_two_threads_at_once_match_one_thread():
    rng = np.random.default_rng(10)
    inputs = []
    for n_features in (3, 4):
        blocks = rng.normal(size=(300, 8, n_features))
        inputs.append((blocks, np.ones((300, 8))))
    expected = [tensor_ops.block_moments(b, m, batch_blocks=7) for b, m in inputs]

    # Each thread gets its own tf.data pipeline (a Beam worker may run
    # bundles in threads); a shared one would mix the batches.
    barrier = threading.Barrier(2)

    def run(blocks, mask):
        barrier.wait()
        return [
            tensor_ops.block_moments(blocks, mask, batch_blocks=7) for _ in range(5)
        ]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda pair: run(*pair), inputs))

    for runs, wanted in zip(results, expected, strict=True):
        for found in runs:
            for array, expected_array in zip(found, wanted, strict=True):
                np.testing.assert_array_equal(array, expected_array)
