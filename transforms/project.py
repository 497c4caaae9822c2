"""Beam transform that projects every input row onto its group's basis."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms import counters, pca
from transforms.inputs import InputSpec, column_array, prepare_batch, read_dataset


def projected_schema(spec: InputSpec, n_components: int) -> pa.Schema:
    """Passthrough columns, the key column, then pc_1 ... pc_k as float64."""
    fields = [
        pa.field(name, data_type)
        for name, data_type in zip(
            spec.passthrough, spec.passthrough_types, strict=True
        )
    ]
    if spec.key and spec.key not in spec.passthrough:
        fields.append(pa.field(spec.key, spec.key_type))
    fields += [pa.field(f"pc_{i + 1}", pa.float64()) for i in range(n_components)]
    return pa.schema(fields)


class ProjectFn(beam.DoFn):
    """(file, Arrow batch) -> Arrow table of the batch's projected rows.

    Each worker loads the bases from the components dataset once, in
    ``setup``. Rows left out of the statistics (a missing value, a group
    without a covariance) are left out here too; they were counted where the
    statistics were computed.
    """

    def __init__(
        self,
        spec: InputSpec,
        components: str,
        schema: pa.Schema,
        missing: str,
        dtype: str,
        block_rows: int,
    ):
        self._spec = spec
        self._components = components
        self._schema = schema
        self._missing = missing
        self._dtype = dtype
        self._block_rows = block_rows
        self._rows_projected = Metrics.counter(
            counters.NAMESPACE, counters.ROWS_PROJECTED
        )

    def setup(self):
        table = read_dataset(self._components)
        self._bases = pca.table_to_bases(
            table, self._spec.key, len(self._spec.features)
        )

    def process(self, element):
        source, table = element
        bases = self._bases
        batch = prepare_batch(table, self._spec, self._missing, source)
        group = pca.lookup_groups(bases, batch.keys)
        has_basis = group >= 0
        scores = pca.project_rows(
            bases,
            group[has_basis],
            batch.values[has_basis],
            self._dtype,
            self._block_rows,
        )

        rows = np.flatnonzero(batch.kept)[has_basis]
        self._rows_projected.inc(len(rows))
        if len(rows) == 0:
            return
        take = pa.array(rows)
        columns = {}
        for name in self._spec.passthrough:
            columns[name] = column_array(table, name).take(take)
        if self._spec.key:
            columns[self._spec.key] = batch.keys.filter(pa.array(has_basis))
        # A group that keeps fewer axes than the widest has nulls past them.
        n_kept = bases.n_kept[group[has_basis]]
        for i in range(scores.shape[1]):
            columns[f"pc_{i + 1}"] = pa.array(scores[:, i], mask=n_kept <= i)
        yield pa.Table.from_arrays(
            [columns[field.name] for field in self._schema], schema=self._schema
        )
