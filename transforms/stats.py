"""Beam transforms that turn Arrow batches into per-group bases.

The data flow: every Arrow batch becomes the moments of the groups it holds
(one TensorFlow op over padded blocks), those moments are keyed by a shard of
the group keys and merged exactly in a combiner, so Beam combines before the
shuffle and holds O(n_features^2) per group, never the rows. The merged
moments of a shard then go through one batched decomposition.

One element carries many groups: with many small groups, an element per
(group, batch) pair would cost more in Beam overhead than the math.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import typehints
from apache_beam.metrics import Metrics

from transforms import blocks, coders, pca
from transforms import counters as c
from transforms.inputs import InputSpec, prepare_batch, slices
from transforms.progress import Progress

_LOGGER = logging.getLogger(__name__)

coders.register(blocks.Moments, pca.Bases)


def shard_index(keys: pa.Array, n_shards: int) -> np.ndarray:
    """A shard in [0, n_shards) for every key, the same in every process.

    Python's ``hash`` of a string changes between processes, so it cannot
    route a key to one accumulator across workers; this hash depends only on
    the key's value.
    """
    if n_shards == 1 or len(keys) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    data_type = keys.type
    if pa.types.is_integer(data_type) or pa.types.is_boolean(data_type):
        codes = pc.cast(keys, pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    elif pa.types.is_floating(data_type):
        codes = pc.cast(keys, pa.float64()).to_numpy(zero_copy_only=False)
        codes = (codes + 0.0).view(np.int64)
    elif pa.types.is_temporal(data_type):
        codes = keys.cast(pa.int64()).to_numpy(zero_copy_only=False)
    else:
        codes = _byte_codes(pc.cast(keys, pa.large_binary()))
    mixed = codes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(n_shards)).astype(np.int64)


def _byte_codes(keys: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)
    offsets = offsets[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2] or b"", dtype=np.uint8)
    data = data[offsets[0] : offsets[-1]].astype(np.float64)
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(len(keys)), lengths)
    position = np.arange(len(data)) - (offsets[:-1] - offsets[0])[owner]
    weight = (position * 2654435761) % 1000003 + 1
    # Integer-valued float sums are exact well past any key's length.
    total = np.bincount(owner, weights=data * weight, minlength=len(keys))
    return total.astype(np.int64) + lengths * 7919


class BlockMomentsFn(beam.DoFn):
    """(file, Arrow batch) -> (shard, Moments of that shard's groups)."""

    def __init__(
        self,
        spec: InputSpec,
        missing: str,
        dtype: str,
        block_rows: int,
        batch_blocks: int,
        n_shards: int,
    ):
        self._spec = spec
        self._missing = missing
        self._dtype = dtype
        self._block_rows = block_rows
        self._batch_blocks = batch_blocks
        self._n_shards = n_shards
        self._rows_read = Metrics.counter(c.NAMESPACE, c.ROWS_READ)
        self._rows_missing = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.MISSING_VALUE
        )
        self._rows_weightless = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.ZERO_WEIGHT
        )

    def setup(self):
        self._progress = Progress("Fit", self._spec.n_rows)

    def process(self, element):
        source, table = element
        for first_row, part in slices(table, len(self._spec.features)):
            yield from self._moments(source, part, first_row)

    def _moments(self, source, table, first_row):
        batch = prepare_batch(table, self._spec, self._missing, source, first_row)
        self._rows_read.inc(table.num_rows)
        self._progress.add(table.num_rows)
        if batch.n_missing:
            self._rows_missing.inc(batch.n_missing)
        if batch.n_zero_weight:
            self._rows_weightless.inc(batch.n_zero_weight)
        if len(batch.keys) == 0:
            return

        moments = pca.batch_moments(
            batch.keys,
            batch.values,
            self._dtype,
            self._block_rows,
            self._batch_blocks,
            batch.weights,
        )
        shard = shard_index(moments.keys, self._n_shards)
        for index in np.unique(shard):
            yield int(index), moments.take(np.flatnonzero(shard == index))


