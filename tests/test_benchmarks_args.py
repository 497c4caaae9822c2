"""The benchmark's command line refuses bad sizes with one line, exit 2."""

import os

import pytest

from benchmarks import run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "-5"], "--rows=-5 must be a positive integer"),
        (["--repeats", "0"], "--repeats=0 must be a positive integer"),
        (["--timeout", "-1"], "--timeout=-1.0 must be a positive number"),
        (["--skew", "1.5"], "--skew=1.5 must be between 0 and 1"),
        (["--smoke", "--rows", "100"], "--smoke sets its own sizes; drop --rows"),
        (["--only", "stgae"], "--only names 'stgae'"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        run.parse_args(argv)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_smoke_keeps_its_results_out_of_the_repository(tmp_path):
    args = run.parse_args(["--smoke", "--work-dir", str(tmp_path)])

    assert args.rows == run.SMOKE["rows"]
    assert run.results_folder(args) == str(tmp_path / "results")
    full = run.parse_args(["--work-dir", str(tmp_path)])
    assert run.results_folder(full) == os.path.join(run.ROOT, "benchmarks", "results")
