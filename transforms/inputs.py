"""Find the input files, check their schemas and prepare Arrow batches.

Files are listed and opened through Beam's filesystems, so a local path, a
``gs://`` or an ``s3://`` path work alike. The footers of all files are read
before the pipeline starts: a missing column, a wrong type or an unreadable
file is found, with its file named, before any work is done.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.errors import InputError

_LOGGER = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input, as its footer describes it."""

    path: str
    n_rows: int
    schema: pa.Schema


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the stage reads: files, columns and their unified types.

    Attributes:
        files: the input files, sorted by path.
        key: the group-by column, or None for one global group.
        key_type: the key's value type (a dictionary key's value type).
        features: feature columns in the configured order.
        passthrough: columns copied unchanged into the projected output.
        passthrough_types: the type of each passthrough column.
        weight: the column of row weights, or None for unweighted rows.
    """

    files: tuple[InputFile, ...]
    key: str | None
    key_type: pa.DataType
    features: tuple[str, ...]
    passthrough: tuple[str, ...]
    passthrough_types: tuple[pa.DataType, ...]
    weight: str | None = None

    @property
    def n_rows(self) -> int:
        return sum(file.n_rows for file in self.files)

    @property
    def columns(self) -> list[str]:
        """Columns to read, each once."""
        named = ([self.key] if self.key else []) + list(self.features)
        named += list(self.passthrough) + ([self.weight] if self.weight else [])
        return list(dict.fromkeys(named))


def list_files(pattern: str) -> list[str]:
    """Paths of the Parquet files a file, a directory or a glob names.

    Raises:
        InputError: nothing matches.
    """
    if not _GLOB_CHARS & set(pattern):
        if pattern.endswith("/") or os.path.isdir(pattern):
            pattern = FileSystems.join(pattern.rstrip("/"), "*")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception as exc:  # Beam raises its own error types per filesystem.
        raise InputError(f"input={pattern!r} cannot be listed: {exc}") from exc
    paths = sorted(
        match.path
        for match in matches
        if not os.path.basename(match.path).startswith(("_", "."))
        and not os.path.isdir(match.path)
    )
    if not paths:
        msg = (
            f"input={pattern!r} matches no file; expected a Parquet file, a "
            "directory of them or a glob such as 'data/*.parquet' (sub-folders "
            "are not read: 'data/*/*.parquet' reads one level down)"
        )
        raise InputError(msg)
    return paths


def read_footer(path: str) -> InputFile:
    """Row count and schema of one Parquet file, from its footer alone."""
    try:
        with FileSystems.open(
            path, compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            metadata = pq.ParquetFile(f).metadata
            return InputFile(path, metadata.num_rows, metadata.schema.to_arrow_schema())
    except (pa.ArrowException, OSError) as exc:
        msg = (
            f"{path} is not a readable Parquet file ({exc}); a folder input "
            "reads every file in it but those starting with _ or ., so give a "
            "glob such as 'folder/*.parquet' to pick some"
        )
        raise InputError(msg) from exc


def read_dataset(directory: str) -> pa.Table:
    """All Parquet files directly under a folder, as one table."""
    pattern = FileSystems.join(directory, "*.parquet")
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    tables = []
    for path in paths:
        with FileSystems.open(
            path, compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def _value_type(data_type: pa.DataType) -> pa.DataType:
    """The type a column's values are compared in.

    A dictionary column is compared by value; large and view string and
    binary types are the same values as their plain forms (pandas writes
    large strings, for one), so they are read as those.
    """
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type):
        return pa.string()
    if pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type):
        return pa.binary()
    return data_type


def is_numeric(data_type: pa.DataType) -> bool:
    """Whether a column can be a feature: integer, floating, decimal, boolean."""
    data_type = _value_type(data_type)
    return (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
        or pa.types.is_boolean(data_type)
    )


def _default_features(
    schema: pa.Schema, key: str | None, passthrough: list[str]
) -> list[str]:
    # Booleans are not taken by default: they are flags more often than
    # measurements; they can still be listed as features.
    skip = {key, *passthrough}
    return [
        field.name
        for field in schema
        if field.name not in skip
        and is_numeric(field.type)
        and not pa.types.is_boolean(_value_type(field.type))
    ]


def _require_columns(file: InputFile, names: list[str]) -> None:
    missing = [name for name in names if name not in file.schema.names]
    if missing:
        msg = (
            f"column {missing[0]!r} is not in {file.path}; its columns are: "
            f"{', '.join(file.schema.names)}"
        )
        raise InputError(msg)


def scan_inputs(
    pattern: str,
    key: str | None,
    features: list[str] | None,
    passthrough: list[str],
    weight: str | None = None,
) -> InputSpec:
    """Read every footer and settle the columns and types the stage uses.

    Args:
        pattern: a Parquet file, a directory of them or a glob.
        key: the group-by column, or None.
        features: feature columns, or None for every numeric column that is
            neither the key nor passthrough.
        passthrough: columns to copy into the projected output.
        weight: a numeric column of non-negative row weights, or None.

    Returns:
        The checked input description.

    Raises:
        InputError: a file is unreadable or lacks a column, a column has a
            type the stage cannot use, or the types differ between files.
    """
    files = [read_footer(path) for path in list_files(pattern)]
    first = files[0]
    if features is None:
        skip = [*passthrough, *([weight] if weight else [])]
        features = _default_features(first.schema, key, skip)
        if not features:
            msg = (
                f"{first.path} has no numeric column to take as a feature; "
                f"its columns are: {', '.join(first.schema.names)}"
            )
            raise InputError(msg)

    numeric = list(features) + ([weight] if weight else [])
    named = ([key] if key else []) + numeric + list(passthrough)
    for file in files:
        _require_columns(file, named)
        for name in numeric:
            field = file.schema.field(name)
            if not is_numeric(field.type):
                role = "weight" if name == weight else "feature"
                msg = (
                    f"{role} column {name!r} in {file.path} has type "
                    f"{field.type}; expected a numeric type (integer, floating, "
                    "decimal or boolean)"
                )
                raise InputError(msg)

    key_type = pa.int8()
    if key:
        key_type = _common_type(files, key)
        if pa.types.is_nested(key_type):
            msg = (
                f"key column {key!r} has type {key_type}; expected a scalar type "
                "such as string or integer, not a list, struct or map"
            )
            raise InputError(msg)
    passthrough_types = tuple(_common_type(files, name) for name in passthrough)

    _LOGGER.info(
        "Input: %d file(s), %d rows, key=%s, %d features",
        len(files),
        sum(file.n_rows for file in files),
        key,
        len(features),
    )
    return InputSpec(
        files=tuple(files),
        key=key,
        key_type=key_type,
        features=tuple(features),
        passthrough=tuple(passthrough),
        passthrough_types=passthrough_types,
        weight=weight,
    )


def _common_type(files: list[InputFile], name: str) -> pa.DataType:
    """The one value type a column has in every file."""
    expected = _value_type(files[0].schema.field(name).type)
    for file in files[1:]:
        found = _value_type(file.schema.field(name).type)
        if found != expected:
            msg = (
                f"column {name!r} has type {found} in {file.path} but {expected} "
                f"in {files[0].path}; expected the same type in every file"
            )
            raise InputError(msg)
    return expected


@dataclasses.dataclass
class Batch:
    """The usable rows of one Arrow batch of input.

    Attributes:
        keys: key of each kept row, in the spec's key type, no nulls.
        values: float64, shape (n_kept, n_features), all finite.
        kept: bool, shape (n_rows,), which rows of the batch were kept.
        n_missing: rows left out for a null, NaN or infinite key, feature or
            weight.
        weights: float64, shape (n_kept,), positive, or None when unweighted.
        n_zero_weight: rows left out for a weight of 0.
    """

    keys: pa.Array
    values: np.ndarray
    kept: np.ndarray
    n_missing: int
    weights: np.ndarray | None = None
    n_zero_weight: int = 0


# Values (rows * features) of one slice: a Parquet row group of 262,144 rows
# of 256 features would otherwise be padded, copied and multiplied whole
# (6.2 GB peak). Not much smaller: every slice yields a co-moment matrix per
# group it holds, and with 100 groups of 256 features a slice of 2**22 values
# yielded more co-moment entries than it had values, all to be merged.
SLICE_VALUES = 2**23


def slices(table: pa.Table, n_features: int):
    """(first row, table slice) pairs of at most SLICE_VALUES values each."""
    step = max(1024, SLICE_VALUES // max(1, n_features))
    for start in range(0, max(table.num_rows, 1), step):
        yield start, table.slice(start, step)


def column_array(table: pa.Table, name: str) -> pa.Array:
    """One column as a single array of its value type (see ``_value_type``)."""
    array = table.column(name).combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    value_type = _value_type(array.type)
    return array if array.type == value_type else array.cast(value_type)


def prepare_batch(
    table: pa.Table, spec: InputSpec, missing: str, source: str, first_row: int = 0
) -> Batch:
    """Keys and float64 features of a batch, with unusable rows left out.

    Args:
        table: a batch of input rows.
        spec: from ``scan_inputs``.
        missing: "drop" to leave out a row with a missing key or feature,
            "error" to stop at the first.
        source: the file the batch comes from, for messages.
        first_row: the batch's first row within its Parquet row group.

    Returns:
        The kept rows.

    Raises:
        InputError: ``missing="error"`` and a row has a missing value.
    """
    n_rows = table.num_rows
    kept = np.ones(n_rows, dtype=bool)
    columns = []
    for name in spec.features:
        array = column_array(table, name)
        values = pc.cast(array, pa.float64(), safe=False)
        column = values.to_numpy(zero_copy_only=False)
        # Nulls come out as NaN; infinity is no number either.
        usable = np.isfinite(column)
        _check_missing(missing, usable, name, source, first_row)
        kept &= usable
        columns.append(column)

    if spec.key:
        keys = column_array(table, spec.key)
        if keys.type != spec.key_type:
            keys = pc.cast(keys, spec.key_type)
        usable = keys.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_floating(keys.type):
            # A NaN or infinite key is as missing as a null one.
            usable &= np.isfinite(keys.to_numpy(zero_copy_only=False))
        _check_missing(missing, usable, spec.key, source, first_row)
        kept &= usable
    else:
        keys = pa.array(np.zeros(n_rows, np.int8))

    weights, n_zero_weight = None, 0
    if spec.weight:
        weights = pc.cast(column_array(table, spec.weight), pa.float64(), safe=False)
        weights = weights.to_numpy(zero_copy_only=False)
        usable = np.isfinite(weights)
        _check_missing(missing, usable, spec.weight, source, first_row)
        negative = usable & (weights < 0)
        if negative.any():
            row = int(np.flatnonzero(negative)[0])
            msg = (
                f"weight column {spec.weight!r} of {source} has a negative value "
                f"({weights[row]}) in row {first_row + row} of its row group; "
                "weights must be 0 or more"
            )
            raise InputError(msg)
        kept &= usable
        n_missing = int(n_rows - kept.sum())
        zero = kept & (weights == 0)
        n_zero_weight = int(zero.sum())
        kept &= ~zero
    else:
        n_missing = int(n_rows - kept.sum())

    values = np.stack(columns, axis=1) if columns else np.zeros((n_rows, 0))
    if not kept.all():
        values = values[kept]
        keys = keys.filter(pa.array(kept))
    if weights is not None:
        weights = weights[kept]
    return Batch(keys, values, kept, n_missing, weights, n_zero_weight)


def _check_missing(
    missing: str, usable: np.ndarray, name: str, source: str, first_row: int
) -> None:
    if missing == "error" and not usable.all():
        row = first_row + int(np.flatnonzero(~usable)[0])
        msg = (
            f"column {name!r} of {source} has a missing value (null, NaN or "
            f"infinity) in row {row} of its row group; set missing: drop to "
            "leave such rows out"
        )
        raise InputError(msg)
