"""The exported SavedModel against NumPy float64, computed in each test.

Every case fits bases with the stage's own ``pca`` functions, exports them,
loads the SavedModel back and calls its serving signature the way a serving
job would. The oracle projects each row in NumPy from the same bases.

Tolerance: both sides form (x - mean) and sum n_features float64 products
per pc, in different orders; they differ by a few ulps of the largest term,
so 1e-12 of the largest entry leaves room without hiding a wrong group or a
wrong axis (those are off by the scale of the data).
"""

import dataclasses
import json
import re
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import tensorflow as tf

from tests.helpers import (
    IRIS,
    IRIS_FEATURES,
    assert_close,
    read_projected,
    run_stage,
)
from transforms import export, pca
from transforms.inputs import read_dataset

FEATURES = ["f1", "f2", "f3", "f4"]
RTOL = 1e-12

# Spread of each group along its own rotated axes: "a" has one dominant axis,
# "b" two, "c" none, so that a fraction of variance keeps 1, 2 and 3-4 axes.
SCALES = {"a": [10.0, 1.0, 0.5, 0.2], "b": [3.0, 2.0, 1.0, 0.5], "c": [1.0] * 4}


def grouped_rows(
    rng: np.random.Generator, keys: list, scales: list[list[float]], n_rows: int = 150
) -> tuple[list, np.ndarray]:
    """Rows of several groups, each with its own mean, axes and spread."""
    all_keys, all_values = [], []
    for key, spread in zip(keys, scales, strict=True):
        rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        # Offsets far from 0, so that a projection without centring is wrong.
        offset = rng.uniform(-100, 100, size=4)
        values = rng.normal(size=(n_rows, 4)) * spread @ rotation + offset
        all_keys += [key] * n_rows
        all_values.append(values)
    order = rng.permutation(len(all_keys))
    return [all_keys[i] for i in order], np.concatenate(all_values)[order]


def fit(keys: pa.Array, values: np.ndarray, n_components: int | float) -> pca.Bases:
    moments = pca.batch_moments(keys, values, "float64", 64, 16)
    bases, _ = pca.fit_bases(moments, ddof=1, n_components=n_components)
    return bases


def load(path) -> tuple[tf.Module, tf.types.experimental.ConcreteFunction]:
    loaded = tf.saved_model.load(str(path))
    return loaded, loaded.signatures[export.SIGNATURE]


