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
        n_rows = tf.reduce_sum(tf.cast(mask > 0, dtype), axis=1)
        weight = tf.reduce_sum(mask, axis=1)
        weight_sq = tf.reduce_sum(mask * mask, axis=1)
        total = tf.reduce_sum(blocks * mask[:, :, None], axis=1)
        mean = total / tf.where(weight > 0, weight, tf.ones_like(weight))[:, None]
        centred = (blocks - mean[:, None, :]) * tf.sqrt(mask)[:, :, None]
        comoment = tf.matmul(centred, centred, transpose_a=True)
        return n_rows, weight, weight_sq, mean, comoment

    return block_moments


def block_moments(
    blocks: np.ndarray, mask: np.ndarray, batch_blocks: int
) -> tuple[np.ndarray, ...]:
    """Row count, weight, mean and centred co-moment of every block.

    The blocks stream through a ``tf.data`` pipeline in batches of
    ``batch_blocks`` blocks; each batch is one batched matmul.

    Args:
        blocks: float32 or float64, shape (n_blocks, block_size, n_features),
            padding rows all 0.
        mask: same dtype, shape (n_blocks, block_size), each row's weight
            (1 for unweighted rows), 0 for padding.
        batch_blocks: blocks per ``tf.data`` batch.

    Returns:
        n_rows: int64, shape (n_blocks,).
        weight: float64, shape (n_blocks,), the sum of the weights.
        weight_sq: float64, shape (n_blocks,), the sum of their squares.
        mean: float64, shape (n_blocks, n_features), weighted.
        comoment: float64, shape (n_blocks, n_features, n_features),
            sum_i w_i (x_i - mean)^T (x_i - mean).
    """
    fn = _block_moments_fn(tf.as_dtype(blocks.dtype))
    dataset = (
        tf.data.Dataset.from_tensor_slices((blocks, mask))
        .batch(batch_blocks)
        .map(fn, num_parallel_calls=1, deterministic=True)
        .prefetch(1)
    )
    outputs = [[] for _ in range(5)]
    for batch in dataset.as_numpy_iterator():
        for collected, output in zip(outputs, batch, strict=True):
            collected.append(output)
    n_features = blocks.shape[2]
    if not outputs[0]:
        return (
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, n_features)),
            np.zeros((0, n_features, n_features)),
        )
    n_rows, weight, weight_sq, mean, comoment = (
        np.concatenate(collected).astype(np.float64) for collected in outputs
    )
    return np.rint(n_rows).astype(np.int64), weight, weight_sq, mean, comoment


@tf.function(
    input_signature=[
        tf.TensorSpec([None], tf.float64),
        tf.TensorSpec([None, None, None], tf.float64),
        tf.TensorSpec([], tf.bool),
    ],
    reduce_retracing=True,
)
def _decompose(divisor, comoment, standardize):
    covariance = comoment / divisor[:, None, None]
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

    # Standardised features have the correlation as their covariance; a
    # constant feature stays 0 after scaling, so its entries are 0, not NaN.
    scaled = tf.where(
        tf.math.is_nan(correlation), tf.zeros_like(correlation), correlation
    )
    decomposed = tf.where(standardize, scaled, covariance)

    # eigh returns ascending eigenvalues with eigenvectors in the columns.
    eigenvalues, eigenvectors = tf.linalg.eigh(decomposed)
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
    divisor: np.ndarray, comoment: np.ndarray, standardize: bool = False
) -> tuple[np.ndarray, ...]:
    """Covariance, correlation and full eigen-decomposition of many groups.

    Always float64: the decomposition is cheap next to the moments and its
    accuracy is what every output figure rests on.

    Args:
        divisor: float64, shape (n_groups,), positive: the covariance is
            ``comoment / divisor`` (``n_rows - ddof`` for unweighted rows).
        comoment: float64, shape (n_groups, n_features, n_features).
        standardize: decompose the correlation (PCA of standardised
            features) instead of the covariance.

    Returns:
        covariance: float64, shape (n_groups, n_features, n_features).
        correlation: float64, same shape; NaN in the rows and columns of a
            feature with zero variance.
        components: float64, shape (n_groups, n_features, n_features); row i
            is the unit eigenvector of the i-th largest eigenvalue (of the
            covariance, or of the correlation with ``standardize``), its
            entry of largest absolute value positive.
        explained_variance: float64, shape (n_groups, n_features), the
            eigenvalues in decreasing order, round-off below zero clipped to 0.
        explained_variance_ratio: float64, shape (n_groups, n_features), each
            eigenvalue over their sum; 0 where the sum is 0.
        n_clipped: int64, shape (n_groups,), eigenvalues that round-off had
            made negative, clipped to 0.
    """
    outputs = _decompose(
        tf.constant(divisor, tf.float64),
        tf.constant(comoment, tf.float64),
        tf.constant(standardize, tf.bool),
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
