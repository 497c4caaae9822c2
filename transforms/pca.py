"""Per-group PCA on Arrow batches: moments, bases and projection.

Beam-free glue between Arrow/NumPy data and the TensorFlow ops in
``tensor_ops``: it packs a batch's rows into blocks by group, turns merged
moments into bases and projects rows onto their own group's basis.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import blocks, tensor_ops
from transforms.blocks import Moments

NP_DTYPES = {"float32": np.float32, "float64": np.float64}


def batch_moments(
    keys: pa.Array,
    values: np.ndarray,
    dtype: str,
    block_rows: int,
    batch_blocks: int,
    weights: np.ndarray | None = None,
) -> Moments:
    """Moments of every group of one batch of rows.

    Args:
        keys: the group key of every row, no nulls, length n_rows.
        values: float64, shape (n_rows, n_features), all finite.
        dtype: "float32" or "float64", the dtype of the TensorFlow op.
        block_rows: most rows in one block.
        batch_blocks: blocks per ``tf.data`` batch.
        weights: float64, shape (n_rows,), positive row weights, or None.

    Returns:
        Moments with one entry per distinct key of the batch.
    """
    encoded = keys.dictionary_encode()
    group = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_groups = len(encoded.dictionary)

    # One TensorFlow op per block size: small groups in small blocks, large
    # ones in full blocks of block_rows.
    parts = []
    for layout in blocks.layouts_by_size(group, n_groups, block_rows, values.shape[1]):
        shift = blocks.first_rows(values, layout)
        padded, mask = blocks.fill_blocks(
            values, layout, shift, NP_DTYPES[dtype], weights
        )
        n_rows, weight, weight_sq, mean, comoment = tensor_ops.block_moments(
            padded, mask, batch_blocks
        )
        parts.append(
            Moments(
                keys=encoded.dictionary.take(pa.array(layout.block_group)),
                n_rows=n_rows,
                weight=weight,
                weight_sq=weight_sq,
                shift=shift,
                mean=mean,
                comoment=comoment,
            )
        )
    if not parts:
        return blocks.empty_moments(keys.type, values.shape[1])
    return blocks.merge_moments(parts)


@dataclasses.dataclass
class Bases:
    """The fitted statistics and principal axes of many groups.

    Attributes:
        keys: Arrow array, shape (n_groups,).
        n_rows: int64, shape (n_groups,).
        mean: float64, shape (n_groups, n_features).
        covariance: float64, shape (n_groups, n_features, n_features),
            co-moment divided by n_rows - ddof.
        correlation: float64, same shape as covariance.
        components: float64, shape (n_groups, n_components, n_features), unit
            rows in order of decreasing eigenvalue; rows past a group's
            ``n_kept`` are 0.
        explained_variance: float64, shape (n_groups, n_components), 0 past
            ``n_kept``.
        explained_variance_ratio: float64, shape (n_groups, n_components), 0
            past ``n_kept``.
        n_kept: int64, shape (n_groups,), the axes each group keeps: all
            n_components, or fewer when n_components was a fraction.
        rank: int64, shape (n_groups,), eigenvalues above round-off
            (largest * n_features * float64 eps, as ``np.linalg.matrix_rank``).
        condition_number: float64, shape (n_groups,), largest over smallest
            eigenvalue; infinite when the smallest is 0.
        n_clipped: int64, shape (n_groups,), eigenvalues clipped at 0.
        zero_variance: bool, shape (n_groups, n_features), features constant
            within the group.
        tied: bool, shape (n_groups,), whether the last kept eigenvalue equals
            the first dropped one within round-off: the kept axes are then
            not unique.
    """

    keys: pa.Array
    n_rows: np.ndarray
    mean: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_kept: np.ndarray
    rank: np.ndarray
    condition_number: np.ndarray
    n_clipped: np.ndarray
    zero_variance: np.ndarray
    tied: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.n_rows)

    @property
    def n_components(self) -> int:
        """The most axes any group keeps: the width of the arrays."""
        return self.components.shape[1]

    def take(self, index: np.ndarray) -> Bases:
        """The bases of the groups at ``index``, in that order."""
        return Bases(
            keys=self.keys.take(pa.array(index, pa.int64())),
            **{
                field.name: getattr(self, field.name)[index]
                for field in dataclasses.fields(self)
                if field.name != "keys"
            },
        )


def empty_bases(key_type: pa.DataType, n_features: int, n_components: int) -> Bases:
    """Bases of no group, with the shapes an empty output needs."""
    d, k = n_features, n_components
    return Bases(
        keys=pa.array([], type=key_type),
        n_rows=np.zeros(0, np.int64),
        mean=np.zeros((0, d)),
        covariance=np.zeros((0, d, d)),
        correlation=np.zeros((0, d, d)),
        components=np.zeros((0, k, d)),
        explained_variance=np.zeros((0, k)),
        explained_variance_ratio=np.zeros((0, k)),
        n_kept=np.zeros(0, np.int64),
        rank=np.zeros(0, np.int64),
        condition_number=np.zeros(0),
        n_clipped=np.zeros(0, np.int64),
        zero_variance=np.zeros((0, d), bool),
        tied=np.zeros(0, bool),
    )


def _widen(bases: Bases, n_components: int) -> Bases:
    """The same bases with arrays padded with 0 to ``n_components`` axes."""
    extra = n_components - bases.n_components
    if extra == 0:
        return bases
    return dataclasses.replace(
        bases,
        components=np.pad(bases.components, ((0, 0), (0, extra), (0, 0))),
        explained_variance=np.pad(bases.explained_variance, ((0, 0), (0, extra))),
        explained_variance_ratio=np.pad(
            bases.explained_variance_ratio, ((0, 0), (0, extra))
        ),
    )


def concat_bases(parts: list[Bases]) -> Bases:
    """One ``Bases`` holding the groups of all parts, sorted by key."""
    width = max(part.n_components for part in parts)
    parts = [_widen(part, width) for part in parts]
    joined = Bases(
        keys=pa.concat_arrays([part.keys for part in parts]),
        **{
            field.name: np.concatenate([getattr(part, field.name) for part in parts])
            for field in dataclasses.fields(Bases)
            if field.name != "keys"
        },
    )
    return joined.take(sort_index(joined.keys))


def sort_index(keys: pa.Array) -> np.ndarray:
    """Indices that sort keys by value, nulls last, for a repeatable order."""
    return pc.sort_indices(keys).to_numpy(zero_copy_only=False)


def kept_axes(ratio: np.ndarray, n_components: int | float) -> np.ndarray:
    """Axes each group keeps.

    Args:
        ratio: float64, shape (n_groups, n_features), explained-variance
            ratios in decreasing order.
        n_components: an int keeps that many axes in every group; a fraction
            in (0, 1) keeps, per group, the fewest axes whose ratios sum to at
            least it (at least one axis; one for a group with no variance).

    Returns:
        int64, shape (n_groups,).
    """
    n_groups, n_features = ratio.shape
    if isinstance(n_components, int):
        return np.full(n_groups, n_components, dtype=np.int64)
    cumulative = np.cumsum(ratio, axis=1)
    reached = cumulative >= n_components
    kept = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, n_features)
    return np.where(cumulative[:, -1] > 0, kept, 1).astype(np.int64)


def fit_bases(
    moments: Moments, ddof: int, n_components: int | float, standardize: bool = False
) -> tuple[Bases, Moments]:
    """Covariance, correlation and the top principal axes of every group.

    Args:
        moments: merged moments, one entry per group.
        ddof: the covariance divisor is n_rows - ddof (for weighted rows,
            ``Moments.divisor``).
        n_components: axes kept per group, at most n_features; or a fraction
            in (0, 1) of the variance to explain (see ``kept_axes``).
        standardize: take the axes of the correlation matrix (PCA of
            standardised features) instead of the covariance.

    Returns:
        bases: the groups with more than ``ddof`` rows, sorted by key, as
            wide as the most axes any of them keeps.
        left_out: moments of the groups with ``ddof`` rows or fewer, which
            have no covariance.
    """
    has_covariance = (moments.n_rows > ddof) & (moments.divisor(ddof) > 0)
    left_out = np.flatnonzero(~has_covariance)
    kept = np.flatnonzero(has_covariance)
    kept = kept[sort_index(moments.keys.take(pa.array(kept, pa.int64())))]
    left = moments.take(left_out)

    n_features = moments.mean.shape[1]
    if len(kept) == 0:
        width = n_components if isinstance(n_components, int) else 1
        return empty_bases(moments.keys.type, n_features, width), left
    covariance, correlation, components, variance, ratio, n_clipped = (
        tensor_ops.decompose(
            moments.divisor(ddof)[kept], moments.comoment[kept], standardize
        )
    )
    n_kept = kept_axes(ratio, n_components)
    width = int(n_kept.max())
    beyond = np.arange(width)[None, :] >= n_kept[:, None]
    bases = Bases(
        keys=moments.keys.take(pa.array(kept, pa.int64())),
        n_rows=moments.n_rows[kept],
        mean=moments.full_mean[kept],
        covariance=covariance,
        correlation=correlation,
        components=np.where(beyond[:, :, None], 0.0, components[:, :width]),
        explained_variance=np.where(beyond, 0.0, variance[:, :width]),
        explained_variance_ratio=np.where(beyond, 0.0, ratio[:, :width]),
        n_kept=n_kept,
        n_clipped=n_clipped,
        zero_variance=np.diagonal(covariance, axis1=1, axis2=2) == 0,
        **_spectrum_diagnostics(variance, n_kept),
    )
    return bases, left


def _spectrum_diagnostics(variance: np.ndarray, n_kept: np.ndarray) -> dict:
    """Rank, condition number and ties at the cut, from the full spectrum.

    Args:
        variance: float64, shape (n_groups, n_features), eigenvalues in
            decreasing order, clipped at 0.
        n_kept: int64, shape (n_groups,), axes kept per group.
    """
    n_groups, n_features = variance.shape
    largest, smallest = variance[:, 0], variance[:, -1]
    round_off = largest * n_features * np.finfo(np.float64).eps
    rank = (variance > round_off[:, None]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        condition = np.where(smallest > 0, largest / smallest, np.inf)
    # Two eigenvalues within a few thousand ulps of the largest are equal as
    # far as float64 can tell.
    rows = np.arange(n_groups)
    has_next = n_kept < n_features
    last = variance[rows, np.minimum(n_kept, n_features) - 1]
    first_dropped = variance[rows, np.minimum(n_kept, n_features - 1)]
    tied = has_next & (np.abs(last - first_dropped) <= 1e3 * round_off)
    return {"rank": rank.astype(np.int64), "condition_number": condition, "tied": tied}


def lookup_groups(bases: Bases, keys: pa.Array) -> np.ndarray:
    """Index into ``bases`` of every key, -1 where the key has no basis."""
    index = pc.index_in(keys, value_set=bases.keys)
    return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def feature_scale(bases: Bases) -> np.ndarray:
    """Each group's feature deviations, by which rows are standardised.

    The square root of the covariance's diagonal, and 1 for a constant
    feature (which is 0 once centred, as scikit-learn's StandardScaler
    leaves it).

    Returns:
        float64, shape (n_groups, n_features).
    """
    variance = np.diagonal(bases.covariance, axis1=1, axis2=2)
    return np.where(variance > 0, np.sqrt(np.maximum(variance, 0)), 1.0)


class Projector:
    """Bases made ready to project rows onto: means and axes become
    TensorFlow constants once, not once per batch of rows.

    Args:
        bases: the fitted groups.
        dtype: "float32" or "float64", the dtype of the TensorFlow matmul.
        scale: float64, shape (n_groups, n_features), from ``feature_scale``;
            None for no scaling.
    """

    def __init__(self, bases: Bases, dtype: str, scale: np.ndarray | None = None):
        np_dtype = NP_DTYPES[dtype]
        forward, back = bases.components, bases.components
        if scale is not None:
            forward = forward / scale[:, None, :]
            back = back * scale[:, None, :]
        self._mean = bases.mean
        self._mean_tensor = tensor_ops.constant(bases.mean)
        self._forward = tensor_ops.constant(forward.astype(np_dtype))
        self._back = tensor_ops.constant(back.astype(np_dtype))
        self._zero = tensor_ops.constant(np.zeros((bases.n_groups, bases.n_components)))

    def project(self, group: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Each row's scores: ((x - mean) / scale) @ components.T.

        Args:
            group: int64, shape (n_rows,), index into the bases of each
                row's group.
            values: float64, shape (n_rows, n_features).

        Returns:
            float64, shape (n_rows, n_components), in the order of the rows;
            0 past a group's ``n_kept``.
        """
        return tensor_ops.gathered_matmul(
            values, group, self._mean_tensor, self._forward, transpose_b=True
        )

    def reconstruct(self, group: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Rows rebuilt from their (unwhitened) scores: mean + scores @ components,
        scaled back when the bases are standardised.

        Args:
            group: int64, shape (n_rows,), as for ``project``.
            scores: float64, shape (n_rows, n_components), from ``project``.

        Returns:
            float64, shape (n_rows, n_features).
        """
        product = tensor_ops.gathered_matmul(scores, group, self._zero, self._back)
        return product + self._mean[group]


def whitening_scale(bases: Bases) -> np.ndarray:
    """1 / sqrt(explained_variance), 0 where the eigenvalue is 0.

    Scores times this scale have unit variance per axis, as scikit-learn's
    ``PCA(whiten=True)`` gives; an axis without variance stays 0, never
    infinite.

    Returns:
        float64, shape (n_groups, n_components).
    """
    variance = bases.explained_variance
    positive = variance > 0
    return np.where(positive, 1.0 / np.sqrt(np.where(positive, variance, 1.0)), 0.0)


def _nested_list(values: np.ndarray, lengths: np.ndarray | None = None) -> pa.Array:
    """float64 array of shape (n, ...) as n nested Arrow lists of doubles.

    ``lengths`` (shape (n,)) cuts each outermost list short: group i keeps
    only its first ``lengths[i]`` entries.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    if lengths is not None:
        keep = np.arange(values.shape[1])[None, :] < lengths[:, None]
        inner = values[keep]
        array = _nested_list(inner) if values.ndim > 2 else pa.array(inner)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), array)
    array = pa.array(values.reshape(-1))
    for width in reversed(values.shape[1:]):
        offsets = np.arange(0, len(array) + 1, width, dtype=np.int32)
        array = pa.ListArray.from_arrays(pa.array(offsets), array)
    return array


