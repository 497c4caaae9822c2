"""The Beam graph of the stage: read, fit per-group bases, project, write."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched

from pipeline.config import Config
from transforms import pca
from transforms.inputs import InputSpec
from transforms.output import WriteDataset
from transforms.project import ProjectFn, projected_schema
from transforms.stats import ComputeBases, ConcatBasesFn


def read_batches(pipeline: beam.Pipeline, spec: InputSpec, label: str):
    """The input as (file, Arrow table) pairs, one per Parquet row group."""
    return (
        pipeline
        | f"{label}Files" >> beam.Create([file.path for file in spec.files])
        | f"{label}Parquet"
        >> ReadAllFromParquetBatched(columns=spec.columns, with_filename=True)
    )


def build(pipeline: beam.Pipeline, config: Config, spec: InputSpec, staging: str):
    """Add the stage's transforms to ``pipeline``, writing under ``staging``.

    The input is read twice, once for the statistics and once for the
    projection, so that no stage has to hold the rows while the bases are
    computed.
    """
    n_features = len(spec.features)
    bases = read_batches(pipeline, spec, "ReadForStats") | "ComputeBases" >> (
        ComputeBases(
            spec,
            ddof=config.ddof,
            n_components=config.n_components,
            missing=config.missing,
            dtype=config.dtype,
            block_rows=config.block_rows,
            batch_blocks=config.batch_blocks,
            n_shards=config.n_shards,
        )
    )

    # The components go out from the one sorted Bases that the projection
    # uses anyway, so that every run writes the groups in the same order.
    all_bases = bases | "AllBases" >> beam.CombineGlobally(
        ConcatBasesFn(spec.key_type, n_features, config.n_components)
    )
    schema = pca.components_schema(spec.key, spec.key_type, list(spec.features))
    _ = (
        all_bases
        | "ComponentsTable" >> beam.Map(pca.bases_to_table, schema=schema)
        | "WriteComponents"
        >> WriteDataset(FileSystems.join(staging, "components"), schema)
    )

    out_schema = projected_schema(spec, config.n_components)
    project = ProjectFn(
        spec, out_schema, config.missing, config.dtype, config.block_rows
    )
    _ = (
        read_batches(pipeline, spec, "ReadForProjection")
        | "Project" >> beam.ParDo(project, beam.pvalue.AsSingleton(all_bases))
        | "WriteProjected"
        >> WriteDataset(FileSystems.join(staging, "projected"), out_schema)
    )
