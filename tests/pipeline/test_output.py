"""All-or-nothing, repeatable output, and the guards around output_dir."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import main
from tests.helpers import (
    IRIS,
    IRIS_CONFIG,
    IRIS_FEATURES,
    ROOT,
    read_components,
    read_projected,
    run_stage,
    write_config,
)


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(
            os.path.join(root, name), "rb"
        ).read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_same_job_twice_gives_the_same_contents(tmp_path):
    first = run_stage(tmp_path / "a", **IRIS_CONFIG)
    second = run_stage(tmp_path / "b", **IRIS_CONFIG)

    assert read_components(first).equals(read_components(second))
    assert read_projected(first).equals(read_projected(second))
    names = sorted(os.listdir(first / "components"))
    assert names == sorted(os.listdir(second / "components"))


def test_rerun_replaces_the_previous_output(tmp_path):
    out = run_stage(tmp_path, **IRIS_CONFIG)
    run_stage(tmp_path, **dict(IRIS_CONFIG, n_components=3))

    assert read_projected(out).column_names[-1] == "pc_3"
    assert sorted(os.listdir(out)) == ["components", "projected", "summary.json"]


def test_output_dir_with_foreign_files_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    config = write_config(tmp_path, output_dir=str(out), **IRIS_CONFIG)

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "notes.txt" in err[0] and "--overwrite" in err[0]
    assert sorted(os.listdir(out)) == ["notes.txt"]

    assert main(["--config", str(config), "--overwrite", "--log-level", "ERROR"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert read_components(out).num_rows == 3


def test_unwritable_output_dir_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    config = write_config(tmp_path, output_dir=str(blocker / "out"), **IRIS_CONFIG)

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "output_dir=" in err[0] and "file/out" in err[0]


def test_key_that_is_a_list_or_struct_is_refused(tmp_path, capsys):
    for name, column in [
        ("lists", pa.array([[1, 2], [3]] * 5)),
        ("structs", pa.array([{"a": 1}, {"a": 2}] * 5)),
    ]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(
            pa.table({"k": column, "x": np.arange(10.0), "y": np.arange(10.0) ** 2}),
            path,
        )
        config = write_config(
            tmp_path,
            input=str(path),
            key="k",
            output_dir=str(tmp_path / "out"),
            n_components=1,
        )

        code = main(["--config", str(config), "--log-level", "ERROR"])

        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert "key column 'k'" in err[0] and "scalar" in err[0]


def test_truncated_parquet_file_is_named(tmp_path, capsys):
    data = (IRIS).read_bytes()
    path = tmp_path / "cut.parquet"
    path.write_bytes(data[: len(data) // 2])
    config = write_config(tmp_path, input=str(path), output_dir=str(tmp_path / "o"))

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "cut.parquet" in err[0] and "not a readable Parquet file" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_run_killed_midway_leaves_the_previous_output(tmp_path):
    rng = np.random.default_rng(0)
    n = 1_500_000
    values = rng.normal(size=(n, 4))
    table = pa.table({f"f{i}": values[:, i] for i in range(4)})
    table = table.append_column("k", pa.array(rng.integers(0, 50, size=n)))
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100_000)
    out = tmp_path / "out"
    run_stage(tmp_path / "first", output_dir=str(out), **IRIS_CONFIG)
    before = snapshot(out)
    config = write_config(
        tmp_path,
        input=str(tmp_path / "big.parquet"),
        key="k",
        output_dir=str(out),
        overwrite=True,
    )

    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    # Kill it once the fit has written its components into the staging place.
    while time.monotonic() < deadline and child.poll() is None:
        staged = [n for n in os.listdir(out) if n.startswith(".staging-")]
        if staged and os.path.isdir(out / staged[0] / "components"):
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()

    assert child.returncode == -signal.SIGKILL, "the run ended before it was killed"
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before

    # The next run cleans the leftovers up and replaces the output whole.
    run_stage(tmp_path / "again", output_dir=str(out), **IRIS_CONFIG)
    assert sorted(os.listdir(out)) == ["components", "projected", "summary.json"]


def test_failure_during_the_run_exits_1_and_writes_nothing(tmp_path, capsys, iris):
    path = tmp_path / "broken.parquet"
    pq.write_table(iris, path, compression="none")
    data = bytearray(path.read_bytes())
    # Overwrite the data pages but keep the footer: the file scans fine and
    # fails only when its rows are read.
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[4 : footer_start - 1] = bytes(footer_start - 5)
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    config = write_config(
        tmp_path,
        input=str(path),
        output_dir=str(out),
        key="species",
        features=IRIS_FEATURES,
    )

    code = main(["--config", str(config), "--log-level", "CRITICAL"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: the run failed: ")
    assert not out.exists()


def test_a_report_in_output_dir_is_the_stages_own_and_replaced(tmp_path):
    out = run_stage(tmp_path, **IRIS_CONFIG)
    (out / "report.html").write_text("<html>old run</html>\n")

    run_stage(tmp_path, **IRIS_CONFIG)

    assert sorted(os.listdir(out)) == ["components", "projected", "summary.json"]
