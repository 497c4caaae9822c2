"""Guards a nightly run meets: typos, clashing runs, killed commits, NaN keys."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import main
from tests.helpers import (
    IRIS_CONFIG,
    read_components,
    read_projected,
    run_stage,
    write_config,
)


def one_line(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--n-compnents", "3"], "did you mean --n-components?"),
        (["--direct_num_wrkers=2"], "did you mean --direct_num_workers?"),
        (["--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (["--n-components", "many"], "--n-components: invalid"),
        (
            ["--direct_num_workers=2", "--direct_running_mode=multi_threading"],
            "use multi_processing",
        ),
        (["--direct_running_mode", "multi_threading"], "is not supported"),
    ],
)
def test_a_mistyped_flag_is_a_one_line_error(tmp_path, capsys, args, fragment):
    config = write_config(tmp_path, output_dir=str(tmp_path / "o"), **IRIS_CONFIG)

    code = main(["--config", str(config), *args])

    err = one_line(capsys)
    assert code == 2 and len(err) == 1, err
    assert fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_output_dir_that_is_a_file_is_exit_2(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("a file\n")
    config = write_config(tmp_path, output_dir=str(target), **IRIS_CONFIG)

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = one_line(capsys)
    assert code == 2 and len(err) == 1
    assert "is a file; expected a folder" in err[0]
    assert target.read_text() == "a file\n"


def test_transform_into_the_folder_of_its_own_bases_is_refused(tmp_path, capsys):
    fitted = run_stage(tmp_path / "fit", mode="fit", **IRIS_CONFIG)
    config = write_config(
        tmp_path,
        mode="transform",
        components=str(fitted),
        output_dir=str(fitted),
        **IRIS_CONFIG,
    )

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = one_line(capsys)
    assert code == 2 and len(err) == 1, err
    assert "holds the components this run projects with" in err[0]
    assert read_components(fitted).num_rows == 3


def test_a_live_run_holding_output_dir_is_not_disturbed(tmp_path, capsys):
    out = run_stage(tmp_path, **IRIS_CONFIG)
    staging = out / ".staging-live"
    staging.mkdir()
    # The parent of this test process is alive: its PID holds the lock.
    (out / ".stage.lock").write_text(f"{os.getppid()}\n")
    config = write_config(tmp_path, output_dir=str(out), **IRIS_CONFIG)

    code = main(["--config", str(config), "--log-level", "ERROR"])

    err = one_line(capsys)
    assert code == 2 and len(err) == 1, err
    assert "being written by another run" in err[0]
    assert staging.exists()


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    out = run_stage(tmp_path, **IRIS_CONFIG)
    (out / ".stage.lock").write_text("999999999\n")

    run_stage(tmp_path, **IRIS_CONFIG)

    assert sorted(os.listdir(out)) == ["components", "projected", "summary.json"]


def test_outputs_moved_aside_by_a_killed_commit_are_restored(tmp_path):
    from transforms import output

    out = run_stage(tmp_path, **IRIS_CONFIG)
    before = read_projected(out)
    aside = out / ".previous-killed"
    aside.mkdir()
    for name in ("components", "projected", "summary.json"):
        os.rename(out / name, aside / name)

    output.clean_leftovers(str(out))

    assert sorted(os.listdir(out)) == ["components", "projected", "summary.json"]
    assert read_projected(out).equals(before)


def test_nan_and_infinite_keys_are_missing_values(tmp_path):
    keys = np.array([0.0, 1.0, np.nan, 0.0, 1.0, np.inf, 0.0, 1.0, 0.0, 1.0])
    table = pa.table({"k": keys, "x": np.arange(10.0), "y": np.arange(10.0) ** 2})
    pq.write_table(table, tmp_path / "in.parquet")

    out = run_stage(
        tmp_path, input=str(tmp_path / "in.parquet"), key="k", n_components=1
    )

    assert sorted(read_components(out).column("k").to_pylist()) == [0.0, 1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_left_out"] == {"missing_value": 2}


def test_row_groups_are_cut_into_slices_without_changing_results(
    tmp_path, monkeypatch, capsys
):
    from transforms import inputs

    rng = np.random.default_rng(8)
    values = rng.normal(size=(5000, 4)) * [1.0, 2.0, 3.0, 4.0]
    keys = rng.integers(0, 7, size=5000)
    columns = {f"f{i}": values[:, i] for i in range(4)}
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table(dict(columns, k=keys, row_id=np.arange(5000))), path)
    settings = {"input": str(path), "key": "k", "passthrough": ["row_id"]}
    whole = run_stage(tmp_path / "whole", **settings)

    monkeypatch.setattr(inputs, "SLICE_VALUES", 4096)
    sliced = run_stage(tmp_path / "sliced", **settings)

    a = read_components(whole).to_pandas()
    b = read_components(sliced).to_pandas()
    np.testing.assert_array_equal(a["n_rows"], b["n_rows"])
    for name in ("mean", "covariance", "components"):
        np.testing.assert_allclose(
            np.stack(a[name].map(lambda v: np.array(v.tolist(), dtype=float))),
            np.stack(b[name].map(lambda v: np.array(v.tolist(), dtype=float))),
            rtol=1e-12,
            atol=1e-12,
        )
    assert read_projected(sliced).num_rows == 5000

    values[3000, 2] = np.nan
    columns = {f"f{i}": values[:, i] for i in range(4)}
    pq.write_table(pa.table(dict(columns, k=keys, row_id=np.arange(5000))), path)
    config = write_config(
        tmp_path / "err", missing="error", output_dir=str(tmp_path / "o"), **settings
    )
    assert main(["--config", str(config), "--log-level", "CRITICAL"]) == 2
    assert "row 3000 of its row group" in capsys.readouterr().err
