"""What a user would write instead of the stage: NumPy, pandas, plain Beam.

Each alternative reads the Parquet input, computes every group's covariance
(divisor n_rows - 1) and its top ``n_components`` eigenvectors, and writes
Parquet under ``output_dir``:

* ``components/``: ``key``, ``n_rows``, ``mean`` (list), ``covariance`` (list
  of lists), ``components`` (list of lists, one unit row per axis, largest
  eigenvalue first, its entry of largest absolute value positive) and
  ``explained_variance`` (list), one row per group, the same layout as the
  stage's components dataset (which also holds correlation and ratios);
* ``projected/``: ``row_id``, ``key``, ``pc_1`` ... ``pc_k``, one row per input
  row (NumPy and pandas only: the plain Beam job stops at the statistics).

Groups of fewer than two rows have no covariance and are left out, with their
rows, as the stage leaves them out.

Run one as its own process, so that its peak memory can be measured alone::

    python -m benchmarks.alternatives numpy --input in.parquet \
        --output-dir out/numpy --key key --n-components 2

It prints one JSON line: ``{"seconds": ..., "groups": ..., "rows": ...}``,
the time spent after the imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_LOGGER = logging.getLogger(__name__)

# Rows-worth of work that one extra block costs in a batched matmul; weighs
# padding against the number of blocks when the block size is chosen.
_BLOCK_OVERHEAD_ROWS = 64


def _prepare(output_dir: str) -> None:
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(os.path.join(output_dir, "components"))
    os.makedirs(os.path.join(output_dir, "projected"))


def nested_list(values: np.ndarray) -> pa.Array:
    """float64 array of shape (n, ...) as n nested Arrow lists of doubles."""
    array = pa.array(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))
    for width in reversed(values.shape[1:]):
        offsets = np.arange(0, len(array) + 1, width, dtype=np.int32)
        array = pa.ListArray.from_arrays(pa.array(offsets), array)
    return array


def top_components(
    covariance: np.ndarray, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenvectors (as rows) and eigenvalues of a stack of covariances.

    Args:
        covariance: float64, shape (..., n_features, n_features), symmetric.
        n_components: axes to keep.

    Returns:
        components: float64, shape (..., n_components, n_features), largest
            eigenvalue first, each row's entry of largest absolute value
            positive.
        explained_variance: float64, shape (..., n_components).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    components = np.swapaxes(eigenvectors, -1, -2)[..., ::-1, :][..., :n_components, :]
    pivot = np.take_along_axis(
        components, np.abs(components).argmax(axis=-1)[..., None], axis=-1
    )
    components = components * np.where(pivot < 0, -1.0, 1.0)
    return components, eigenvalues[..., ::-1][..., :n_components]


def write_components(
    output_dir: str,
    key: str,
    keys: np.ndarray,
    n_rows: np.ndarray,
    mean: np.ndarray,
    covariance: np.ndarray,
    components: np.ndarray,
    explained_variance: np.ndarray,
) -> None:
    """One Parquet file of per-group statistics under ``components/``."""
    table = pa.table(
        {
            key: pa.array(keys),
            "n_rows": pa.array(n_rows, pa.int64()),
            "mean": nested_list(mean),
            "covariance": nested_list(covariance),
            "components": nested_list(components),
            "explained_variance": nested_list(explained_variance),
        }
    )
    pq.write_table(table, os.path.join(output_dir, "components", "part-0.parquet"))


def write_projected(
    output_dir: str, key: str, row_id: np.ndarray, keys: np.ndarray, scores
) -> None:
    """One Parquet file of projected rows under ``projected/``."""
    columns = {"row_id": pa.array(row_id), key: pa.array(keys)}
    for i in range(scores.shape[1]):
        columns[f"pc_{i + 1}"] = pa.array(np.ascontiguousarray(scores[:, i]))
    path = os.path.join(output_dir, "projected", "part-0.parquet")
    pq.write_table(pa.table(columns), path)


def choose_block_size(counts: np.ndarray) -> int:
    """The power of two, 8 to 4096, that pads the groups at the least cost."""
    best, best_cost = 8, None
    for size in (1 << k for k in range(3, 13)):
        n_blocks = int((-(-counts // size)).sum())
        cost = n_blocks * (size + _BLOCK_OVERHEAD_ROWS)
        if best_cost is None or cost < best_cost:
            best, best_cost = size, cost
    return best


def run_numpy(
    input_path: str, output_dir: str, features: list[str], key: str, n_components: int
) -> dict:
    """In-memory NumPy: sort by key, batched matmul over padded blocks, eigh.

    All rows are held in memory at once (about three times the feature data
    at the peak); this is the practical lower bound on one machine.
    """
    _prepare(output_dir)
    table = pq.read_table(input_path, columns=[key, "row_id", *features])
    keys = table.column(key).to_numpy()
    row_id = table.column("row_id").to_numpy()
    values = np.empty((table.num_rows, len(features)))
    for j, name in enumerate(features):
        values[:, j] = table.column(name).to_numpy()
    del table

    order = np.argsort(keys, kind="stable")
    keys, row_id, values = keys[order], row_id[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])

    # A group of one row has no covariance (divisor n_rows - 1).
    if (counts < 2).any():
        keep = np.repeat(counts >= 2, counts)
        keys, row_id, values = keys[keep], row_id[keep], values[keep]
        counts = counts[counts >= 2]
        starts = np.r_[0, np.cumsum(counts)[:-1]]
    n_groups = len(counts)

    mean = np.add.reduceat(values, starts, axis=0) / counts[:, None]
    values -= np.repeat(mean, counts, axis=0)

    size = choose_block_size(counts)
    blocks_per_group = -(-counts // size)
    first_block = np.cumsum(blocks_per_group) - blocks_per_group
    position = np.arange(len(keys)) - np.repeat(starts, counts)
    block = np.repeat(first_block, counts) + position // size
    slot = position % size
    padded = np.zeros((int(blocks_per_group.sum()), size, len(features)))
    padded[block, slot] = values
    del values

    comoment = np.add.reduceat(
        np.matmul(np.swapaxes(padded, 1, 2), padded), first_block, axis=0
    )
    covariance = comoment / (counts - 1)[:, None, None]
    components, variance = top_components(covariance, n_components)

    block_group = np.repeat(np.arange(n_groups), blocks_per_group)
    scores = np.matmul(padded, np.swapaxes(components[block_group], 1, 2))
    scores = scores[block, slot]

    group_keys = keys[starts]
    write_components(
        output_dir, key, group_keys, counts, mean, covariance, components, variance
    )
    write_projected(output_dir, key, row_id, keys, scores)
    return {"groups": n_groups, "rows": int(counts.sum())}


def run_pandas(
    input_path: str, output_dir: str, features: list[str], key: str, n_components: int
) -> dict:
    """pandas: ``groupby(key)[features].cov()``, then eigh and project per group."""
    import pandas as pd

    _prepare(output_dir)
    df = pd.read_parquet(input_path, columns=[key, "row_id", *features])
    sizes = df.groupby(key).size()
    df = df[df[key].isin(sizes.index[sizes >= 2])]
    grouped = df.groupby(key, sort=True)

    n_rows = grouped.size()
    mean = grouped[features].mean()
    covariance = grouped[features].cov()
    group_keys = n_rows.index.to_numpy()
    d = len(features)
    covariance = covariance.to_numpy().reshape(len(group_keys), d, d)

    components = np.empty((len(group_keys), n_components, d))
    variance = np.empty((len(group_keys), n_components))
    for i in range(len(group_keys)):
        components[i], variance[i] = top_components(covariance[i], n_components)

    position = {k: i for i, k in enumerate(group_keys)}
    mean_values = mean.to_numpy()
    row_ids, key_parts, score_parts = [], [], []
    for group_key, rows in grouped:
        i = position[group_key]
        centred = rows[features].to_numpy() - mean_values[i]
        score_parts.append(centred @ components[i].T)
        row_ids.append(rows["row_id"].to_numpy())
        key_parts.append(rows[key].to_numpy())

    write_components(
        output_dir,
        key,
        group_keys,
        n_rows.to_numpy(),
        mean_values,
        covariance,
        components,
        variance,
    )
    if score_parts:
        write_projected(
            output_dir,
            key,
            np.concatenate(row_ids),
            np.concatenate(key_parts),
            np.concatenate(score_parts),
        )
    return {"groups": len(group_keys), "rows": int(n_rows.sum())}


def _row_to_pair(row: dict, key: str, features: list[str]):
    return row[key], np.array([row[name] for name in features])


def _group_statistics(element, key: str, n_components: int):
    group_key, vectors = element
    values = np.stack(list(vectors))
    if len(values) < 2:
        return
    covariance = np.cov(values, rowvar=False, ddof=1).reshape(
        values.shape[1], values.shape[1]
    )
    components, variance = top_components(covariance, n_components)
    yield {
        key: group_key,
        "n_rows": len(values),
        "mean": values.mean(axis=0).tolist(),
        "covariance": covariance.tolist(),
        "components": components.tolist(),
        "explained_variance": variance.tolist(),
    }


def run_beam(
    input_path: str,
    output_dir: str,
    features: list[str],
    key: str,
    n_components: int,
    beam_args: list[str] | None = None,
) -> dict:
    """Plain Beam: one element per row, ``GroupByKey``, ``np.cov`` per group.

    Statistics only (no projection). Runs on Beam's in-process FnApiRunner,
    the runner that the DirectRunner falls back to, so that nothing is
    fetched from the network.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    _prepare(output_dir)
    vector = pa.list_(pa.float64())
    schema = pa.schema(
        [
            pa.field(key, pa.int64()),
            pa.field("n_rows", pa.int64()),
            pa.field("mean", vector),
            pa.field("covariance", pa.list_(vector)),
            pa.field("components", pa.list_(vector)),
            pa.field("explained_variance", vector),
        ]
    )
    options = PipelineOptions(beam_args or [])
    with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
        _ = (
            p
            | "Read" >> beam.io.ReadFromParquet(input_path, columns=[key, *features])
            | "KeyRows" >> beam.Map(_row_to_pair, key, features)
            | "Group" >> beam.GroupByKey()
            | "Statistics" >> beam.FlatMap(_group_statistics, key, n_components)
            | "Write"
            >> beam.io.WriteToParquet(
                os.path.join(output_dir, "components", "part"),
                schema,
                file_name_suffix=".parquet",
            )
        )
    groups = pq.read_table(os.path.join(output_dir, "components"))
    return {"groups": groups.num_rows, "rows": pc.sum(groups["n_rows"]).as_py() or 0}


