"""The Beam graphs of the stage: fit per-group bases, then project and write.

A run is up to two pipelines. The fit reads the input, computes every group's
moments and bases and writes ``components/``. The transform reads the input
again and projects each row onto its group's basis, which every worker loads
from a ``components/`` dataset (this run's, or an earlier run's); its width
(the most axes any group keeps) is known by then, so ``projected/`` gets its
exact schema. Neither pipeline holds the rows while the other runs.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquetBatched

import pipeline
from pipeline.config import Config
from transforms import pca
from transforms.inputs import InputSpec
from transforms.output import WriteDataset
from transforms.project import Outputs, ProjectFn, projected_schema
from transforms.stats import ComputeBases, ConcatBasesFn


def read_batches(pipeline: beam.Pipeline, spec: InputSpec):
    """The input as (file, Arrow table) pairs, one per Parquet row group."""
    return (
        pipeline
        | "ListFiles" >> beam.Create([file.path for file in spec.files])
        | "ReadParquet"
        >> ReadAllFromParquetBatched(
            columns=spec.columns, with_filename=True
        ).with_output_types(typehints.Tuple[str, pa.Table])
    )


def fit_settings(config: Config, spec: InputSpec) -> dict:
    """What a components dataset records of the fit that made it."""
    return {
        "key": spec.key,
        "key_type": str(spec.key_type) if spec.key else None,
        "features": list(spec.features),
        "ddof": config.ddof,
        "dtype": config.dtype,
        "standardize": config.standardize,
        "weight": config.weight,
        "n_components": config.n_components,
        "stage_version": pipeline.__version__,
    }


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
        standardize=config.standardize,
    )

    # One sorted table, so that every run writes the groups in one order.
    width = config.n_components if isinstance(config.n_components, int) else 1
    schema = pca.components_schema(
        spec.key, spec.key_type, list(spec.features), fit_settings(config, spec)
    )
    _ = (
        bases
        | "AllBases"
        >> beam.CombineGlobally(
            ConcatBasesFn(spec.key_type, len(spec.features), width)
        ).with_output_types(pca.Bases)
        | "ComponentsTable"
        >> beam.Map(pca.bases_to_table, schema=schema).with_output_types(pa.Table)
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
    outputs = Outputs(
        config.whiten,
        config.reconstruction_error,
        config.reconstruct,
        config.standardize,
    )
    schema = projected_schema(spec, n_columns, outputs)
    project = ProjectFn(
        spec,
        components,
        schema,
        config.missing,
        config.dtype,
        outputs,
        count_input=config.mode == "transform",
    )
    _ = (
        read_batches(pipeline, spec)
        | "Project" >> beam.ParDo(project).with_output_types(pa.Table)
        | "WriteProjected"
        >> WriteDataset(FileSystems.join(staging, "projected"), schema)
    )
