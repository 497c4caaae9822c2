"""Fitted bases as a TensorFlow SavedModel that projects rows where they are served.

Nothing here knows of Beam. ``export_saved_model`` holds every group's mean
and kept axes as variables of a ``tf.Module`` and looks each row's key up in a
``tf.lookup.StaticHashTable``, so that a serving job computes the same
``pc = (x - mean[g]) @ components[g].T`` as the stage's ``projected/``
without reading the components dataset. The module also carries the feature
names, the key's name and the key's dtype, for a serving job to check that
its rows fit the model before it sends them.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import pca

# The one TensorFlow import, with its start-up notices quieted, is there.
from transforms.tensor_ops import tf

_LOGGER = logging.getLogger(__name__)

SIGNATURE = "serving_default"
_KEY_FORMS = "string, large_string, an integer type or bool"


def key_dtype(key: str, key_type: pa.DataType) -> tf.DType:
    """The TensorFlow dtype that serves keys of an Arrow type.

    Args:
        key: the key column's name, for messages.
        key_type: its Arrow type; a dictionary type counts as its values'.

    Returns:
        ``tf.string`` for string and large_string keys, ``tf.int64`` for
        integer and boolean keys.

    Raises:
        TypeError: any other type (decimal, floating, binary, temporal, ...).
    """
    if pa.types.is_dictionary(key_type):
        key_type = key_type.value_type
    if pa.types.is_string(key_type) or pa.types.is_large_string(key_type):
        return tf.string
    if pa.types.is_integer(key_type) or pa.types.is_boolean(key_type):
        return tf.int64
    msg = (
        f"key column {key!r} has type {key_type}; a SavedModel serves keys of "
        f"type {_KEY_FORMS}; cast the key to one of them before the stage runs"
    )
    raise TypeError(msg)


def _table_keys(key: str, keys: pa.Array, dtype: tf.DType) -> tf.Tensor:
    """The groups' keys as the hash table's keys, checked to be distinct."""
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    if keys.null_count:
        msg = f"key column {key!r} has a null key among the bases; expected none"
        raise ValueError(msg)
    if len(pc.unique(keys)) != len(keys):
        msg = f"key column {key!r} has a key twice among the bases; expected each once"
        raise ValueError(msg)

    if dtype == tf.string:
        values = np.array(keys.cast(pa.string()).to_pylist(), dtype=object)
        return tf.constant(values, tf.string, shape=[len(keys)])
    # A safe cast keeps every integer exact (no detour through float64) and
    # refuses a uint64 key that int64 cannot hold.
    try:
        values = pc.cast(keys, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        msg = (
            f"key column {key!r} of type {keys.type} holds a key above "
            f"{np.iinfo(np.int64).max}; expected keys that fit int64"
        )
        raise ValueError(msg) from exc
    return tf.constant(values.astype(np.int64), tf.int64, shape=[len(keys)])


class ProjectionModule(tf.Module):
    """Every group's basis, and the function that projects rows onto them.

    Attributes:
        feature_names: string, shape (n_features,), the feature columns in
            the order of the ``features`` input.
        key_name: string scalar, the key column; "" for the global group.
        key_dtype: string scalar, "string" or "int64"; "" for the global
            group, whose signature takes no key.
        whiten: bool scalar, whether ``projected`` is divided by
            sqrt(explained_variance).
        project: the ``tf.function`` that the serving signature calls.
    """

    def __init__(
        self,
        bases: pca.Bases,
        key: str | None,
        features: list[str],
        whiten: bool,
    ):
        super().__init__(name="projection")
        n_groups, n_components, n_features = bases.components.shape
        dtype = None if key is None else key_dtype(key, bases.keys.type)

        self.feature_names = tf.Variable(
            tf.constant(features, tf.string, shape=[n_features]), trainable=False
        )
        self.key_name = tf.Variable(key or "", trainable=False)
        self.key_dtype = tf.Variable(dtype.name if dtype else "", trainable=False)
        self.whiten = tf.Variable(whiten, trainable=False)

        # One row of zeros past the last group stands for an unknown key, so
        # that every lookup gathers a real row; it keeps no axes, so its pcs
        # come out NaN, and its reconstruction error is set to NaN.
        def padded(values: np.ndarray) -> tf.Variable:
            extra = np.zeros((1, *values.shape[1:]), values.dtype)
            return tf.Variable(np.concatenate([values, extra]), trainable=False)

        variance = np.asarray(bases.explained_variance, np.float64)
        if whiten:
            # A zero eigenvalue scales its axis to 0, not to infinity.
            root = np.sqrt(np.where(variance > 0, variance, 1.0))
            scale = np.where(variance > 0, 1.0 / root, 0.0)
        else:
            scale = np.ones_like(variance)
        self._mean = padded(np.asarray(bases.mean, np.float64))
        self._components = padded(np.asarray(bases.components, np.float64))
        self._scale = padded(scale)
        self._n_kept = padded(np.asarray(bases.n_kept, np.int64))
        self._n_groups = n_groups
        self._n_components = n_components

        features_spec = tf.TensorSpec([None, n_features], tf.float64, "features")
        if dtype is None:
            self.project = tf.function(
                self._project_global, input_signature=[features_spec]
            )
        else:
            # TensorFlow builds no table of no keys: with no group fitted,
            # every key is unknown and the lookup is left out.
            self._table = None
            if n_groups:
                self._table = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(
                        _table_keys(key, bases.keys, dtype),
                        tf.range(n_groups, dtype=tf.int64),
                    ),
                    default_value=-1,
                )
            self.project = tf.function(
                self._project_keyed,
                input_signature=[tf.TensorSpec([None], dtype, "key"), features_spec],
            )

    def _project_keyed(self, key, features):
        tf.debugging.assert_equal(
            tf.size(key, out_type=tf.int64),
            tf.shape(features, out_type=tf.int64)[0],
            message="key and features must hold the same number of rows",
        )
        if self._table is None:
            group = tf.fill(tf.shape(key, out_type=tf.int64), tf.constant(-1, tf.int64))
        else:
            group = self._table.lookup(key)
        return self._project(group, features)

    def _project_global(self, features):
        # With no group fitted, every row is an unknown key's.
        group = 0 if self._n_groups else -1
        n_rows = tf.shape(features, out_type=tf.int64)[0]
        return self._project(tf.fill([n_rows], tf.constant(group, tf.int64)), features)

    def _project(self, group, features):
        known = group >= 0
        row = tf.where(known, group, self._n_groups)
        centred = features - tf.gather(self._mean, row)
        axes = tf.gather(self._components, row)
        scores = tf.linalg.matvec(axes, centred)

        # Axes past n_kept are rows of 0, so the reconstruction uses only the
        # kept ones; the residual is formed before squaring, which keeps its
        # precision where |x - mean|^2 - |pc|^2 would cancel.
        residual = centred - tf.linalg.matvec(axes, scores, transpose_a=True)
        error = tf.reduce_sum(tf.square(residual), axis=1)

        nan = tf.constant(np.nan, tf.float64)
        kept = tf.gather(self._n_kept, row)
        beyond = tf.range(self._n_components, dtype=tf.int64)[None, :] >= kept[:, None]
        scaled = scores * tf.gather(self._scale, row)
        return {
            "projected": tf.where(beyond, nan, scaled),
            "reconstruction_error": tf.where(known, error, nan),
        }


def export_saved_model(
    bases: pca.Bases,
    key: str | None,
    features: list[str],
    path: str,
    whiten: bool = False,
) -> None:
    """Write the bases as a SavedModel whose serving signature projects rows.

    The signature ``serving_default`` takes a batch of rows:

    - ``key``: shape (n_rows,), tf.string for string keys, tf.int64 for
      integer and boolean keys; absent when ``key`` is None (one global
      group).
    - ``features``: float64, shape (n_rows, n_features), in the order of
      ``features``.

    and returns a dict:

    - ``projected``: float64, shape (n_rows, n_components),
      (x - mean[g]) @ components[g].T; NaN past the group's kept axes and in
      every column for a key that has no basis.
    - ``reconstruction_error``: float64, shape (n_rows,),
      |x - (mean[g] + pc @ components[g])|^2 over the kept axes (never
      whitened); NaN for a key that has no basis.

    Args:
        bases: the fitted groups (``pca.fit_bases`` or ``pca.table_to_bases``).
        key: the key column, or None for the global group.
        features: the feature names, n_features of them.
        path: the SavedModel's folder, local or any ``tf.io.gfile`` path
            (``gs://...``); files already there are overwritten.
        whiten: divide each pc by sqrt(explained_variance), as
            ``sklearn.decomposition.PCA(whiten=True)``; default False. An axis
            whose eigenvalue is 0 gives 0 (scikit-learn divides by machine
            epsilon there instead).

    Raises:
        TypeError: the key's Arrow type is none that a SavedModel serves.
        ValueError: ``features`` does not match the bases' n_features, keys
            are null, repeated or beyond int64, or ``key`` is None with more
            than one group.
    """
    n_features = bases.mean.shape[1]
    if len(features) != n_features:
        msg = (
            f"features names {len(features)} columns but the bases have "
            f"n_features={n_features}; expected one name per feature"
        )
        raise ValueError(msg)
    if key is None and bases.n_groups > 1:
        msg = (
            f"key=None serves one global group but the bases have "
            f"n_groups={bases.n_groups}; pass the key column they were fitted by"
        )
        raise ValueError(msg)

    module = ProjectionModule(bases, key, list(features), whiten)
    tf.saved_model.save(module, path, signatures={SIGNATURE: module.project})
    _LOGGER.info(
        "Wrote a SavedModel of %d groups, %d features and %d components to %s",
        bases.n_groups,
        n_features,
        bases.n_components,
        path,
    )
