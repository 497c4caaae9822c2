"""The smoke benchmark end to end: every run finishes and every run is right.

Runs ``python -m benchmarks.run --smoke`` into a temporary folder (about a
minute and a half on two cores: the stage runs twice, once with two worker
processes, and each start imports TensorFlow), then checks the results file
and compares the components and projections of every run with a NumPy
float64 oracle computed here from the same generated input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("stage", "stage_mp2", "numpy", "pandas", "beam")
PROJECTING = ("stage", "stage_mp2", "numpy", "pandas")
N_COMPONENTS = 2

# float64 paths that differ only in summation order: the error of a
# covariance entry is a few ulps of the largest entry (about 1e-15 relative),
# and of a unit eigenvector about eps * |covariance| / eigengap, which for
# the smoke input (4 features whose variances differ by 30 % or more from
# one to the next, 500 rows a group) stays near 1e-14. 1e-9 leaves room for
# all of that and lies orders of magnitude below the error of a wrong
# divisor, a missing centring or a swapped axis.
RTOL = 1e-9


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_list(array.type):
        flat = pc.list_flatten(array)
        shape.append(len(flat) // len(array))
        array = flat
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def _oracle(input_path: str, n_features: int) -> dict:
    """Per-group np.cov (ddof=1) and eigh of the input, sorted by key."""
    features = [f"f{j}" for j in range(n_features)]
    table = pq.read_table(input_path)
    keys = table.column("key").to_numpy()
    values = np.column_stack([table.column(name).to_numpy() for name in features])
    row_id = table.column("row_id").to_numpy()
    result = {"key": [], "n_rows": [], "mean": [], "covariance": [], "components": []}
    projected = {}
    for key in np.unique(keys):
        rows = keys == key
        if rows.sum() < 2:
            continue
        x = values[rows]
        covariance = np.cov(x, rowvar=False, ddof=1)
        _, vectors = np.linalg.eigh(covariance)
        components = vectors[:, ::-1][:, :N_COMPONENTS].T
        result["key"].append(key)
        result["n_rows"].append(len(x))
        result["mean"].append(x.mean(axis=0))
        result["covariance"].append(covariance)
        result["components"].append(components)
        scores = (x - x.mean(axis=0)) @ components.T
        projected.update(zip(row_id[rows], scores, strict=True))
    oracle = {name: np.array(value) for name, value in result.items()}
    oracle["projected"] = projected
    return oracle


def _components(output_dir: str) -> dict:
    table = pq.read_table(os.path.join(output_dir, "components")).sort_by("key")
    return {
        "key": table.column("key").to_numpy(),
        "n_rows": table.column("n_rows").to_numpy(),
        "covariance": _to_numpy(table.column("covariance")),
        "components": _to_numpy(table.column("components")),
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--work-dir",
            str(work),
            "--results-dir",
            str(work / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = work / "results" / "smoke.json"
    assert path.exists(), done.stdout[-3000:]
    report = json.loads(path.read_text())
    oracle = _oracle(report["input"]["path"], report["params"]["features"])
    return report, oracle


def test_every_run_reports_positive_time_and_memory(smoke):
    report, _ = smoke
    assert report["cpu_count"] == os.cpu_count()
    assert set(report["versions"]) >= {"python", "numpy", "pyarrow", "tensorflow"}
    assert set(report["runs"]) == set(RUNS)
    for name, run in report["runs"].items():
        assert run["ok"], name
        assert run["wall_s_median"] > 0, name
        assert run["inner_s_median"] > 0, name
        assert run["maxrss_mb"] > 0, name
        assert run["tree_rss_mb"] >= run["maxrss_mb"], name


def _assert_same_bases(result: dict, expected: dict) -> None:
    """Same keys, covariances to RTOL of each group's scale, components to
    RTOL up to sign."""
    np.testing.assert_array_equal(result["key"], expected["key"])
    scale = np.abs(expected["covariance"]).max(axis=(1, 2), keepdims=True)
    np.testing.assert_array_less(
        np.abs(result["covariance"] - expected["covariance"]) / scale, RTOL
    )
    # An eigenvector is defined up to its sign.
    sign = np.sign((result["components"] * expected["components"]).sum(axis=-1))
    np.testing.assert_allclose(
        result["components"] * sign[..., None], expected["components"], atol=RTOL
    )


@pytest.mark.parametrize("name", RUNS)
def test_covariance_and_components_match_numpy_oracle(smoke, name):
    report, oracle = smoke
    result = _components(report["runs"][name]["output_dir"])

    np.testing.assert_array_equal(result["n_rows"], oracle["n_rows"])
    _assert_same_bases(result, oracle)


@pytest.mark.parametrize("name", [name for name in RUNS if name != "stage"])
def test_other_runs_match_stage_components(smoke, name):
    report, _ = smoke
    stage = _components(report["runs"]["stage"]["output_dir"])
    result = _components(report["runs"][name]["output_dir"])

    _assert_same_bases(result, stage)


@pytest.mark.parametrize("name", PROJECTING)
def test_projected_rows_match_numpy_oracle(smoke, name):
    report, oracle = smoke
    output_dir = report["runs"][name]["output_dir"]
    table = pq.read_table(os.path.join(output_dir, "projected")).sort_by("row_id")
    components = _components(output_dir)
    row_id = table.column("row_id").to_numpy()
    keys = table.column("key").to_numpy()
    scores = np.column_stack(
        [table.column(f"pc_{i + 1}").to_numpy() for i in range(N_COMPONENTS)]
    )
    expected = np.array([oracle["projected"][r] for r in row_id])

    assert len(row_id) == len(oracle["projected"])
    # Each group's axes may point the other way than the oracle's.
    sign = np.sign((components["components"] * oracle["components"]).sum(axis=-1))
    group = np.searchsorted(components["key"], keys)
    spread = np.abs(expected).max()
    np.testing.assert_allclose(
        scores * sign[group], expected, rtol=0, atol=RTOL * spread
    )
