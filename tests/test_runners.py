"""The Iris job gives the same outputs on every runner the stage supports.

The reference is the DirectRunner in this process. The same job then runs on
the DirectRunner with two worker processes, and on Beam's PortableRunner
against Beam's local job service with SDK workers from an external worker
pool, both servers started here on loopback ports (see ``runner_services``).
``components/`` is compared sorted by key, ``projected/`` sorted by row_id.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config as config_module
from pipeline.run import main
from tests import runner_services
from tests.helpers import IRIS, ROOT

CONFIG = str(ROOT / "configs" / "iris.yaml")
INPUT = str(IRIS)
KEY = config_module.load(CONFIG).key
ROW_ID = "row_id"
N_ROWS = 150
N_GROUPS = 3

# Every runner executes the same float64 TensorFlow ops on the same rows;
# only the split of the rows into bundles and the order in which partial
# moments are merged can differ, which moves results by a few ulps. Values
# here are of order 1 (centimetres), so 1e-12 leaves a wide margin over
# rounding and still catches any real difference.
ATOL = 1e-12


def _run_stage(
    output_dir: str, beam_args: list[str], log_path: str | None = None
) -> None:
    argv = ["--config", CONFIG, "--input", INPUT, "--output-dir", output_dir]
    status = main([*argv, "--log-level", "WARNING", *beam_args])
    if status != 0:
        msg = f"the stage exited with status {status} on {beam_args or 'defaults'}"
        if log_path is not None:
            msg += f"; the job service log ends:\n{runner_services.log_tail(log_path)}"
        raise AssertionError(msg)


def _read(output_dir: str, dataset: str, by: str) -> pa.Table:
    return pq.read_table(os.path.join(output_dir, dataset)).sort_by(by)


def _summary(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _is_numeric(data_type: pa.DataType) -> bool:
    while pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        data_type = data_type.value_type
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _assert_tables_close(result: pa.Table, expected: pa.Table) -> None:
    assert result.schema.equals(expected.schema, check_metadata=True)
    assert result.num_rows == expected.num_rows
    for name, data_type in zip(
        expected.column_names, expected.schema.types, strict=True
    ):
        got, want = result[name].to_pylist(), expected[name].to_pylist()
        if not _is_numeric(data_type):
            assert got == want, name
        elif pa.types.is_integer(data_type):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(
                np.asarray(got, dtype=np.float64),
                np.asarray(want, dtype=np.float64),
                rtol=0,
                atol=ATOL,
                err_msg=name,
            )


def _assert_same_outputs(result_dir: str, expected_dir: str) -> None:
    for dataset, by in (("components", KEY), ("projected", ROW_ID)):
        _assert_tables_close(
            _read(result_dir, dataset, by), _read(expected_dir, dataset, by)
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The outputs of the DirectRunner in this process."""
    output_dir = str(tmp_path_factory.mktemp("direct") / "out")
    _run_stage(output_dir, [])
    return output_dir


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> str:
    """The outputs of the PortableRunner with external SDK workers."""
    work = tmp_path_factory.mktemp("portable")
    job_port = runner_services.free_port()
    pool_port = runner_services.free_port()
    job_log = str(work / "job_service.log")
    with (
        runner_services.serving(
            "job service",
            runner_services.job_service_args(job_port, str(work / "staging")),
            job_port,
            job_log,
        ),
        runner_services.serving(
            "worker pool",
            runner_services.worker_pool_args(pool_port),
            pool_port,
            str(work / "worker_pool.log"),
        ),
    ):
        output_dir = str(work / "out")
        _run_stage(
            output_dir,
            [
                "--runner=PortableRunner",
                f"--job_endpoint=localhost:{job_port}",
                "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{pool_port}",
            ],
            job_log,
        )
    return output_dir


def test_direct_runner_writes_every_row_and_group(reference):
    summary = _summary(reference)
    components = _read(reference, "components", KEY)
    projected = _read(reference, "projected", ROW_ID)

    assert summary["rows_read"] == N_ROWS
    assert summary["rows_projected"] == N_ROWS
    assert summary["groups_written"] == N_GROUPS
    assert components.num_rows == N_GROUPS
    assert projected[ROW_ID].to_pylist() == list(range(N_ROWS))


@pytest.mark.slow
def test_multi_process_direct_runner_matches_one_process(reference, tmp_path):
    output_dir = str(tmp_path / "out")

    _run_stage(
        output_dir,
        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    )

    _assert_same_outputs(output_dir, reference)


@pytest.mark.slow
def test_portable_runner_with_external_workers_matches_direct_runner(
    reference, portable
):
    _assert_same_outputs(portable, reference)


@pytest.mark.slow
def test_portable_runner_reports_row_counts_in_summary(portable):
    summary = _summary(portable)

    assert summary["rows_read"] == N_ROWS
    assert summary["rows_projected"] == N_ROWS
    assert summary["groups_written"] == N_GROUPS
