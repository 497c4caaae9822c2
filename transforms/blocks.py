"""Pack groups' rows into padded blocks and merge moments exactly.

Plain NumPy, float64, nothing of Beam or TensorFlow. The moments of a set of
rows are its row count, its mean and its co-moment matrix
``comoment = sum_i (x_i - mean)^T (x_i - mean)``; the covariance is
``comoment / (n_rows - ddof)`` (``Moments.divisor`` for weighted rows).
Moments of disjoint parts merge exactly with
the pairwise update of Chan, Golub and LeVeque, generalised here to many parts
at once:

    n = sum_p n_p
    mean = sum_p n_p * mean_p / n
    comoment = sum_p comoment_p + sum_p n_p (mean_p - mean)^T (mean_p - mean)

No raw sum of squares is ever formed, so large offsets cost no precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa


@dataclasses.dataclass
class Moments:
    """Moments of many groups, one entry per distinct key.

    The mean is held as ``shift + mean``: ``shift`` is a row of the group
    (a reference point, exact in float64) and ``mean`` the offset of the mean
    from it. Far from the origin (a mean of 1e12, a spread of 1) an absolute
    mean would round to a few ulps of the offset, and the merge would turn
    that rounding into co-moment error; the offsets keep full precision.

    Rows may carry weights; unweighted rows weigh 1, so ``weight`` and
    ``weight_sq`` are then the row count.

    Attributes:
        keys: the groups' keys, an Arrow array of length n_groups with no
            repeats (a merge of several ``Moments`` may hold repeats until
            ``merge_moments`` folds them).
        n_rows: int64, shape (n_groups,), rows in each group.
        weight: float64, shape (n_groups,), the sum of the rows' weights.
        weight_sq: float64, shape (n_groups,), the sum of their squares.
        shift: float64, shape (n_groups, n_features), a reference point.
        mean: float64, shape (n_groups, n_features), weighted mean less
            ``shift``.
        comoment: float64, shape (n_groups, n_features, n_features), the
            weighted sum of outer products of the centred rows.
    """

    keys: pa.Array
    n_rows: np.ndarray
    weight: np.ndarray
    weight_sq: np.ndarray
    shift: np.ndarray
    mean: np.ndarray
    comoment: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.n_rows)

    @property
    def full_mean(self) -> np.ndarray:
        """float64, shape (n_groups, n_features): the mean itself."""
        return self.shift + self.mean

    def divisor(self, ddof: int) -> np.ndarray:
        """The covariance divisor: weight - ddof * weight_sq / weight.

        ``n_rows - ddof`` for unweighted rows; for weighted ones the
        divisor of ``np.cov(..., aweights=w)``.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.weight - ddof * self.weight_sq / self.weight

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field but the keys, by name."""
        return {name: getattr(self, name) for name in _ARRAYS}

    def take(self, index: np.ndarray) -> Moments:
        """The moments of the groups at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return Moments(
            keys=self.keys.take(pa.array(index, pa.int64())),
            **{name: array[index] for name, array in self.arrays().items()},
        )


_ARRAYS = ("n_rows", "weight", "weight_sq", "shift", "mean", "comoment")


def empty_moments(key_type: pa.DataType, n_features: int) -> Moments:
    """Moments of no group at all, for a given key type and width."""
    return Moments(
        keys=pa.array([], type=key_type),
        n_rows=np.zeros(0, dtype=np.int64),
        weight=np.zeros(0),
        weight_sq=np.zeros(0),
        shift=np.zeros((0, n_features)),
        mean=np.zeros((0, n_features)),
        comoment=np.zeros((0, n_features, n_features)),
    )


