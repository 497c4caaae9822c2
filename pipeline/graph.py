"""The Beam graphs of the stage: fit per-group bases, then project and write.

A run is two pipelines. The fit reads the input, computes every group's
moments and bases and writes ``components/``. The transform reads the input
again and projects each row onto its group's basis, which every worker loads
from ``components/``; its width (the most axes any group keeps) is known by
then, so ``projected/`` gets its exact schema. Neither pipeline holds the
rows while the other runs.
"""

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


def read_batches(pipeline: beam.Pipeline, spec: InputSpec):
    """The input as (file, Arrow table) pairs, one per Parquet row group."""
    return (
        pipeline
        | "ListFiles" >> beam.Create([file.path for file in spec.files])
        | "ReadParquet"
        >> ReadAllFromParquetBatched(columns=spec.columns, with_filename=True)
    )


def build_fit(pipeline: beam.Pipeline, config: Config, spec: InputSpec, staging: str):
    """Add the fit to ``pipeline``: input -> ``<staging>/components/``."""
    bases = read_batches(pipeline, spec) | "ComputeBases" >> ComputeBases(
        spec,
        ddof=config.ddof,
        n_components=config.n_components,
        missing=config.missing,
        dtype=config.dtype,
        block_rows=config.block_rows,
        batch_blocks=config.batch_blocks,
        n_shards=config.n_shards,
    )

    # One sorted table, so that every run writes the groups in one order.
    width = config.n_components if isinstance(config.n_components, int) else 1
    schema = pca.components_schema(spec.key, spec.key_type, list(spec.features))
    _ = (
        bases
        | "AllBases"
        >> beam.CombineGlobally(ConcatBasesFn(spec.key_type, len(spec.features), width))
        | "ComponentsTable" >> beam.Map(pca.bases_to_table, schema=schema)
        | "WriteComponents"
        >> WriteDataset(FileSystems.join(staging, "components"), schema)
    )


def build_transform(
    pipeline: beam.Pipeline,
    config: Config,
    spec: InputSpec,
    components: str,
    n_columns: int,
    staging: str,
):
    """Add the projection to ``pipeline``: input -> ``<staging>/projected/``.

    Args:
        components: the folder of the components dataset to project with.
        n_columns: the most axes any group keeps: pc_1 ... pc_{n_columns}.
    """
    schema = projected_schema(spec, n_columns)
    project = ProjectFn(
        spec, components, schema, config.missing, config.dtype, config.block_rows
    )
    _ = (
        read_batches(pipeline, spec)
        | "Project" >> beam.ParDo(project)
        | "WriteProjected"
        >> WriteDataset(FileSystems.join(staging, "projected"), schema)
    )
