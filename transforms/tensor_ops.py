"""TensorFlow ops over many groups at once: moments, decomposition, projection.

Nothing here knows of Beam. Every op takes tensors whose leading axis is the
block or the group, so one call serves a whole batch of groups (the "tensor
PCA" layout). Inputs are NumPy arrays, outputs NumPy arrays.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np


def _import_tensorflow():
    """``import tensorflow``, less the Keras import it does at start-up.

    TensorFlow imports Keras's optimizers eagerly, only so that SavedModels
    holding Keras objects load; the stage saves and loads none. That import
    (Keras, and scikit-learn and SciPy when they are installed) took 2.9 s of
    8.0 s on this project's machines, in every worker process. It is refused
    for the duration of the import only: ``tf.keras`` and ``import keras``
    still load on first use.
    """
    # TensorFlow's C++ start-up notices (CPU features, absl) would stand
    # before the stage's own log lines; warnings and errors still come through.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    blocked = "keras.src.optimizers"
    block = "tensorflow" not in sys.modules and blocked not in sys.modules
    if block:
        sys.modules[blocked] = None
    try:
        import tensorflow
    finally:
        if block and sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]
    return tensorflow


tf = _import_tensorflow()

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
    outputs = [[] for _ in range(5)]
    for batch in batched(fn, (blocks, mask), batch_blocks):
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
    # One batch is the usual case; its outputs need no copy.
    n_rows, weight, weight_sq, mean, comoment = (
        (collected[0] if len(collected) == 1 else np.concatenate(collected)).astype(
            np.float64, copy=False
        )
        for collected in outputs
    )
    return np.rint(n_rows).astype(np.int64), weight, weight_sq, mean, comoment


class _BatchStream:
    """A ``tf.data`` pipeline, built once, that maps ``fn`` over batches of
    whatever arrays ``run`` is handed.

    The batches are views handed to ``tf.data`` by a generator. Slicing the
    arrays into single blocks and batching them again (``from_tensor_slices``
    then ``batch``) copied every block and took 2.3 times as long on 10,000
    blocks of 64 rows and 16 features; building the pipeline anew for every
    call retraced ``fn`` and cost another 0.08 s a call.
    """

    def __init__(self, fn, signature: tuple[tf.TensorSpec, ...]):
        self._pending = None
        self._dataset = (
            tf.data.Dataset.from_generator(self._batches, output_signature=signature)
            .map(fn, num_parallel_calls=1, deterministic=True)
            .prefetch(1)
        )

    def _batches(self):
        arrays, batch_size = self._pending
        for start in range(0, len(arrays[0]), batch_size):
            yield tuple(array[start : start + batch_size] for array in arrays)

    def run(self, arrays: tuple[np.ndarray, ...], batch_size: int) -> list:
        self._pending = (arrays, batch_size)
        try:
            return list(self._dataset.as_numpy_iterator())
        finally:
            self._pending = None


# One pipeline per thread and op: a Beam worker may run bundles in threads.
_streams = threading.local()


def batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> list:
    """``fn`` over consecutive batches of ``arrays``, streamed by ``tf.data``.

    Args:
        fn: a ``tf.function`` of one batch of each array.
        arrays: same length on axis 0.
        batch_size: entries of axis 0 per batch.

    Returns:
        ``fn``'s outputs for each batch, as NumPy arrays.
    """
    signature = tuple(
        tf.TensorSpec([None] * array.ndim, tf.as_dtype(array.dtype)) for array in arrays
    )
    streams = _streams.__dict__.setdefault("by_op", {})
    stream = streams.get((fn, signature))
    if stream is None:
        stream = streams[(fn, signature)] = _BatchStream(fn, signature)
    return stream.run(arrays, batch_size)


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
def _gathered_matmul_fn(dtype: tf.DType, transpose_b: bool):
    spec = [
        tf.TensorSpec([None, None], tf.float64),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None, None], tf.float64),
        tf.TensorSpec([None, None, None], dtype),
    ]
    equation = "nm,npm->np" if transpose_b else "nm,nmp->np"

    @tf.function(input_signature=spec, reduce_retracing=True)
    def gathered_matmul(rows, group, offsets, matrices):
        # Centred in float64 before any cast, so that float32 holds the
        # spread, not the offset.
        centred = tf.cast(rows - tf.gather(offsets, group), dtype)
        product = tf.einsum(equation, centred, tf.gather(matrices, group))
        return tf.cast(product, tf.float64)

    return gathered_matmul


# Entries of the gathered (rows, p, m) matrices in one call of the op.
GATHER_VALUES = 2**22


def constant(array: np.ndarray) -> tf.Tensor:
    """A NumPy array as a TensorFlow constant of its own dtype."""
    return tf.constant(array)


def gathered_matmul(
    rows: np.ndarray,
    group: np.ndarray,
    offsets: np.ndarray | tf.Tensor,
    matrices: np.ndarray | tf.Tensor,
    transpose_b: bool = False,
) -> np.ndarray:
    """(rows - offsets[group]) @ matrices[group] for every row at once.

    Projection is ``gathered_matmul(rows, group, mean, components,
    transpose_b=True)``; reconstruction is ``gathered_matmul(scores, group,
    zeros, components)``. Each row meets its own group's matrix by a gather,
    so rows need no sorting or padding into blocks (on 262,144 rows of 16
    features in 10,000 groups: 0.09 s, against 0.24 s for padded blocks).
    Rows go to the op in chunks whose gathered matrices hold about
    ``GATHER_VALUES`` entries. The op is called directly: feeding these
    chunks through ``tf.data`` doubled the time.

    Args:
        rows: float64, shape (n_rows, m).
        group: int64, shape (n_rows,), index into ``offsets`` and
            ``matrices`` of each row's group.
        offsets: float64, shape (n_groups, m), subtracted in float64; an
            array or a constant from ``constant`` (reused without a copy).
        matrices: float32 or float64 (the dtype of the product), shape
            (n_groups, m, p), or (n_groups, p, m) with ``transpose_b``; an
            array or a constant.
        transpose_b: multiply by each matrix's transpose.

    Returns:
        float64, shape (n_rows, p), in the order of the rows.
    """
    width = matrices.shape[1] if transpose_b else matrices.shape[2]
    if len(rows) == 0:
        return np.zeros((0, width))
    offsets = tf.convert_to_tensor(offsets, tf.float64)
    matrices = tf.convert_to_tensor(matrices)
    op = _gathered_matmul_fn(matrices.dtype, transpose_b)
    chunk = max(1, GATHER_VALUES // max(1, matrices.shape[1] * matrices.shape[2]))
    rows = rows.astype(np.float64, copy=False)
    group = group.astype(np.int64, copy=False)
    return np.concatenate(
        [
            op(
                rows[start : start + chunk],
                group[start : start + chunk],
                offsets,
                matrices,
            ).numpy()
            for start in range(0, len(rows), chunk)
        ]
    )