def segment_starts(sorted_ids: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal ids in a sorted array."""
    if len(sorted_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
    return np.concatenate([[0], change])


def segment_sums(array: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum of each run ``array[starts[i]:starts[i + 1]]`` along axis 0.

    The sums of ``np.add.reduceat(array, starts)`` for increasing ``starts``
    beginning at 0, each run added from its first entry on (see
    ``_run_sums``).
    """
    if array.ndim == 1:
        return np.add.reduceat(array, starts) if len(starts) else array[:0]
    return _run_sums(lambda at: array[at], starts, len(array))


# Entries of a run added by vectorised steps; the rest of a longer run is
# summed by np.add.reduceat, which is fast on few long runs.
STEPS = 32


def _run_sums(term, starts: np.ndarray, length: int) -> np.ndarray:
    """Sum of ``term(i)`` over each run ``starts[r] <= i < starts[r + 1]``.

    ``term`` maps an index array to the entries at those indices, so that
    entries are made (gathered, or computed) only a step at a time. On stacks
    of matrices ``np.add.reduceat`` takes one slow pass per run (0.23 s for
    40,000 16 x 16 matrices in 10,000 runs); here each step adds the k-th
    entry of every run longer than k in one vectorised pass (0.07 s). Runs
    are mostly a few parts of one group; past ``STEPS`` entries (a hot key cut
    into thousands of blocks) a run's remainder goes to reduceat instead.
    """
    sizes = np.diff(np.append(starts, length))
    out = term(starts)
    if len(sizes) == 0 or sizes.max() <= 1:
        return out
    longest_first = np.argsort(-sizes, kind="stable")
    first = starts[longest_first]
    steps = min(int(sizes.max()), STEPS)
    n_longer = np.searchsorted(-sizes[longest_first], -np.arange(1, steps))
    for k, count in enumerate(n_longer, start=1):
        out[longest_first[:count]] += term(first[:count] + k)

    long = np.flatnonzero(sizes > STEPS)
    if len(long):
        rest = sizes[long] - STEPS
        local_starts = np.cumsum(rest) - rest
        at = np.repeat(starts[long] + STEPS - local_starts, rest) + np.arange(
            rest.sum()
        )
        out[long] += np.add.reduceat(term(at), local_starts)
    return out


def merge_moments(parts: list[Moments]) -> Moments:
    """Fold moments of parts that may share keys into one entry per key.

    Args:
        parts: moments of disjoint sets of rows; the same key may appear in
            several parts (and several times within one).

    Returns:
        Moments with one entry per distinct key, keys in order of first
        appearance.
    """
    keys = pa.concat_arrays([part.keys for part in parts])
    arrays = {
        name: np.concatenate([getattr(part, name) for part in parts])
        for name in _ARRAYS
    }

    # Parts without rows carry no information (their mean is arbitrary).
    if (arrays["n_rows"] == 0).any():
        keep = arrays["n_rows"] > 0
        keys = keys.filter(pa.array(keep))
        arrays = {name: array[keep] for name, array in arrays.items()}

    encoded = keys.dictionary_encode()
    group = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_groups = len(encoded.dictionary)
    if len(group) == n_groups:
        return Moments(encoded.dictionary, **arrays)

    # Groups seen once are taken as they are; only the others are folded.
    # Entries are gathered by index, never copied out whole: the co-moments
    # of 256 features are as large as the rows they came from.
    single = np.bincount(group, minlength=n_groups)[group] == 1
    once, repeated = np.flatnonzero(single), np.flatnonzero(~single)
    folded_group, folded = _fold(group, repeated, arrays)
    out = {}
    for name, array in arrays.items():
        out[name] = np.empty((n_groups, *array.shape[1:]), dtype=array.dtype)
        out[name][group[once]] = array[once]
        out[name][folded_group] = folded[name]
    return Moments(encoded.dictionary, **out)


def _fold(
    group: np.ndarray, entries: np.ndarray, arrays: dict
) -> tuple[np.ndarray, dict]:
    """Merge the entries at ``entries`` by group id.

    Returns:
        The group ids, and their merged arrays in that order.
    """
    order = entries[np.argsort(group[entries], kind="stable")]
    sorted_group = group[order]
    starts = segment_starts(sorted_group)
    sizes = np.diff(np.append(starts, len(order)))
    weight = arrays["weight"][order]

    # Every part's mean as an offset from the first part's reference point:
    # references of one group are near each other, so the difference is exact.
    shift = arrays["shift"][order]
    reference = shift[starts]
    offset = (shift - np.repeat(reference, sizes, axis=0)) + arrays["mean"][order]
    total = segment_sums(weight, starts)
    merged_mean = segment_sums(offset * weight[:, None], starts) / total[:, None]

    spread = offset - np.repeat(merged_mean, sizes, axis=0)
    weighted = weight[:, None] * spread
    comoment = arrays["comoment"]

    def part_comoment(at):
        # The part's own co-moment plus that of its mean about the merged one.
        between = weighted[at][:, :, None] * spread[at][:, None, :]
        return comoment[order[at]] + between

    merged = {
        "n_rows": segment_sums(arrays["n_rows"][order], starts),
        "weight": total,
        "weight_sq": segment_sums(arrays["weight_sq"][order], starts),
        "shift": reference,
        "mean": merged_mean,
        "comoment": _run_sums(part_comoment, starts, len(order)),
    }
    return sorted_group[starts], merged


@dataclasses.dataclass
class BlockLayout:
    """Where each row of a batch goes in the padded block tensor.

    Attributes:
        order: int64, shape (n_rows,), row indices sorted by group (of
            the rows laid out, which may be a subset of the batch).
        block: int64, shape (n_rows,), block of the row ``order[i]``.
        slot: int64, shape (n_rows,), position of that row in its block.
        block_group: int64, shape (n_blocks,), the group of each block.
        block_size: rows per block.
    """

    order: np.ndarray
    block: np.ndarray
    slot: np.ndarray
    block_group: np.ndarray
    block_size: int

    @property
    def n_blocks(self) -> int:
        return len(self.block_group)


def layout_blocks(group: np.ndarray, n_groups: int, block_size: int) -> BlockLayout:
    """Cut each group's rows into blocks of ``block_size`` rows.

    Args:
        group: int64, shape (n_rows,), group index of every row, in
            [0, n_groups).
        n_groups: number of groups.
        block_size: rows per block; the last block of a group is padded.

    Returns:
        The layout; blocks of one group are consecutive.
    """
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    counts = np.bincount(group, minlength=n_groups)
    first_row = np.cumsum(counts) - counts
    position = np.arange(len(group)) - first_row[sorted_group]

    blocks_per_group = -(-counts // block_size)
    first_block = np.cumsum(blocks_per_group) - blocks_per_group
    block = first_block[sorted_group] + position // block_size
    slot = position % block_size
    block_group = np.repeat(np.arange(n_groups), blocks_per_group)
    return BlockLayout(order, block, slot, block_group, block_size)


def block_sizes(counts: np.ndarray, block_rows: int) -> np.ndarray:
    """Rows per block for every group: its row count rounded up to the next
    of 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5 times them), at most
    ``block_rows``.

    A group of more than 8 rows then fills one block that is more than two
    thirds full (before sizes with few blocks are merged, see
    ``layouts_by_size``), or, past ``block_rows`` rows, several full ones and
    a last one. One size for a
    whole batch cannot do both: with one key holding 90 % of the rows and
    thousands of small groups, a size fit for the small groups cut the large
    one into tens of thousands of blocks to merge, and a size fit for the
    large one padded every small group to it. Results do not depend on the
    sizes; only padding and the number of blocks do.

    Args:
        counts: int64, shape (n_groups,), rows of each group.
        block_rows: the largest block allowed.

    Returns:
        int64, shape (n_groups,).
    """
    powers = np.left_shift(1, np.arange(3, 40))
    steps = np.sort(np.concatenate([powers, powers + powers // 2]))
    size = steps[np.searchsorted(steps, counts)]
    return np.minimum(size, block_rows)


# Fewest padded values (rows * features) worth a call of the moments op of
# their own: about what the op gets through in the time a call costs.
MIN_VALUES = 2**20


def layouts_by_size(
    group: np.ndarray, n_groups: int, block_rows: int, n_features: int
) -> list[BlockLayout]:
    """One block layout per block size of ``block_sizes``, largest first.

    Args:
        group: int64, shape (n_rows,), group index of every row, in
            [0, n_groups).
        n_groups: number of groups.
        block_rows: the largest block allowed.
        n_features: values per row.

    Returns:
        Layouts whose ``order`` index the rows of ``group``; every row is in
        exactly one of them.
    """
    counts = np.bincount(group, minlength=n_groups)
    size = block_sizes(counts, block_rows)

    # Each size costs one call of the op: a size with few padded values has
    # its groups moved up to the next larger size there is, if at most twice
    # it.
    present = np.unique(size[counts > 0])
    for smaller, larger in zip(present[:-1], present[1:], strict=True):
        chosen = (size == smaller) & (counts > 0)
        padded = (-(-counts[chosen] // smaller)).sum() * smaller * n_features
        if padded < MIN_VALUES and larger <= 2 * smaller:
            size[chosen] = larger
    row_size = size[group]
    layouts = []
    for block_size in np.unique(size[counts > 0])[::-1]:
        rows = np.flatnonzero(row_size == block_size)
        layout = layout_blocks(group[rows], n_groups, int(block_size))
        layout.order = rows[layout.order]
        layouts.append(layout)
    return layouts


def first_rows(values: np.ndarray, layout: BlockLayout) -> np.ndarray:
    """The first row of every block, float64, shape (n_blocks, n_features)."""
    first = np.zeros((layout.n_blocks, values.shape[1]))
    is_first = layout.slot == 0
    first[layout.block[is_first]] = values[layout.order[is_first]]
    return first


def fill_blocks(
    values: np.ndarray,
    layout: BlockLayout,
    offsets: np.ndarray,
    dtype: np.dtype,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter rows into padded blocks, less an offset per block.

    The offset is subtracted in float64 before any cast, so that a float32
    block holds values of the size of the spread, not of the offset.

    Args:
        values: float64, shape (n_rows, n_features).
        layout: from ``layout_blocks``.
        offsets: float64, shape (n_blocks, n_features), subtracted from every
            row of its block (a block's first row, or its group's mean).
        dtype: dtype of the returned blocks.
        weights: float64, shape (n_rows,), positive row weights, or None.

    Returns:
        blocks: shape (n_blocks, block_size, n_features), padding is 0.
        mask: same dtype, shape (n_blocks, block_size), each row's weight
            (1 unless ``weights`` are given), 0 for padding.
    """
    n_features = values.shape[1]
    blocks = np.zeros((layout.n_blocks, layout.block_size, n_features), dtype=dtype)
    blocks[layout.block, layout.slot] = values[layout.order] - offsets[layout.block]
    mask = np.zeros((layout.n_blocks, layout.block_size), dtype=dtype)
    mask[layout.block, layout.slot] = 1 if weights is None else weights[layout.order]
    return blocks, mask
