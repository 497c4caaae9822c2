"""Degenerate groups and fractional n_components: defined, NumPy's answers."""

import json
import warnings

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


def write(tmp_path, columns: dict, name="in.parquet", **kwargs) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path, **kwargs)
    return str(path)


def by_key(table: pa.Table, key: str) -> dict:
    return {value: row for row, value in enumerate(table.column(key).to_pylist())}


def test_constant_feature_gives_nan_correlation_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 3))
    values[:, 1] = 5.0
    path = write(tmp_path, {"a": values[:, 0], "b": values[:, 1], "c": values[:, 2]})

    out = run_stage(tmp_path, input=path, n_components=2)

    table = read_components(out)
    correlation = matrix(table, "correlation", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.corrcoef(values, rowvar=False)
    assert np.isnan(correlation[1]).all() and np.isnan(correlation[:, 1]).all()
    assert correlation[0, 0] == 1.0 and correlation[2, 2] == 1.0
    kept = ~np.isnan(correlation)
    assert (np.abs(correlation[kept]) <= 1).all()
    assert_close(correlation, expected, rtol=1e-12)
    assert matrix(table, "covariance", 0)[1, 1] == 0.0


def test_fewer_rows_than_features_stays_orthonormal_and_non_negative(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 6)) * 1e3
    path = write(tmp_path, {f"f{i}": values[:, i] for i in range(6)})

    out = run_stage(tmp_path, input=path, n_components=6)

    table = read_components(out)
    variance = matrix(table, "explained_variance", 0)
    ratio = matrix(table, "explained_variance_ratio", 0)
    axes = matrix(table, "components", 0)
    assert (variance >= 0).all()
    assert ratio.sum() <= 1 + 1e-12
    np.testing.assert_allclose(axes @ axes.T, np.eye(6), atol=1e-10)
    expected = oracle(values)
    # The two axes of nonzero variance are unique; the rest span the null space.
    assert_close(variance, expected["explained_variance"], rtol=1e-9)
    assert_close(axes[:2], expected["components"][:2], rtol=1e-9)


def test_group_of_identical_rows_has_zero_ratio_and_projects_to_zero(tmp_path):
    rng = np.random.default_rng(2)
    good = rng.normal(size=(30, 2))
    keys = ["same"] * 5 + ["good"] * 30
    a = np.concatenate([np.full(5, 3.0), good[:, 0]])
    b = np.concatenate([np.full(5, -1.0), good[:, 1]])
    path = write(tmp_path, {"k": keys, "a": a, "b": b, "row_id": np.arange(35)})

    out = run_stage(
        tmp_path, input=path, key="k", passthrough=["row_id"], n_components=2
    )

    table = read_components(out)
    row = by_key(table, "k")["same"]
    np.testing.assert_array_equal(matrix(table, "explained_variance_ratio", row), 0)
    np.testing.assert_array_equal(matrix(table, "explained_variance", row), 0)
    projected = read_projected(out).to_pandas()
    same = projected[projected["k"] == "same"]
    assert len(same) == 5
    np.testing.assert_array_equal(same[["pc_1", "pc_2"]].to_numpy(), 0.0)


def test_fraction_keeps_what_scikit_learn_keeps_per_group(tmp_path):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    groups = {
        "flat": rng.normal(size=(200, 4)) * [3.0, 0.1, 0.1, 0.1],
        "round": rng.normal(size=(200, 4)),
        "two": rng.normal(size=(200, 4)) * [2.0, 2.0, 0.05, 0.05],
    }
    keys = np.repeat(list(groups), 200)
    values = np.concatenate(list(groups.values()))
    columns = {f"f{i}": values[:, i] for i in range(4)}
    path = write(tmp_path, dict(columns, k=keys, row_id=np.arange(600)))

    out = run_stage(
        tmp_path, input=path, key="k", passthrough=["row_id"], n_components=0.9
    )

    table = read_components(out)
    rows = by_key(table, "k")
    widest = 0
    for name, group in groups.items():
        expected = PCA(n_components=0.9, svd_solver="full").fit(group).n_components_
        kept = len(table.column("explained_variance")[rows[name]].as_py())
        assert kept == expected, name
        widest = max(widest, kept)
    projected = read_projected(out).to_pandas()
    assert [c for c in projected.columns if c.startswith("pc_")] == [
        f"pc_{i + 1}" for i in range(widest)
    ]
    flat = projected[projected["k"] == "flat"]
    assert flat["pc_1"].notna().all()
    assert flat[f"pc_{widest}"].isna().all()


def test_fraction_on_the_command_line(tmp_path):
    rng = np.random.default_rng(4)
    values = rng.normal(size=(50, 3)) * [5.0, 1.0, 0.1]
    path = write(tmp_path, {f"f{i}": values[:, i] for i in range(3)})

    out = run_stage(tmp_path, "--n-components", "0.5", input=path)

    table = read_components(out)
    assert len(table.column("explained_variance")[0].as_py()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n_components"] == 0.5


@pytest.mark.parametrize("n_components", [1.0, 1.5, -0.5, 0.0])
def test_fraction_outside_zero_one_is_refused(tmp_path, capsys, n_components):
    from pipeline.run import main
    from tests.helpers import write_config

    config = write_config(
        tmp_path, input="x", output_dir="y", n_components=n_components
    )

    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "fraction between 0 and 1" in err


def test_diagnostics_tell_rank_condition_zero_variance_and_ties(tmp_path):
    rng = np.random.default_rng(6)
    low_rank = rng.normal(size=(3, 4))
    low_rank[:, 3] = 2.0
    square = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    full = rng.normal(size=(30, 4)) * [3.0, 2.0, 1.0, 0.5]
    keys = ["low"] * 3 + ["tie"] * 4 + ["full"] * 30
    values = np.vstack(
        [low_rank, np.pad(square, ((0, 0), (0, 2))) + [0, 0, 5, 5], full]
    )
    path = write(tmp_path, dict({f"f{i}": values[:, i] for i in range(4)}, k=keys))

    out = run_stage(tmp_path, input=path, key="k", n_components=1)

    table = read_components(out).to_pandas().set_index("k")
    assert table.loc["low", "rank"] == np.linalg.matrix_rank(np.cov(low_rank.T))
    assert table.loc["low", "condition_number"] == np.inf
    assert list(table.loc["low", "zero_variance_features"]) == ["f3"]
    assert list(table.loc["tie", "zero_variance_features"]) == ["f2", "f3"]
    assert bool(table.loc["tie", "tied_at_cut"])
    assert not bool(table.loc["full", "tied_at_cut"])
    assert table.loc["full", "rank"] == 4
    expected = np.linalg.cond(np.cov(full, rowvar=False))
    np.testing.assert_allclose(
        table.loc["full", "condition_number"], expected, rtol=1e-9
    )
    assert (table["n_clipped_eigenvalues"] >= 0).all()
