"""Column types, keys, missing values and row accounting, end to end."""

import datetime
import decimal
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    assert_close,
    matrix,
    oracle,
    read_components,
    read_projected,
    run_stage,
)


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def components_by_key(out, key) -> dict:
    table = read_components(out)
    return {
        value: {name: matrix(table, name, row) for name in ("covariance", "mean")}
        | {"n_rows": table.column("n_rows")[row].as_py()}
        for row, value in enumerate(table.column(key).to_pylist())
    }


def test_integer_boolean_decimal_and_float32_features_give_float64_answers(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    ints = rng.integers(-1000, 1000, size=n)
    flags = rng.random(size=n) < 0.4
    cents = rng.integers(0, 10**6, size=n)
    small = rng.normal(size=n).astype(np.float32)
    table = pa.table(
        {
            "i": pa.array(ints, pa.int32()),
            "b": pa.array(flags),
            "d": pa.array(
                [decimal.Decimal(int(c)) / 100 for c in cents], pa.decimal128(12, 2)
            ),
            "f": pa.array(small, pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")

    out = run_stage(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        features=["i", "b", "d", "f"],
        n_components=2,
    )

    values = np.stack([ints, flags, cents / 100, small.astype(np.float64)], axis=1)
    covariance = matrix(read_components(out), "covariance", 0)
    assert_close(covariance, oracle(values)["covariance"], rtol=1e-12)


def test_dictionary_keys_group_by_value_across_files(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 2))
    keys = ["a", "b"] * 20
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (start, dictionary) in enumerate([(0, ["a", "b"]), (20, ["b", "a"])]):
        part = keys[start : start + 20]
        indices = pa.array([dictionary.index(k) for k in part], pa.int8())
        column = pa.DictionaryArray.from_arrays(indices, pa.array(dictionary))
        pq.write_table(
            pa.table(
                {
                    "k": column,
                    "x": values[start : start + 20, 0],
                    "y": values[start : start + 20, 1],
                }
            ),
            folder / f"p{i}.parquet",
        )

    out = run_stage(tmp_path, input=str(folder), key="k", n_components=1)

    found = components_by_key(out, "k")
    assert sorted(found) == ["a", "b"]
    for key in "ab":
        rows = values[np.array(keys) == key]
        assert found[key]["n_rows"] == 20
        assert_close(found[key]["covariance"], np.cov(rows, rowvar=False), 1e-12)


def test_int64_keys_above_2_to_53_stay_distinct_groups(tmp_path):
    big = 2**53
    keys = [big, big + 1] * 10
    rng = np.random.default_rng(2)
    values = rng.normal(size=(20, 2))
    pq.write_table(
        pa.table(
            {
                "k": pa.array(keys, pa.int64()),
                "x": values[:, 0],
                "y": values[:, 1],
                "row_id": np.arange(20),
            }
        ),
        tmp_path / "in.parquet",
    )

    out = run_stage(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        key="k",
        passthrough=["row_id"],
        n_components=1,
    )

    components = read_components(out)
    assert components.schema.field("k").type == pa.int64()
    assert sorted(components.column("k").to_pylist()) == [big, big + 1]
    projected = read_projected(out)
    assert sorted(set(projected.column("k").to_pylist())) == [big, big + 1]


def test_feature_int64_in_one_file_and_double_in_another(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    big = 2**40 + 1
    ints = np.array([big, big + 3, big + 7, big + 2], dtype=np.int64)
    doubles = np.array([big + 1.5, big + 9.0, big - 4.0])
    other = np.array([1.0, 2.0, 4.0, 8.0, 3.0, 1.0, 0.0])
    pq.write_table(pa.table({"x": ints, "y": other[:4]}), folder / "a.parquet")
    pq.write_table(pa.table({"x": doubles, "y": other[4:]}), folder / "b.parquet")

    out = run_stage(tmp_path, input=str(folder), n_components=1)

    values = np.stack([np.concatenate([ints.astype(np.float64), doubles]), other], 1)
    found = read_components(out)
    assert_close(matrix(found, "covariance", 0), np.cov(values, rowvar=False), 1e-9)
    assert_close(matrix(found, "mean", 0), values.mean(axis=0), 1e-15)


def test_timestamp_column_is_not_a_default_feature(tmp_path):
    start = datetime.datetime(2026, 1, 1)
    table = pa.table(
        {
            "when": pa.array([start + datetime.timedelta(hours=h) for h in range(10)]),
            "x": np.arange(10.0),
            "y": np.arange(10.0) ** 2,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")

    out = run_stage(tmp_path, input=str(tmp_path / "in.parquet"), n_components=1)

    schema = read_components(out).schema
    assert json.loads(schema.metadata[b"features"]) == ["x", "y"]


def test_duplicate_rows_count_as_rows(tmp_path):
    values = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 1.0]])
    pq.write_table(
        pa.table({"x": values[:, 0], "y": values[:, 1]}), tmp_path / "in.parquet"
    )

    out = run_stage(tmp_path, input=str(tmp_path / "in.parquet"), n_components=1)

    found = read_components(out)
    assert found.column("n_rows")[0].as_py() == 4
    assert_close(matrix(found, "covariance", 0), np.cov(values, rowvar=False), 1e-12)


def test_missing_values_are_dropped_counted_and_accounted_for(tmp_path):
    x = [1.0, 2.0, None, 4.0, np.nan, 6.0, np.inf, 8.0, 9.0, 10.0, 11.0, 12.0]
    y = [2.0, 1.0, 3.0, 5.0, 4.0, 8.0, 7.0, -np.inf, 6.0, 9.0, 12.0, 10.0]
    k = ["a", "a", "a", "a", "a", "a", "a", "a", None, "b", "b", "lonely"]
    table = pa.table(
        {"k": k, "x": pa.array(x, pa.float64()), "y": y, "row_id": np.arange(12)}
    )
    pq.write_table(table, tmp_path / "in.parquet")

    out = run_stage(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        key="k",
        passthrough=["row_id"],
        n_components=1,
    )

    summary = summary_of(out)
    assert summary["rows_read"] == 12
    assert summary["rows_left_out"] == {"missing_value": 5, "too_few_rows": 1}
    assert summary["groups_left_out"] == {"too_few_rows": 1}
    left_out = sum(summary["rows_left_out"].values())
    assert summary["rows_read"] == summary["rows_projected"] + left_out
    used = np.array([[1.0, 2.0], [2.0, 1.0], [4.0, 5.0], [6.0, 8.0]])
    found = components_by_key(out, "k")
    assert found["a"]["n_rows"] == 4
    assert_close(found["a"]["covariance"], np.cov(used, rowvar=False), 1e-12)
    assert sorted(read_projected(out).column("row_id").to_pylist()) == [
        0,
        1,
        3,
        5,
        9,
        10,
    ]


def test_empty_parquet_file_writes_empty_datasets_with_schema(tmp_path):
    schema = pa.schema(
        [
            ("k", pa.string()),
            ("x", pa.float64()),
            ("y", pa.float64()),
            ("row_id", pa.int64()),
        ]
    )
    pq.write_table(schema.empty_table(), tmp_path / "in.parquet")

    out = run_stage(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        key="k",
        passthrough=["row_id"],
        n_components=2,
    )

    components = read_components(out)
    projected = read_projected(out)
    assert components.num_rows == 0 and projected.num_rows == 0
    assert components.schema.field("k").type == pa.string()
    assert projected.schema.names == ["row_id", "k", "pc_1", "pc_2"]
    assert summary_of(out)["rows_read"] == 0


@pytest.mark.slow
def test_float32_moments_stay_within_1e_4_of_float64_at_mean_1e4(tmp_path):
    rng = np.random.default_rng(5)
    n = 1_000_000
    values = rng.normal(size=(n, 3)) + 1e4
    pq.write_table(
        pa.table({f"f{i}": values[:, i] for i in range(3)}),
        tmp_path / "in.parquet",
        row_group_size=200_000,
    )

    out = run_stage(
        tmp_path, input=str(tmp_path / "in.parquet"), n_components=3, dtype="float32"
    )

    covariance = matrix(read_components(out), "covariance", 0)
    # Blocks are shifted by their first row in float64 before the cast, so
    # float32 holds the spread, not the offset: 1e-4 relative is the promise.
    assert_close(covariance, np.cov(values, rowvar=False), rtol=1e-4)
