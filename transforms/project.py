"""Beam transform that projects every input row onto its group's basis."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms import counters as c
from transforms import pca
from transforms.inputs import (
    InputSpec,
    column_array,
    prepare_batch,
    read_dataset,
    slices,
)
from transforms.progress import Progress


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the projection writes besides the scores.

    Attributes:
        whiten: divide each score by the square root of its eigenvalue.
        reconstruction_error: add ``reconstruction_error``, the squared
            distance between a row and its reconstruction.
        reconstruct: add ``<feature>_reconstructed`` for every feature.
        standardize: the bases are those of standardised features: scale
            each centred row by its group's deviations before projecting.
    """

    whiten: bool = False
    reconstruction_error: bool = False
    reconstruct: bool = False
    standardize: bool = False


def projected_schema(
    spec: InputSpec, n_components: int, outputs: Outputs = Outputs()
) -> pa.Schema:
    """Passthrough columns, the key column, pc_1 ... pc_k, then the extras."""
    fields = [
        pa.field(name, data_type)
        for name, data_type in zip(
            spec.passthrough, spec.passthrough_types, strict=True
        )
    ]
    if spec.key and spec.key not in spec.passthrough:
        fields.append(pa.field(spec.key, spec.key_type))
    fields += [pa.field(f"pc_{i + 1}", pa.float64()) for i in range(n_components)]
    if outputs.reconstruction_error:
        fields.append(pa.field("reconstruction_error", pa.float64()))
    if outputs.reconstruct:
        fields += [
            pa.field(f"{name}_reconstructed", pa.float64()) for name in spec.features
        ]
    return pa.schema(fields)


class ProjectFn(beam.DoFn):
    """(file, Arrow batch) -> Arrow table of the batch's projected rows.

    Each worker loads the bases from the components dataset once, in
    ``setup``. After a fit in the same run, rows left out of the statistics
    were counted there; with ``count_input`` (projecting with an earlier
    run's bases) this transform counts the rows read, the missing values and
    the rows whose group has no basis (``unknown_group``).
    """

    def __init__(
        self,
        spec: InputSpec,
        components: str,
        schema: pa.Schema,
        missing: str,
        dtype: str,
        outputs: Outputs = Outputs(),
        count_input: bool = False,
    ):
        self._spec = spec
        self._components = components
        self._schema = schema
        self._missing = missing
        self._dtype = dtype
        self._outputs = outputs
        self._count_input = count_input
        self._rows_projected = Metrics.counter(c.NAMESPACE, c.ROWS_PROJECTED)
        self._rows_read = Metrics.counter(c.NAMESPACE, c.ROWS_READ)
        self._rows_missing = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.MISSING_VALUE
        )
        self._rows_unknown = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.UNKNOWN_GROUP
        )
        self._rows_weightless = Metrics.counter(
            c.NAMESPACE, c.ROWS_LEFT_OUT + c.ZERO_WEIGHT
        )

    def setup(self):
        table = read_dataset(self._components)
        self._bases = pca.table_to_bases(
            table, self._spec.key, len(self._spec.features)
        )
        self._scale = pca.whitening_scale(self._bases)
        feature_scale = (
            pca.feature_scale(self._bases) if self._outputs.standardize else None
        )
        self._projector = pca.Projector(self._bases, self._dtype, feature_scale)
        self._progress = Progress("Transform", self._spec.n_rows)

    def process(self, element):
        source, table = element
        for first_row, part in slices(table, len(self._spec.features)):
            yield from self._project(source, part, first_row)

    def _project(self, source, table, first_row):
        bases = self._bases
        batch = prepare_batch(table, self._spec, self._missing, source, first_row)
        group = pca.lookup_groups(bases, batch.keys)
        has_basis = group >= 0
        group = group[has_basis]
        values = batch.values[has_basis]
        scores = self._projector.project(group, values)
        rows = np.flatnonzero(batch.kept)[has_basis]

        self._progress.add(table.num_rows)
        self._rows_projected.inc(len(rows))
        if self._count_input:
            self._rows_read.inc(table.num_rows)
            self._rows_missing.inc(batch.n_missing)
            self._rows_weightless.inc(batch.n_zero_weight)
            self._rows_unknown.inc(int((~has_basis).sum()))
        if len(rows) == 0:
            return

        take = pa.array(rows)
        columns = {}
        for name in self._spec.passthrough:
            columns[name] = column_array(table, name).take(take)
        if self._spec.key:
            columns[self._spec.key] = batch.keys.filter(pa.array(has_basis))
        columns.update(self._scores(bases, group, values, scores))
        yield pa.Table.from_arrays(
            [columns[field.name] for field in self._schema], schema=self._schema
        )

    def _scores(self, bases, group, values, scores) -> dict[str, pa.Array]:
        columns = {}
        # A group that keeps fewer axes than the widest has nulls past them.
        past_kept = np.arange(bases.n_components)[None, :] >= bases.n_kept[group, None]
        shown = scores * self._scale[group] if self._outputs.whiten else scores
        for i in range(bases.n_components):
            columns[f"pc_{i + 1}"] = pa.array(shown[:, i], mask=past_kept[:, i])
        if self._outputs.reconstruction_error or self._outputs.reconstruct:
            rebuilt = self._projector.reconstruct(group, scores)
            if self._outputs.reconstruction_error:
                error = np.square(values - rebuilt).sum(axis=1)
                columns["reconstruction_error"] = pa.array(error)
            if self._outputs.reconstruct:
                for i, name in enumerate(self._spec.features):
                    columns[f"{name}_reconstructed"] = pa.array(rebuilt[:, i])
        return columns
