"""Synthetic Parquet input for the benchmarks, written one row group at a time.

Usage::

    python -m benchmarks.generate --rows 2000000 --features 16 --groups 10000 \
        --out benchmarks/work/input.parquet

Columns: ``key`` (int64, the group), ``row_id`` (int64, the row's position),
``f0`` ... ``f{d-1}`` (float64). The rows of group g are drawn as

    x = mean_g + (z * scale_g) @ rotation_{g mod R},  z ~ N(0, I)

so every group has its own mean, its own overall scale and a covariance
``rotation^T diag(scale_g^2) rotation`` whose eigenvalues are distinct
(``scale_g`` decays from 3 to 0.5 across the features, jittered a little per
group): the principal axes are well defined and differ between groups.

Keys are drawn independently for every row, so rows come in random group
order and group sizes are multinomial (a group may get fewer than two rows
when the mean group size is small). With ``--skew s`` a fraction ``s`` of the
rows goes to the hot key 0 and the rest uniformly to keys 1 .. groups-1.

Only the per-group parameters (O(groups * features)) and one row group are
held in memory at a time, so the file may be larger than memory. The output is
fully determined by the arguments, ``--row-group-rows`` included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_LOGGER = logging.getLogger(__name__)

N_ROTATIONS = 16


def group_parameters(
    n_groups: int, n_features: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, per-feature scale and rotation index of every group.

    Returns:
        mean: float64, shape (n_groups, n_features).
        scale: float64, shape (n_groups, n_features), positive.
        rotations: float64, shape (N_ROTATIONS, n_features, n_features),
            orthogonal matrices; group g uses ``rotations[g % N_ROTATIONS]``.
    """
    rng = np.random.default_rng([seed, 0])
    mean = rng.normal(0.0, 10.0, (n_groups, n_features))
    group_scale = np.exp(rng.uniform(-1.0, 1.0, (n_groups, 1)))
    jitter = np.exp(rng.uniform(-0.05, 0.05, (n_groups, n_features)))
    scale = group_scale * np.linspace(3.0, 0.5, n_features) * jitter
    normal = rng.standard_normal((N_ROTATIONS, n_features, n_features))
    rotations, _ = np.linalg.qr(normal)
    return mean, scale, rotations


def draw_keys(rng: np.random.Generator, n_rows: int, n_groups: int, skew: float):
    """Group of each row: key 0 with probability ``skew``, else uniform."""
    if n_groups == 1:
        return np.zeros(n_rows, dtype=np.int64)
    if skew <= 0:
        return rng.integers(0, n_groups, n_rows, dtype=np.int64)
    hot = rng.random(n_rows) < skew
    others = rng.integers(1, n_groups, n_rows, dtype=np.int64)
    return np.where(hot, 0, others)


def schema(n_features: int) -> pa.Schema:
    fields = [pa.field("key", pa.int64()), pa.field("row_id", pa.int64())]
    fields += [pa.field(f"f{j}", pa.float64()) for j in range(n_features)]
    return pa.schema(fields)


def row_group(
    start: int,
    n_rows: int,
    params: tuple[np.ndarray, np.ndarray, np.ndarray],
    skew: float,
    seed: int,
    index: int,
) -> pa.Table:
    """The rows ``start .. start + n_rows - 1`` as one Arrow table."""
    mean, scale, rotations = params
    n_groups, n_features = mean.shape
    rng = np.random.default_rng([seed, 1, index])
    keys = draw_keys(rng, n_rows, n_groups, skew)

    z = rng.standard_normal((n_rows, n_features))
    z *= scale[keys]
    values = np.empty_like(z)
    rotation_of_row = keys % N_ROTATIONS
    for r in range(N_ROTATIONS):
        rows = np.flatnonzero(rotation_of_row == r)
        if len(rows):
            values[rows] = z[rows] @ rotations[r]
    del z
    values += mean[keys]

    # Column-major, so that every feature column is one contiguous buffer.
    columns = np.ascontiguousarray(values.T)
    del values
    arrays = [pa.array(keys), pa.array(np.arange(start, start + n_rows))]
    arrays += [pa.array(columns[j]) for j in range(n_features)]
    return pa.Table.from_arrays(arrays, schema=schema(n_features))


def generate(
    out: str,
    n_rows: int,
    n_features: int,
    n_groups: int,
    skew: float = 0.0,
    seed: int = 0,
    row_group_rows: int = 262_144,
) -> dict:
    """Write the synthetic input to ``out`` and return its parameters.

    The file is written under a temporary name and renamed when complete, so
    that an interrupted run leaves no partial file under ``out``.

    Raises:
        ValueError: a count is not positive or ``skew`` is outside [0, 1).
    """
    for name, value in (
        ("rows", n_rows),
        ("features", n_features),
        ("groups", n_groups),
        ("row_group_rows", row_group_rows),
    ):
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive integer")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew={skew} must be in [0, 1)")

    started = time.monotonic()
    params = group_parameters(n_groups, n_features, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial"
    with pq.ParquetWriter(partial, schema(n_features), compression="snappy") as w:
        for index, start in enumerate(range(0, n_rows, row_group_rows)):
            size = min(row_group_rows, n_rows - start)
            table = row_group(start, size, params, skew, seed, index)
            w.write_table(table, row_group_size=row_group_rows)
    os.replace(partial, out)

    info = {
        "rows": n_rows,
        "features": n_features,
        "groups": n_groups,
        "skew": skew,
        "seed": seed,
        "row_group_rows": row_group_rows,
        "bytes": os.path.getsize(out),
    }
    _LOGGER.info(
        "Wrote %s: %d rows, %.0f MB in %.1f s",
        out,
        n_rows,
        info["bytes"] / 1e6,
        time.monotonic() - started,
    )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="fraction of rows in the hot key 0; 0 (default) is uniform",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the Parquet file to write")
    parser.add_argument("--row-group-rows", type=int, default=262_144)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    info = generate(
        args.out,
        args.rows,
        args.features,
        args.groups,
        args.skew,
        args.seed,
        args.row_group_rows,
    )
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