def components_schema(
    key: str | None,
    key_type: pa.DataType | None,
    features: list[str],
    fit: dict | None = None,
) -> pa.Schema:
    """Schema of the components dataset.

    Its metadata holds ``features`` (a JSON list, in order) and ``fit`` (a
    JSON object: key, key_type, ddof, dtype, n_components and the stage
    version), what a later ``mode: transform`` checks its config against.
    """
    vector = pa.list_(pa.float64())
    matrix = pa.list_(vector)
    fields = [] if key is None else [pa.field(key, key_type)]
    fields += [
        pa.field("n_rows", pa.int64()),
        pa.field("mean", vector),
        pa.field("covariance", matrix),
        pa.field("correlation", matrix),
        pa.field("components", matrix),
        pa.field("explained_variance", vector),
        pa.field("explained_variance_ratio", vector),
        pa.field("rank", pa.int64()),
        pa.field("condition_number", pa.float64()),
        pa.field("n_clipped_eigenvalues", pa.int64()),
        pa.field("zero_variance_features", pa.list_(pa.string())),
        pa.field("tied_at_cut", pa.bool_()),
    ]
    metadata = {"features": json.dumps(features), "fit": json.dumps(fit or {})}
    return pa.schema(fields, metadata=metadata)


def bases_to_table(bases: Bases, schema: pa.Schema) -> pa.Table:
    """The components dataset's rows for ``bases``, one row per group."""
    columns = {
        "n_rows": pa.array(bases.n_rows, pa.int64()),
        "mean": _nested_list(bases.mean),
        "covariance": _nested_list(bases.covariance),
        "correlation": _nested_list(bases.correlation),
        "components": _nested_list(bases.components, bases.n_kept),
        "explained_variance": _nested_list(bases.explained_variance, bases.n_kept),
        "explained_variance_ratio": _nested_list(
            bases.explained_variance_ratio, bases.n_kept
        ),
        "rank": pa.array(bases.rank, pa.int64()),
        "condition_number": pa.array(bases.condition_number, pa.float64()),
        "n_clipped_eigenvalues": pa.array(bases.n_clipped, pa.int64()),
        "zero_variance_features": _names(
            bases.zero_variance, json.loads(schema.metadata[b"features"])
        ),
        "tied_at_cut": pa.array(bases.tied, pa.bool_()),
    }
    arrays = [
        bases.keys if field.name not in columns else columns[field.name]
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _names(flags: np.ndarray, names: list[str]) -> pa.Array:
    """Per row, the names whose flag is set, as list<string>."""
    counts = flags.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pa.array(np.array(names, dtype=object)[np.nonzero(flags)[1]], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _flat(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    array = column.combine_chunks()
    for _ in range(depth):
        array = pc.list_flatten(array)
    return array.to_numpy(zero_copy_only=False).astype(np.float64)


def table_to_bases(table: pa.Table, key: str | None, n_features: int) -> Bases:
    """Bases from rows of the components dataset (the inverse of
    ``bases_to_table``), sorted by key."""
    n_groups, d = table.num_rows, n_features
    n_kept = (
        pc.list_value_length(table.column("explained_variance").combine_chunks())
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    width = int(n_kept.max()) if n_groups else 0
    beyond = np.arange(width)[None, :] < n_kept[:, None]
    components = np.zeros((n_groups, width, d))
    components[beyond] = _flat(table.column("components"), 2).reshape(-1, d)
    variance = np.zeros((n_groups, width))
    variance[beyond] = _flat(table.column("explained_variance"), 1)
    ratio = np.zeros((n_groups, width))
    ratio[beyond] = _flat(table.column("explained_variance_ratio"), 1)
    covariance = _flat(table.column("covariance"), 2).reshape(n_groups, d, d)
    keys = (
        table.column(key).combine_chunks()
        if key
        else pa.array(np.zeros(n_groups, np.int8))
    )
    bases = Bases(
        keys=keys,
        n_rows=table.column("n_rows").to_numpy().astype(np.int64),
        mean=_flat(table.column("mean"), 1).reshape(n_groups, d),
        covariance=covariance,
        correlation=_flat(table.column("correlation"), 2).reshape(n_groups, d, d),
        components=components,
        explained_variance=variance,
        explained_variance_ratio=ratio,
        n_kept=n_kept,
        rank=table.column("rank").to_numpy().astype(np.int64),
        condition_number=table.column("condition_number").to_numpy(),
        n_clipped=table.column("n_clipped_eigenvalues").to_numpy().astype(np.int64),
        zero_variance=np.diagonal(covariance, axis1=1, axis2=2) == 0,
        tied=table.column("tied_at_cut").to_numpy(zero_copy_only=False),
    )
    return bases.take(sort_index(bases.keys))