class MomentsCombineFn(beam.CombineFn):
    """Merges the moments of many groups exactly; accumulator O(groups * d^2).

    The accumulator is a short list of ``Moments`` folded into one whenever it
    grows past ``fold_every`` parts, so that a merge is one vectorised pass
    over several parts rather than one pass per part. Kept short: with a
    million groups each pending part holds a batch's worth of them.
    """

    def __init__(self, key_type: pa.DataType, n_features: int, fold_every: int = 4):
        self._key_type = key_type
        self._n_features = n_features
        self._fold_every = fold_every

    def create_accumulator(self) -> list[blocks.Moments]:
        return []

    def get_accumulator_coder(self):
        return beam.coders.ListCoder(coders.BatchCoder())

    def add_input(self, accumulator, element):
        accumulator.append(element)
        if len(accumulator) >= self._fold_every:
            accumulator[:] = [blocks.merge_moments(accumulator)]
        return accumulator

    def merge_accumulators(self, accumulators):
        parts = [part for accumulator in accumulators for part in accumulator]
        return [blocks.merge_moments(parts)] if parts else []

    def compact(self, accumulator):
        return (
            [blocks.merge_moments(accumulator)] if len(accumulator) > 1 else accumulator
        )

    def extract_output(self, accumulator) -> blocks.Moments:
        if not accumulator:
            return blocks.empty_moments(self._key_type, self._n_features)
        return blocks.merge_moments(accumulator)


class FitBasesFn(beam.DoFn):
    """(shard, Moments) -> Bases of the shard's groups with a covariance."""

    def __init__(self, ddof: int, n_components: int | float, standardize: bool):
        self._ddof = ddof
        self._n_components = n_components
        self._standardize = standardize
        self._groups_written = Metrics.counter(c.NAMESPACE, c.GROUPS_WRITTEN)
        self._rows_fitted = Metrics.counter(c.NAMESPACE, c.ROWS_FITTED)
        self._groups_small = Metrics.counter(
            c.NAMESPACE, c.GROUPS_LEFT_OUT + c.TOO_FEW_ROWS
        )
        self._rows_small = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.TOO_FEW_ROWS
        )

    def process(self, element):
        _, moments = element
        bases, left_out = pca.fit_bases(
            moments, self._ddof, self._n_components, self._standardize
        )
        if left_out.n_groups:
            self._groups_small.inc(left_out.n_groups)
            self._rows_small.inc(int(left_out.n_rows.sum()))
        if bases.n_groups:
            self._groups_written.inc(bases.n_groups)
            self._rows_fitted.inc(int(bases.n_rows.sum()))
            yield bases


class ComputeBases(beam.PTransform):
    """PCollection of (file, Arrow batch) -> PCollection of Bases.

    Args:
        spec: the checked input description.
        ddof: the covariance divisor is n_rows - ddof.
        n_components: principal axes kept per group, or a fraction of the
            variance to explain.
        missing: "drop" or "error", what to do with a missing value.
        dtype: "float32" or "float64", the dtype of the moments op.
        block_rows: most rows per block.
        batch_blocks: blocks per ``tf.data`` batch.
        n_shards: shards of the key space, the parallelism of the merge.
        standardize: take the axes of the correlation matrix.
    """

    def __init__(
        self,
        spec: InputSpec,
        ddof: int,
        n_components: int | float,
        missing: str,
        dtype: str,
        block_rows: int,
        batch_blocks: int,
        n_shards: int,
        standardize: bool = False,
    ):
        super().__init__()
        self._spec = spec
        self._fit = FitBasesFn(ddof, n_components, standardize)
        self._moments_fn = BlockMomentsFn(
            spec, missing, dtype, block_rows, batch_blocks, n_shards
        )

    def expand(self, pcoll):
        combine = MomentsCombineFn(self._spec.key_type, len(self._spec.features))
        sharded = typehints.Tuple[int, blocks.Moments]
        return (
            pcoll
            | "BlockMoments" >> beam.ParDo(self._moments_fn).with_output_types(sharded)
            | "MergeMoments" >> beam.CombinePerKey(combine).with_output_types(sharded)
            | "FitBases" >> beam.ParDo(self._fit).with_output_types(pca.Bases)
        )


class ConcatBasesFn(beam.CombineFn):
    """All groups' bases in one ``Bases``, sorted by key: the projection's
    side input."""

    def __init__(self, key_type: pa.DataType, n_features: int, n_components: int):
        self._empty = (key_type, n_features, n_components)

    def create_accumulator(self) -> list[pca.Bases]:
        return []

    def get_accumulator_coder(self):
        return beam.coders.ListCoder(coders.BatchCoder())

    def add_input(self, accumulator, element):
        accumulator.append(element)
        return accumulator

    def merge_accumulators(self, accumulators):
        return [part for accumulator in accumulators for part in accumulator]

    def extract_output(self, accumulator) -> pca.Bases:
        if not accumulator:
            return pca.empty_bases(*self._empty)
        return pca.concat_bases(accumulator)
