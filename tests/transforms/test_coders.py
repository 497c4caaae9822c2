"""The coder of tables, moments and bases: exact round trips, cheap sizes."""

import numpy as np
import pyarrow as pa
import pytest

from transforms import blocks, coders, pca


def _moments():
    rng = np.random.default_rng(2)
    return blocks.Moments(
        keys=pa.array(["a", "b"]),
        n_rows=np.array([3, 4]),
        weight=np.array([3.0, 4.0]),
        weight_sq=np.array([3.0, 4.0]),
        shift=rng.normal(size=(2, 3)),
        mean=rng.normal(size=(2, 3)),
        comoment=rng.normal(size=(2, 3, 3)),
    )


def test_table_round_trip_and_size_from_buffers():
    table = pa.table({"key": [1, 2, 3], "x": [0.5, None, 2.0]})
    coder = coders.BatchCoder()

    restored = coder.decode(coder.encode(table))

    assert restored.equals(table)
    assert coder.estimate_size(table) == table.nbytes


def test_moments_round_trip_and_size_from_buffers():
    moments = _moments()
    coder = coders.BatchCoder()

    restored = coder.decode(coder.encode(moments))

    assert restored.keys.equals(moments.keys)
    for name, array in moments.arrays().items():
        np.testing.assert_array_equal(getattr(restored, name), array)
    expected = moments.keys.nbytes + sum(a.nbytes for a in moments.arrays().values())
    assert coder.estimate_size(moments) == expected


def test_bases_size_counts_every_array():
    bases, _ = pca.fit_bases(_moments(), ddof=1, n_components=2)
    arrays = [getattr(bases, name) for name in vars(bases)]
    expected = sum(
        a.nbytes for a in arrays if isinstance(a, (np.ndarray, pa.Array))
    ) + 8 * sum(not isinstance(a, (np.ndarray, pa.Array)) for a in arrays)

    assert coders.BatchCoder().estimate_size(bases) == expected


@pytest.mark.parametrize("data_type", [pa.Table, blocks.Moments, pca.Bases])
def test_registered_for_the_bulk_types(data_type):
    # Registered where the Beam transforms are defined.
    import apache_beam as beam

    import transforms.stats  # noqa: F401

    assert isinstance(beam.coders.registry.get_coder(data_type), coders.BatchCoder)
