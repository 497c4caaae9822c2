"""TensorFlow ops over many groups at once: moments, decomposition, projection.

Nothing here knows of Beam. Every op takes tensors whose leading axis is the
block or the group, so one call serves a whole batch of groups (the "tensor
PCA" layout). Inputs are NumPy arrays, outputs NumPy arrays.
"""

from __future__ import annotations

import functools
import os

import numpy as np

# TensorFlow's C++ start-up notices (CPU features, absl) would stand before
# the stage's own log lines; warnings and errors still come through.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

DTYPES = {"float32": tf.float32, "float64": tf.float64}


@functools.cache
def _block_moments_fn(dtype: tf.DType):
    spec = [
        tf.TensorSpec([None, None, None], dtype),
        tf.TensorSpec([None, None], dtype),
    ]

    @tf.function(input_signature=spec, reduce_retracing=True)
    def block_moments(blocks, mask):
        n_rows = tf.reduce_sum(mask, axis=1)
        mean = tf.reduce_sum(blocks, axis=1) / tf.maximum(n_rows, 1)[:, None]
        centred = (blocks - mean[:, None, :]) * mask[:, :, None]
        comoment = tf.matmul(centred, centred, transpose_a=True)
        return n_rows, mean, comoment

    return block_moments


def block_moments(
    blocks: np.ndarray, mask: np.ndarray, batch_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row count, mean and centred co-moment of every block.

    The blocks stream through a ``tf.data`` pipeline in batches of
    ``batch_blocks`` blocks; each batch is one batched matmul.

    Args:
        blocks: float32 or float64, shape (n_blocks, block_size, n_features),
            padding rows all 0.
        mask: same dtype, shape (n_blocks, block_size), 1 for a real row.
        batch_blocks: blocks per ``tf.data`` batch.

    Returns:
        n_rows: int64, shape (n_blocks,).
        mean: float64, shape (n_blocks, n_features).
        comoment: float64, shape (n_blocks, n_features, n_features).
    """
    fn = _block_moments_fn(tf.as_dtype(blocks.dtype))
    dataset = (
        tf.data.Dataset.from_tensor_slices((blocks, mask))
        .batch(batch_blocks)
        .map(fn, num_parallel_calls=1, deterministic=True)
        .prefetch(1)
    )
    counts, means, comoments = [], [], []
    for n_rows, mean, comoment in dataset.as_numpy_iterator():
        counts.append(n_rows)
        means.append(mean)
        comoments.append(comoment)
    n_features = blocks.shape[2]
    if not counts:
        return (
            np.zeros(0, np.int64),
            np.zeros((0, n_features)),
            np.zeros((0, n_features, n_features)),
        )
    return (
        np.rint(np.concatenate(counts)).astype(np.int64),
        np.concatenate(means).astype(np.float64),
        np.concatenate(comoments).astype(np.float64),
    )


@tf.function(
    input_signature=[
        tf.TensorSpec([None], tf.float64),
        tf.TensorSpec([None, None, None], tf.float64),
        tf.TensorSpec([], tf.float64),
    ],
    reduce_retracing=True,
)
def _decompose(n_rows, comoment, ddof):
    covariance = comoment / (n_rows - ddof)[:, None, None]
    covariance = 0.5 * (covariance + tf.linalg.matrix_transpose(covariance))

    # Correlation without an epsilon: a zero variance gives NaN, as NumPy's
    # corrcoef does; the diagonal is exactly 1 where the variance is positive.
    variance = tf.linalg.diag_part(covariance)
    std = tf.sqrt(tf.maximum(variance, 0.0))
    scale = std[:, :, None] * std[:, None, :]
    nan = tf.constant(np.nan, tf.float64)
    correlation = tf.where(scale > 0, covariance / scale, nan)
    correlation = tf.where(
        tf.math.is_nan(correlation),
        correlation,
        tf.clip_by_value(correlation, -1.0, 1.0),
    )
    diagonal = tf.where(variance > 0, tf.ones_like(variance), nan)
    correlation = tf.linalg.set_diag(correlation, diagonal)

    # eigh returns ascending eigenvalues with eigenvectors in the columns.
    eigenvalues, eigenvectors = tf.linalg.eigh(covariance)
    eigenvalues = tf.reverse(eigenvalues, axis=[-1])
    n_clipped = tf.reduce_sum(tf.cast(eigenvalues < 0, tf.int64), axis=-1)
    eigenvalues = tf.maximum(eigenvalues, 0.0)
    components = tf.reverse(tf.linalg.matrix_transpose(eigenvectors), axis=[-2])

    # Sign rule: the entry of largest absolute value of each axis is positive.
    largest = tf.argmax(tf.abs(components), axis=-1)
    pivot = tf.gather(components, largest, axis=-1, batch_dims=2)
    sign = tf.where(pivot < 0, -tf.ones_like(pivot), tf.ones_like(pivot))
    components = components * sign[:, :, None]

    total = tf.reduce_sum(eigenvalues, axis=-1, keepdims=True)
    ratio = tf.where(
        total > 0, eigenvalues / tf.where(total > 0, total, 1.0), tf.zeros_like(total)
    )
    return covariance, correlation, components, eigenvalues, ratio, n_clipped


def decompose(
    n_rows: np.ndarray, comoment: np.ndarray, ddof: int
) -> tuple[np.ndarray, ...]:
    """Covariance, correlation and full eigen-decomposition of many groups.

    Always float64: the decomposition is cheap next to the moments and its
    accuracy is what every output figure rests on.

    Args:
        n_rows: int64, shape (n_groups,), each above ``ddof``.
        comoment: float64, shape (n_groups, n_features, n_features).
        ddof: the covariance divisor is ``n_rows - ddof``.

    Returns:
        covariance: float64, shape (n_groups, n_features, n_features).
        correlation: float64, same shape; NaN in the rows and columns of a
            feature with zero variance.
        components: float64, shape (n_groups, n_features, n_features); row i
            is the unit eigenvector of the i-th largest eigenvalue, its entry
            of largest absolute value positive.
        explained_variance: float64, shape (n_groups, n_features), the
            eigenvalues in decreasing order, round-off below zero clipped to 0.
        explained_variance_ratio: float64, shape (n_groups, n_features), each
            eigenvalue over their sum; 0 where the sum is 0.
        n_clipped: int64, shape (n_groups,), eigenvalues that round-off had
            made negative, clipped to 0.
    """
    outputs = _decompose(
        tf.constant(n_rows, tf.float64),
        tf.constant(comoment, tf.float64),
        tf.constant(float(ddof), tf.float64),
    )
    return tuple(output.numpy() for output in outputs)


@functools.cache
def _block_matmul_fn(dtype: tf.DType, transpose_b: bool):
    spec = [
        tf.TensorSpec([None, None, None], dtype),
        tf.TensorSpec([None, None, None], dtype),
    ]

    @tf.function(input_signature=spec, reduce_retracing=True)
    def block_matmul(blocks, matrices):
        return tf.matmul(blocks, matrices, transpose_b=transpose_b)

    return block_matmul


def block_matmul(
    blocks: np.ndarray, matrices: np.ndarray, transpose_b: bool = False
) -> np.ndarray:
    """Multiply every block by its own group's matrix, in one batched matmul.

    Projection is ``block_matmul(centred, components, transpose_b=True)``;
    reconstruction is ``block_matmul(scores, components)``.

    Args:
        blocks: float32 or float64, shape (n_blocks, block_size, m).
        matrices: same dtype, shape (n_blocks, m, p), or (n_blocks, p, m)
            with ``transpose_b``.
        transpose_b: multiply by each matrix's transpose.

    Returns:
        float64, shape (n_blocks, block_size, p).
    """
    fn = _block_matmul_fn(tf.as_dtype(blocks.dtype), transpose_b)
    return fn(blocks, matrices).numpy().astype(np.float64)
