"""Fit once and apply later; whitening and reconstruction, against references."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import main
from tests.helpers import (
    IRIS,
    IRIS_FEATURES,
    assert_close,
    oracle,
    read_components,
    read_projected,
    run_stage,
    write_config,
)

IRIS_CONFIG = {
    "key": "species",
    "features": IRIS_FEATURES,
    "passthrough": ["row_id"],
    "n_components": 2,
}


@pytest.fixture(scope="module")
def halves(tmp_path_factory, iris):
    """Iris split in two by row_id parity, written as two files."""
    folder = tmp_path_factory.mktemp("halves")
    even = pa.compute.equal(pa.compute.bit_wise_and(iris["row_id"], 1), 0)
    fit_half = iris.filter(even)
    new_half = iris.filter(pa.compute.invert(even))
    pq.write_table(fit_half, folder / "fit.parquet")
    pq.write_table(new_half, folder / "new.parquet")
    return folder, fit_half.to_pandas(), new_half.to_pandas()


def test_fit_on_one_half_transform_the_other(tmp_path, halves):
    folder, fit_half, new_half = halves

    fitted = run_stage(
        tmp_path / "fit", input=str(folder / "fit.parquet"), mode="fit", **IRIS_CONFIG
    )
    applied = run_stage(
        tmp_path / "apply",
        input=str(folder / "new.parquet"),
        mode="transform",
        components=str(fitted),
        **IRIS_CONFIG,
    )

    assert sorted(p.name for p in fitted.iterdir()) == ["components", "summary.json"]
    assert sorted(p.name for p in applied.iterdir()) == ["projected", "summary.json"]
    projected = read_projected(applied).to_pandas().set_index("row_id")
    for species, rows in new_half.groupby("species"):
        basis = oracle(fit_half[fit_half.species == species][IRIS_FEATURES].to_numpy())
        x = rows[IRIS_FEATURES].to_numpy()
        want = (x - basis["mean"]) @ basis["components"][:2].T
        got = projected.loc[rows["row_id"], ["pc_1", "pc_2"]].to_numpy()
        assert_close(got, want, rtol=1e-9)
    summary = json.loads((applied / "summary.json").read_text())
    assert summary["rows_read"] == 75 and summary["rows_projected"] == 75
    assert summary["rows_fitted"] == 0


def test_transform_counts_rows_of_groups_it_has_no_basis_for(tmp_path, halves):
    folder, fit_half, _ = halves
    setosa = pa.Table.from_pandas(
        fit_half[fit_half.species == "setosa"], preserve_index=False
    )
    pq.write_table(setosa, tmp_path / "setosa.parquet")
    fitted = run_stage(
        tmp_path / "fit",
        input=str(tmp_path / "setosa.parquet"),
        mode="fit",
        **IRIS_CONFIG,
    )

    applied = run_stage(
        tmp_path / "apply",
        input=str(IRIS),
        mode="transform",
        components=str(fitted / "components"),
        **IRIS_CONFIG,
    )

    summary = json.loads((applied / "summary.json").read_text())
    assert summary["rows_left_out"] == {"unknown_group": 100}
    assert summary["rows_read"] == 150 and summary["rows_projected"] == 50
    assert set(read_projected(applied).column("species").to_pylist()) == {"setosa"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"features": IRIS_FEATURES[::-1]}, "features="),
        ({"ddof": 0}, "ddof="),
        ({"key": None, "passthrough": ["row_id", "species"]}, "key="),
    ],
)
def test_transform_with_mismatched_bases_is_a_clear_error(
    tmp_path, capsys, halves, change, fragment
):
    folder, _, _ = halves
    fitted = run_stage(
        tmp_path / "fit", input=str(folder / "fit.parquet"), mode="fit", **IRIS_CONFIG
    )
    settings = dict(IRIS_CONFIG, **change)
    config = write_config(
        tmp_path / "apply",
        input=str(IRIS),
        mode="transform",
        components=str(fitted),
        output_dir=str(tmp_path / "o"),
        **settings,
    )

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert fragment in err[0] and "fit again" in err[0]
    assert not (tmp_path / "o").exists()


def test_transform_without_components_is_refused(tmp_path, capsys):
    config = write_config(
        tmp_path, input=str(IRIS), output_dir=str(tmp_path / "o"), mode="transform"
    )

    assert main(["--config", str(config)]) == 2
    assert "needs components" in capsys.readouterr().err


def test_whiten_matches_scikit_learn_per_group(tmp_path, iris):
    from sklearn.decomposition import PCA

    out = run_stage(tmp_path, input=str(IRIS), whiten=True, **IRIS_CONFIG)

    projected = read_projected(out).to_pandas()
    frame = iris.to_pandas()
    for _, rows in frame.groupby("species"):
        model = PCA(n_components=2, whiten=True, svd_solver="full")
        want = model.fit_transform(rows[IRIS_FEATURES].to_numpy())
        got = projected.set_index("row_id").loc[rows["row_id"], ["pc_1", "pc_2"]]
        # scikit-learn's SVD signs differ from the stage's rule: compare up to
        # the sign of each axis.
        got = got.to_numpy()
        signs = np.sign((got * want).sum(axis=0))
        assert_close(got, want * signs, rtol=1e-9)


def test_whitening_an_axis_without_variance_gives_zero(tmp_path):
    values = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0], [7.0, 5.0]])
    pq.write_table(
        pa.table({"a": values[:, 0], "b": values[:, 1]}), tmp_path / "in.parquet"
    )

    out = run_stage(tmp_path, input=str(tmp_path / "in.parquet"), whiten=True)

    projected = read_projected(out)
    np.testing.assert_array_equal(projected.column("pc_2").to_numpy(), 0.0)
    assert np.isfinite(projected.column("pc_1").to_numpy()).all()


def test_reconstruction_and_its_error_match_numpy(tmp_path, iris):
    out = run_stage(
        tmp_path,
        input=str(IRIS),
        reconstruction_error=True,
        reconstruct=True,
        n_components=1,
        **{k: v for k, v in IRIS_CONFIG.items() if k != "n_components"},
    )

    projected = read_projected(out).to_pandas().set_index("row_id")
    frame = iris.to_pandas()
    rebuilt_columns = [f"{name}_reconstructed" for name in IRIS_FEATURES]
    for _, rows in frame.groupby("species"):
        x = rows[IRIS_FEATURES].to_numpy()
        basis = oracle(x)
        axes = basis["components"][:1]
        rebuilt = basis["mean"] + ((x - basis["mean"]) @ axes.T) @ axes
        got = projected.loc[rows["row_id"]]
        assert_close(got[rebuilt_columns].to_numpy(), rebuilt, rtol=1e-9)
        error = np.square(x - rebuilt).sum(axis=1)
        assert_close(got["reconstruction_error"].to_numpy(), error, rtol=1e-9)
    assert read_components(out).num_rows == 3


def test_export_writes_a_saved_model_that_matches_projected(tmp_path, iris):
    import tensorflow as tf

    out = run_stage(tmp_path, input=str(IRIS), export=True, **IRIS_CONFIG)

    assert sorted(p.name for p in out.iterdir()) == [
        "components",
        "projected",
        "saved_model",
        "summary.json",
    ]
    model = tf.saved_model.load(str(out / "saved_model"))
    serve = model.signatures["serving_default"]
    frame = iris.to_pandas()
    result = serve(
        key=tf.constant(frame["species"].tolist() + ["unknown"]),
        features=tf.constant(
            np.vstack([frame[IRIS_FEATURES].to_numpy(), np.zeros((1, 4))])
        ),
    )
    projected = read_projected(out).to_pandas().set_index("row_id")
    want = projected.loc[frame["row_id"], ["pc_1", "pc_2"]].to_numpy()
    got = result["projected"].numpy()
    # The same float64 math in the same order: 1e-12.
    assert_close(got[:-1], want, rtol=1e-12)
    assert np.isnan(got[-1]).all()


def test_weighted_covariance_matches_numpy_aweights(tmp_path):
    rng = np.random.default_rng(7)
    values = rng.normal(size=(300, 3)) * [1.0, 4.0, 0.5] + 1e3
    weights = rng.random(300) * 5
    weights[:10] = 0.0
    keys = np.where(np.arange(300) % 3 == 0, "a", "b")
    columns = {f"f{i}": values[:, i] for i in range(3)}
    pq.write_table(
        pa.table(dict(columns, k=keys, w=weights, row_id=np.arange(300))),
        tmp_path / "in.parquet",
        row_group_size=37,
    )

    out = run_stage(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        key="k",
        weight="w",
        passthrough=["row_id"],
        n_components=2,
        block_rows=16,
    )

    table = read_components(out).to_pandas().set_index("k")
    for key in ("a", "b"):
        rows = (keys == key) & (weights > 0)
        expected = np.cov(values[rows], rowvar=False, aweights=weights[rows])
        mean = np.average(values[rows], axis=0, weights=weights[rows])
        assert table.loc[key, "n_rows"] == rows.sum()
        assert_close(np.array(table.loc[key, "covariance"].tolist()), expected, 1e-9)
        assert_close(np.array(table.loc[key, "mean"].tolist()), mean, 1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_left_out"] == {"zero_weight": 10}
    assert summary["rows_projected"] == 290


def test_negative_weight_is_a_one_line_error(tmp_path, capsys):
    table = pa.table(
        {"x": [1.0, 2.0, 3.0], "y": [1.0, 0.0, 2.0], "w": [1.0, -2.0, 1.0]}
    )
    pq.write_table(table, tmp_path / "in.parquet")
    config = write_config(
        tmp_path,
        input=str(tmp_path / "in.parquet"),
        weight="w",
        output_dir=str(tmp_path / "o"),
        n_components=1,
    )

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "weight column 'w'" in err[0] and "-2.0" in err[0]


def test_standardize_takes_the_axes_of_the_correlation(tmp_path, iris):
    out = run_stage(tmp_path, input=str(IRIS), standardize=True, **IRIS_CONFIG)

    table = read_components(out).to_pandas().set_index("species")
    projected = read_projected(out).to_pandas().set_index("row_id")
    frame = iris.to_pandas()
    for species, rows in frame.groupby("species"):
        x = rows[IRIS_FEATURES].to_numpy()
        z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
        expected = oracle(z)
        assert_close(
            np.array(table.loc[species, "components"].tolist()),
            expected["components"][:2],
            rtol=1e-9,
        )
        assert_close(
            np.array(table.loc[species, "explained_variance"].tolist()),
            expected["explained_variance"][:2],
            rtol=1e-9,
        )
        want = z @ expected["components"][:2].T
        got = projected.loc[rows["row_id"], ["pc_1", "pc_2"]].to_numpy()
        assert_close(got, want, rtol=1e-9)


def test_transform_takes_the_fits_features_when_none_are_given(tmp_path, halves):
    folder, _, _ = halves
    fitted = run_stage(
        tmp_path / "fit", input=str(folder / "fit.parquet"), mode="fit", **IRIS_CONFIG
    )
    settings = {k: v for k, v in IRIS_CONFIG.items() if k != "features"}

    applied = run_stage(
        tmp_path / "apply",
        input=str(folder / "new.parquet"),
        mode="transform",
        components=str(fitted),
        **settings,
    )

    assert read_projected(applied).num_rows == 75