ALTERNATIVES = {"numpy": run_numpy, "pandas": run_pandas, "beam": run_beam}


def default_features(input_path: str, key: str) -> list[str]:
    """Every floating column of the input other than the key."""
    schema = pq.read_schema(input_path)
    return [
        field.name
        for field in schema
        if field.name != key and pa.types.is_floating(field.type)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.alternatives",
        description="Run one alternative implementation of the stage.",
        epilog="Other arguments go to Beam as pipeline options (beam only).",
    )
    parser.add_argument("name", choices=sorted(ALTERNATIVES))
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--key", default="key")
    parser.add_argument(
        "--features", help="comma-separated; default: every floating column"
    )
    parser.add_argument("--n-components", type=int, default=2)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)

    features = (
        args.features.split(",")
        if args.features
        else default_features(args.input, args.key)
    )
    if args.n_components > len(features):
        msg = (
            f"n_components={args.n_components} must be at most "
            f"n_features={len(features)}"
        )
        print(f"error: {msg}", file=sys.stderr)
        return 2
    started = time.monotonic()
    kwargs = {"beam_args": beam_args} if args.name == "beam" else {}
    if beam_args and args.name != "beam":
        parser.error(f"unknown arguments: {' '.join(beam_args)}")
    counts = ALTERNATIVES[args.name](
        args.input, args.output_dir, features, args.key, args.n_components, **kwargs
    )
    print(json.dumps({"seconds": round(time.monotonic() - started, 3), **counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
