"""Bad config or input: one line on stderr, exit status 2, nothing written."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import main
from tests.helpers import IRIS, IRIS_FEATURES, run_cli, write_config


def run_main(tmp_path, capsys, *args, **settings):
    settings.setdefault("input", str(IRIS))
    settings.setdefault("output_dir", str(tmp_path / "out"))
    config = write_config(tmp_path, **settings)
    code = main(["--config", str(config), "--log-level", "ERROR", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code, lines, *fragments, status=2):
    assert code == status
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        ({"key": "colour"}, ["'colour'", "species", "sepal_length"]),
        ({"features": ["sepal_length", "petals"]}, ["'petals'", "its columns are"]),
        (
            {"key": None, "features": ["sepal_length", "species"]},
            ["'species'", "type string", "numeric"],
        ),
        (
            {"n_components": 7, "features": IRIS_FEATURES},
            ["n_components=7 must be at most n_features=4"],
        ),
        ({"n_components": 0}, ["n_components=0", "positive integer"]),
        ({"ddof": 2}, ["ddof=2", "0", "1"]),
        ({"block_rows": "many"}, ["block_rows='many'", "positive integer"]),
        ({"colour": "red"}, ["'colour' is not known", "known keys"]),
        ({"n_componets": 2}, ["did you mean 'n_components'"]),
        ({"features": ["sepal_length", "sepal_length"]}, ["more than once"]),
        ({"input": "nowhere/*.parquet"}, ["matches no file"]),
        ({"missing": "ignore"}, ["missing='ignore'", "'drop' or 'error'"]),
    ],
)
def test_bad_setting_gives_one_line_and_status_2(tmp_path, capsys, settings, fragments):
    settings.setdefault("key", "species")

    code, lines = run_main(tmp_path, capsys, **settings)

    assert_one_line_error(code, lines, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    code = main(["--config", str(tmp_path / "absent.yaml")])

    lines = capsys.readouterr().err.strip().splitlines()
    assert_one_line_error(code, lines, "absent.yaml", "does not exist")


def test_config_that_is_not_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("input: [unclosed\n")

    code = main(["--config", str(path)])

    lines = capsys.readouterr().err.strip().splitlines()
    assert_one_line_error(code, lines, "bad.yaml", "not valid YAML")


def test_config_that_constructs_python_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo hacked']\n")

    code = main(["--config", str(path)])

    lines = capsys.readouterr().err.strip().splitlines()
    assert_one_line_error(code, lines, "evil.yaml", "not valid YAML")


def test_feature_missing_from_one_file_names_that_file(tmp_path, capsys, iris):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(iris.slice(0, 75), folder / "a.parquet")
    pq.write_table(iris.slice(75).drop_columns(["petal_width"]), folder / "b.parquet")

    code, lines = run_main(
        tmp_path, capsys, input=str(folder), key="species", features=IRIS_FEATURES
    )

    assert_one_line_error(code, lines, "'petal_width'", "b.parquet")


def test_file_that_is_not_parquet_is_named(tmp_path, capsys):
    path = tmp_path / "notes.parquet"
    path.write_text("this is not parquet\n")

    code, lines = run_main(tmp_path, capsys, input=str(path))

    assert_one_line_error(code, lines, "notes.parquet", "not a readable Parquet")


def test_missing_value_with_policy_error_names_column(tmp_path, capsys):
    values = np.array([1.0, 2.0, np.nan, 4.0])
    table = pa.table({"a": values, "b": values * 2, "k": ["x"] * 4})
    pq.write_table(table, tmp_path / "in.parquet")

    code, lines = run_main(
        tmp_path,
        capsys,
        input=str(tmp_path / "in.parquet"),
        key="k",
        missing="error",
        n_components=1,
    )

    assert_one_line_error(
        code, lines, "'a'", "in.parquet", "row 2 of its row group", "missing: drop"
    )
    assert not (tmp_path / "out" / "components").exists()


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    config = write_config(
        tmp_path, input=str(IRIS), output_dir=str(tmp_path / "o"), key="colour"
    )

    result = run_cli("--config", str(config))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: column 'colour' is not in")
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], result.stderr
