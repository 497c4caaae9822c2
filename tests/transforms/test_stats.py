"""The moments combiner's contract and the shard hash, on Beam's real runner."""

import os
import pickle
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that

from tests.helpers import ROOT
from transforms import pca
from transforms.stats import MomentsCombineFn, shard_index


def batch(keys: list, values: np.ndarray):
    return pca.batch_moments(pa.array(keys), values, "float64", 64, 16)


def by_key(moments) -> dict:
    return {
        key: (moments.n_rows[i], moments.full_mean[i], moments.comoment[i])
        for i, key in enumerate(moments.keys.to_pylist())
    }


def numpy_moments(keys, values) -> dict:
    keys = np.array(keys)
    out = {}
    for key in np.unique(keys):
        rows = values[keys == key]
        centred = rows - rows.mean(axis=0)
        out[key.item()] = (len(rows), rows.mean(axis=0), centred.T @ centred)
    return out


def assert_same_moments(result: dict, expected: dict, atol: float = 1e-9) -> None:
    assert set(result) == set(expected)
    for key, (n, mean, comoment) in expected.items():
        assert result[key][0] == n
        np.testing.assert_allclose(result[key][1], mean, rtol=1e-12)
        np.testing.assert_allclose(result[key][2], comoment, rtol=1e-10, atol=atol)


@pytest.fixture()
def data():
    rng = np.random.default_rng(7)
    values = rng.normal(size=(1000, 3)) * [1, 10, 100]
    keys = rng.integers(0, 6, size=1000).tolist()
    return keys, values


def test_combiner_survives_pickling(data):
    keys, values = data
    combine = pickle.loads(pickle.dumps(MomentsCombineFn(pa.int64(), 3)))
    accumulator = combine.add_input(combine.create_accumulator(), batch(keys, values))

    restored = pickle.loads(pickle.dumps(accumulator))

    result = by_key(combine.extract_output(restored))
    assert_same_moments(result, numpy_moments(keys, values))


def test_split_then_merge_equals_one_pass(data):
    keys, values = data
    combine = MomentsCombineFn(pa.int64(), 3, fold_every=3)
    accumulators = []
    for start in range(0, 1000, 125):
        accumulator = combine.create_accumulator()
        for a in range(start, start + 125, 25):
            accumulator = combine.add_input(
                accumulator, batch(keys[a : a + 25], values[a : a + 25])
            )
        accumulators.append(combine.compact(accumulator))

    merged = combine.merge_accumulators(accumulators)

    result = by_key(combine.extract_output(merged))
    assert_same_moments(result, numpy_moments(keys, values))


def test_empty_input_gives_empty_moments():
    combine = MomentsCombineFn(pa.string(), 4)

    result = combine.extract_output(combine.create_accumulator())

    assert result.n_groups == 0
    assert result.keys.type == pa.string()
    assert result.comoment.shape == (0, 4, 4)


def test_large_offsets_survive_the_merge():
    rng = np.random.default_rng(8)
    values = rng.normal(size=(10_000, 2)) + 1e9
    keys = [0] * 10_000
    combine = MomentsCombineFn(pa.int64(), 2)
    accumulator = combine.create_accumulator()
    for a in range(0, 10_000, 999):
        accumulator = combine.add_input(
            accumulator, batch(keys[a : a + 999], values[a : a + 999])
        )

    result = combine.extract_output(accumulator)

    covariance = result.comoment[0] / (result.n_rows[0] - 1)
    # 1e-6 relative is the stage's promise at a mean of 1e9 in float64.
    np.testing.assert_allclose(covariance, np.cov(values, rowvar=False), atol=1e-6)


def test_combiner_runs_in_combine_per_key_on_beam(data):
    keys, values = data
    elements = [
        (a % 3, batch(keys[a : a + 100], values[a : a + 100]))
        for a in range(0, 1000, 100)
    ]
    expected = numpy_moments(keys, values)

    def check(outputs):
        parts = [moments for _, moments in outputs]
        from transforms.blocks import merge_moments

        assert_same_moments(by_key(merge_moments(parts)), expected)

    with beam.Pipeline(runner=FnApiRunner()) as p:
        merged = (
            p
            | beam.Create(elements, reshuffle=False)
            | beam.CombinePerKey(MomentsCombineFn(pa.int64(), 3))
        )
        assert_that(merged, check)


@pytest.mark.parametrize(
    "keys",
    [
        pa.array(["setosa", "versicolor", "", "ü", "a" * 300]),
        pa.array([0, -1, 2**62, 2**53 + 1], pa.int64()),
        pa.array([0.5, -0.0, 1e300]),
        pa.array([True, False]),
    ],
)
def test_shard_of_a_key_is_within_range(keys):
    shards = shard_index(keys, 7)

    assert shards.shape == (len(keys),)
    assert ((shards >= 0) & (shards < 7)).all()


def test_shard_of_a_key_is_the_same_in_another_process():
    keys = [f"group-{i}" for i in range(50)]
    here = shard_index(pa.array(keys), 8).tolist()
    script = (
        "import pyarrow as pa; from transforms.stats import shard_index; "
        f"print(shard_index(pa.array({keys!r}), 8).tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")

    there = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert eval(there) == here
    assert len(set(here)) > 1
