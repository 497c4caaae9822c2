"""Shared test helpers: the Iris data, a NumPy oracle and ways to run the stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

ROOT = Path(__file__).resolve().parents[1]
IRIS = ROOT / "data" / "iris.parquet"
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# The Iris job per species, as most tests run it.
IRIS_CONFIG = {
    "input": str(IRIS),
    "key": "species",
    "features": IRIS_FEATURES,
    "passthrough": ["row_id"],
}


def write_config(directory: Path, **settings) -> Path:
    """A YAML config file in ``directory`` holding ``settings``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def run_stage(tmp_path: Path, *beam_args: str, **settings) -> Path:
    """Run the stage in this process; returns its output_dir."""
    from pipeline.run import main

    settings.setdefault("output_dir", str(tmp_path / "out"))
    config = write_config(tmp_path, **settings)
    code = main(["--config", str(config), "--log-level", "WARNING", *beam_args])
    assert code == 0, f"the stage exited with {code}"
    return Path(settings["output_dir"])


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline.run`` as a user does; output captured."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_components(output_dir: Path) -> pa.Table:
    return ds.dataset(output_dir / "components").to_table()


def read_projected(output_dir: Path) -> pa.Table:
    return ds.dataset(output_dir / "projected").to_table()


def matrix(table: pa.Table, column: str, row: int) -> np.ndarray:
    return np.array(table.column(column)[row].as_py(), dtype=np.float64)


def oracle(values: np.ndarray, ddof: int = 1) -> dict[str, np.ndarray]:
    """NumPy float64 reference for one group, with the stage's sign rule."""
    covariance = np.cov(values, rowvar=False, ddof=ddof)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.clip(eigenvalues[::-1], 0, None)
    components = eigenvectors[:, ::-1].T
    pivot = components[np.arange(len(components)), np.abs(components).argmax(1)]
    components = components * np.where(pivot < 0, -1.0, 1.0)[:, None]
    total = eigenvalues.sum()
    return {
        "mean": values.mean(axis=0),
        "covariance": covariance,
        "correlation": np.corrcoef(values, rowvar=False),
        "components": components,
        "explained_variance": eigenvalues,
        "explained_variance_ratio": eigenvalues / total if total > 0 else eigenvalues,
    }


def assert_close(result: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Entries agree to ``rtol`` relative to the largest entry of ``expected``.

    An entry near zero (an off-diagonal covariance, say) carries the round-off
    of the large ones, so its error is judged against the matrix's scale.
    """
    result, expected = np.asarray(result), np.asarray(expected)
    assert result.shape == expected.shape
    scale = np.nanmax(np.abs(expected)) if expected.size else 1.0
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_allclose(
        np.nan_to_num(result), np.nan_to_num(expected), rtol=0, atol=rtol * scale
    )