def call(signature, keys, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(projected, reconstruction_error) of a batch; no key when keys is None."""
    inputs = {"features": tf.constant(values, tf.float64)}
    if keys is not None:
        inputs["key"] = tf.constant(keys)
    outputs = signature(**inputs)
    return outputs["projected"].numpy(), outputs["reconstruction_error"].numpy()


def expected(
    bases: pca.Bases, keys: list, values: np.ndarray, whiten: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy, row by row: the row's group by key, NaN for an unknown key."""
    index = {key: i for i, key in enumerate(bases.keys.to_pylist())}
    projected = np.full((len(values), bases.n_components), np.nan)
    error = np.full(len(values), np.nan)
    for row, (key, x) in enumerate(zip(keys, values, strict=True)):
        if key not in index:
            continue
        g = index[key]
        kept = bases.n_kept[g]
        axes = bases.components[g, :kept]
        scores = (x - bases.mean[g]) @ axes.T
        error[row] = np.sum((x - (bases.mean[g] + scores @ axes)) ** 2)
        if whiten:
            variance = bases.explained_variance[g, :kept]
            with np.errstate(divide="ignore", invalid="ignore"):
                scores = np.where(variance > 0, scores / np.sqrt(variance), 0.0)
        projected[row, :kept] = scores
    return projected, error


@pytest.fixture(scope="module")
def string_model(tmp_path_factory):
    """Bases of three string-keyed groups, exported and loaded back."""
    rng = np.random.default_rng(0)
    keys, values = grouped_rows(rng, list(SCALES), list(SCALES.values()))
    bases = fit(pa.array(keys), values, n_components=2)
    path = tmp_path_factory.mktemp("string") / "saved_model"
    export.export_saved_model(bases, "species", FEATURES, str(path))
    loaded, signature = load(path)
    return bases, keys, values, loaded, signature


def test_signature_takes_key_and_features_and_returns_both_outputs(string_model):
    _, _, _, _, signature = string_model

    _, inputs = signature.structured_input_signature

    assert inputs == {
        "key": tf.TensorSpec([None], tf.string, "key"),
        "features": tf.TensorSpec([None, 4], tf.float64, "features"),
    }
    outputs = signature.structured_outputs
    assert set(outputs) == {"projected", "reconstruction_error"}
    assert outputs["projected"].dtype == tf.float64
    assert outputs["projected"].shape.as_list() == [None, 2]
    assert outputs["reconstruction_error"].shape.as_list() == [None]


def test_module_carries_feature_names_key_name_and_key_dtype(string_model):
    _, _, _, loaded, _ = string_model

    assert [name.decode() for name in loaded.feature_names.numpy()] == FEATURES
    assert loaded.key_name.numpy() == b"species"
    assert loaded.key_dtype.numpy() == b"string"
    assert not loaded.whiten.numpy()


def test_projection_matches_numpy_per_group(string_model):
    bases, keys, values, _, signature = string_model

    projected, error = call(signature, keys, values)

    want_projected, want_error = expected(bases, keys, values)
    assert not np.isnan(projected).any()
    assert_close(projected, want_projected, RTOL)
    assert_close(error, want_error, RTOL)


def test_unknown_key_gives_nan_and_leaves_other_rows_alone(string_model):
    bases, keys, values, _, signature = string_model
    batch_keys = ["a", "unseen", "c", "", "b"]
    batch = values[:5]

    projected, error = call(signature, batch_keys, batch)

    assert np.isnan(projected[[1, 3]]).all()
    assert np.isnan(error[[1, 3]]).all()
    want_projected, want_error = expected(bases, batch_keys, batch)
    assert_close(projected, want_projected, RTOL)
    assert_close(error, want_error, RTOL)


def test_key_and_features_of_different_lengths_fail(string_model):
    _, _, values, _, signature = string_model

    with pytest.raises(tf.errors.InvalidArgumentError, match="same number of rows"):
        call(signature, ["a"], values[:3])


def test_writes_to_a_tf_io_gfile_path(string_model, tmp_path):
    # TensorFlow's in-memory filesystem stands for gs:// and the like: the
    # path goes to tf.io.gfile as it is, never to the local disk.
    bases, keys, values, _, _ = string_model
    path = f"ram://{tmp_path.name}/saved_model"
    export.export_saved_model(bases, "species", FEATURES, path)
    _, signature = load(path)

    projected, _ = call(signature, keys[:10], values[:10])

    assert tf.io.gfile.exists(f"{path}/saved_model.pb")
    want_projected, _ = expected(bases, keys[:10], values[:10])
    assert_close(projected, want_projected, RTOL)


def test_fractional_n_components_gives_nan_past_each_groups_kept_axes(tmp_path):
    rng = np.random.default_rng(1)
    keys, values = grouped_rows(rng, list(SCALES), list(SCALES.values()))
    bases = fit(pa.array(keys, pa.large_string()), values, n_components=0.8)
    assert len(set(bases.n_kept.tolist())) > 1, "the groups should keep ragged axes"
    export.export_saved_model(bases, "k", FEATURES, str(tmp_path))
    _, signature = load(tmp_path)

    projected, error = call(signature, keys, values)

    want_projected, want_error = expected(bases, keys, values)
    group = pca.lookup_groups(bases, pa.array(keys, pa.large_string()))
    beyond = np.arange(bases.n_components)[None, :] >= bases.n_kept[group][:, None]
    np.testing.assert_array_equal(np.isnan(projected), beyond)
    assert_close(projected, want_projected, RTOL)
    assert_close(error, want_error, RTOL)


def test_int64_keys_above_2_to_the_53_stay_distinct(tmp_path):
    # 2**53 + 1 rounds to 2**53 as a float64: a detour through floats would
    # merge the first two groups.
    big = [2**53, 2**53 + 1, 2**63 - 1]
    rng = np.random.default_rng(2)
    keys, values = grouped_rows(rng, big, list(SCALES.values()))
    bases = fit(pa.array(keys, pa.int64()), values, n_components=2)
    assert bases.keys.to_pylist() == big
    export.export_saved_model(bases, "id", FEATURES, str(tmp_path))
    loaded, signature = load(tmp_path)

    projected, error = call(signature, np.array(keys, np.int64), values)

    assert loaded.key_dtype.numpy() == b"int64"
    want_projected, want_error = expected(bases, keys, values)
    assert_close(projected, want_projected, RTOL)
    assert_close(error, want_error, RTOL)


def test_whiten_gives_unit_variance_and_zero_for_a_zero_eigenvalue(tmp_path):
    rng = np.random.default_rng(3)
    keys, values = grouped_rows(rng, ["a", "b"], [SCALES["a"], SCALES["b"]])
    # A constant feature in group "b" gives it an eigenvalue of exactly 0.
    in_b = np.array(keys) == "b"
    values[in_b, 3] = 7.0
    bases = fit(pa.array(keys), values, n_components=4)
    assert bases.explained_variance[1, 3] == 0
    export.export_saved_model(bases, "k", FEATURES, str(tmp_path), whiten=True)
    loaded, signature = load(tmp_path)

    projected, error = call(signature, keys, values)

    assert loaded.whiten.numpy()
    want_projected, want_error = expected(bases, keys, values, whiten=True)
    assert_close(projected, want_projected, RTOL)
    # Whitening scales the pcs only; the reconstruction uses the plain ones.
    # With every axis kept the error is round-off (about 1e-30), so it is
    # judged against |x - mean|^2, the size of the terms it is formed from.
    group = pca.lookup_groups(bases, pa.array(keys))
    scale = np.max(np.sum((values - bases.mean[group]) ** 2, axis=1))
    np.testing.assert_allclose(error, want_error, rtol=0, atol=RTOL * scale)
    # The training rows' whitened pcs have unit sample variance (ddof=1).
    variance = np.var(projected[~in_b], axis=0, ddof=1)
    np.testing.assert_allclose(variance, 1.0, rtol=1e-10)
    off_plane = values[in_b][:1].copy()
    off_plane[0, 3] = 9.0
    scores, _ = call(signature, ["b"], off_plane)
    assert scores[0, 3] == 0.0


def test_global_group_signature_takes_features_only(tmp_path):
    rng = np.random.default_rng(4)
    _, values = grouped_rows(rng, ["all"], [SCALES["b"]])
    # The stage keys the global group by a column of int8 zeros.
    keys = np.zeros(len(values), np.int8)
    bases = fit(pa.array(keys), values, n_components=3)
    export.export_saved_model(bases, None, FEATURES, str(tmp_path))
    loaded, signature = load(tmp_path)

    projected, error = call(signature, None, values)

    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["features"]
    assert loaded.key_name.numpy() == b""
    assert loaded.key_dtype.numpy() == b""
    want_projected, want_error = expected(bases, keys.tolist(), values)
    assert_close(projected, want_projected, RTOL)
    assert_close(error, want_error, RTOL)


def test_no_fitted_group_gives_nan_for_every_row(tmp_path):
    bases = pca.empty_bases(pa.string(), n_features=4, n_components=2)
    export.export_saved_model(bases, "k", FEATURES, str(tmp_path))
    _, signature = load(tmp_path)

    projected, error = call(signature, ["a", "b"], np.ones((2, 4)))

    assert projected.shape == (2, 2)
    assert np.isnan(projected).all()
    assert np.isnan(error).all()


@pytest.mark.parametrize(
    ("key_type", "dtype"),
    [
        (pa.string(), tf.string),
        (pa.large_string(), tf.string),
        (pa.dictionary(pa.int32(), pa.string()), tf.string),
        (pa.int8(), tf.int64),
        (pa.uint32(), tf.int64),
        (pa.int64(), tf.int64),
        (pa.bool_(), tf.int64),
    ],
)
def test_key_dtype_follows_the_arrow_type(key_type, dtype):
    assert export.key_dtype("k", key_type) == dtype


@pytest.mark.parametrize(
    "key_type",
    [pa.decimal128(5, 2), pa.float64(), pa.binary(), pa.date32(), pa.timestamp("s")],
)
def test_other_key_types_raise_type_error_naming_the_type(key_type):
    pattern = re.escape(f"type {key_type}; ") + ".*string, large_string"
    with pytest.raises(TypeError, match=pattern):
        export.key_dtype("k", key_type)


def test_decimal_keys_are_refused_before_anything_is_written(tmp_path):
    bases = fit(pa.array(["a"] * 5 + ["b"] * 5), np.eye(10, 4), n_components=2)
    decimals = pa.array([Decimal("1.50"), Decimal("2.25")], pa.decimal128(5, 2))
    bases = dataclasses.replace(bases, keys=decimals)

    with pytest.raises(TypeError, match="decimal128"):
        export.export_saved_model(bases, "k", FEATURES, str(tmp_path / "model"))

    assert not (tmp_path / "model").exists()


def test_uint64_key_beyond_int64_raises_value_error(tmp_path):
    bases = fit(pa.array(["a"] * 5 + ["b"] * 5), np.eye(10, 4), n_components=2)
    bases = dataclasses.replace(bases, keys=pa.array([1, 2**64 - 1], pa.uint64()))

    with pytest.raises(ValueError, match="fit int64"):
        export.export_saved_model(bases, "k", FEATURES, str(tmp_path))


def test_feature_names_must_match_n_features(tmp_path):
    bases = pca.empty_bases(pa.string(), n_features=4, n_components=2)

    with pytest.raises(ValueError, match="n_features=4"):
        export.export_saved_model(bases, "k", FEATURES[:3], str(tmp_path))


def test_global_key_with_many_groups_raises_value_error(tmp_path):
    bases = fit(pa.array(["a"] * 5 + ["b"] * 5), np.eye(10, 4), n_components=2)

    with pytest.raises(ValueError, match="n_groups=2"):
        export.export_saved_model(bases, None, FEATURES, str(tmp_path))


def test_iris_saved_model_matches_the_stage_projected_output(tmp_path, iris):
    out = run_stage(
        tmp_path,
        input=str(IRIS),
        key="species",
        features=IRIS_FEATURES,
        passthrough=["row_id"],
        n_components=2,
    )
    table = read_dataset(str(out / "components"))
    features = json.loads(table.schema.metadata[b"features"])
    bases = pca.table_to_bases(table, "species", len(features))
    export.export_saved_model(bases, "species", features, str(tmp_path / "model"))
    loaded, signature = load(tmp_path / "model")

    # The stage's rows, with their features looked up in the input by row_id.
    stage = read_projected(out).sort_by("row_id")
    rows = pc.index_in(stage.column("row_id"), value_set=iris.column("row_id"))
    source = iris.take(rows)
    values = np.column_stack([source.column(name).to_numpy() for name in features])
    keys = stage.column("species").to_pylist()
    projected, error = call(signature, keys, values)

    assert features == IRIS_FEATURES
    assert [name.decode() for name in loaded.feature_names.numpy()] == features
    from_stage = np.column_stack(
        [stage.column(f"pc_{i + 1}").to_numpy(zero_copy_only=False) for i in range(2)]
    )
    assert_close(projected, from_stage, RTOL)
    _, want_error = expected(bases, keys, values)
    assert_close(error, want_error, RTOL)
