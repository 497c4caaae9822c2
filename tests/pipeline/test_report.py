"""The report page: a self-contained HTML view of a run's output, and its errors."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import report
from tests.helpers import IRIS, IRIS_FEATURES, ROOT, run_stage

SPECIES = ("setosa", "versicolor", "virginica")
CHROMIUM = Path("/usr/bin/chromium")
# Flags that keep a headless chromium from reaching any network service.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_EMBEDDED_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    assert data[:8] == _PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in _EMBEDDED_PNG.findall(page)]


def assert_one_line_error(code, stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def iris_output(tmp_path_factory) -> Path:
    return run_stage(
        tmp_path_factory.mktemp("iris"),
        input=str(IRIS),
        key="species",
        features=IRIS_FEATURES,
        passthrough=["row_id"],
        n_components=2,
    )


@pytest.fixture(scope="module")
def iris_report(iris_output) -> Path:
    pytest.importorskip("matplotlib")
    assert report.main([str(iris_output), "--log-level", "WARNING"]) == 0
    return iris_output / "report.html"


@pytest.fixture(scope="module")
def many_groups_output(tmp_path_factory) -> Path:
    """A run of the stage on 200 groups of 5 to 24 rows and 3 features."""
    tmp = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(5)
    sizes = np.arange(200) % 20 + 5
    keys = np.repeat([f"store_{i:03d}" for i in range(200)], sizes)
    values = rng.normal(size=(len(keys), 3)) * [3.0, 1.0, 0.5]
    table = pa.table(
        {
            "store": keys,
            "row_id": np.arange(len(keys)),
            **{f"f{i}": values[:, i] for i in range(3)},
        }
    )
    pq.write_table(table, tmp / "many.parquet")
    return run_stage(
        tmp, input=str(tmp / "many.parquet"), key="store", passthrough=["row_id"]
    )


def test_iris_report_is_self_contained(iris_report):
    page = iris_report.read_text()

    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page
    assert "<link" not in page
    assert "url(" not in page
    assert "@import" not in page


def test_iris_report_embeds_three_figures_per_species_and_one_of_all(iris_report):
    page = iris_report.read_text()

    pngs = embedded_pngs(page)

    assert len(pngs) == 3 * len(SPECIES) + 1
    for data in pngs:
        width, height = png_size(data)
        assert width >= 300 and height >= 300, (width, height)
    for species in SPECIES:
        assert f"<h3>species = {species}</h3>" in page
        for kind in ("scores", "explained variance", "correlation"):
            assert f'alt="{kind} of species = {species}"' in page
    assert 'alt="scores of all groups"' in page
    assert "Showing all 3 groups" in page


def test_iris_report_shows_the_summary_figures(iris_output, iris_report):
    page = iris_report.read_text()
    summary = json.loads((iris_output / "summary.json").read_text())

    assert "<th>rows read</th><td>150</td>" in page
    assert "<th>rows projected</th><td>150</td>" in page
    assert "<th>rows left out</th><td>none</td>" in page
    assert "<th>groups written</th><td>3</td>" in page
    assert "<th>key</th><td>species</td>" in page
    assert f"<th>pyarrow</th><td>{summary['versions']['pyarrow']}</td>" in page
    assert f"<th>stage</th><td>{summary['versions']['stage']}</td>" in page
    for feature in IRIS_FEATURES:
        assert feature in page


@pytest.mark.slow
def test_many_groups_show_the_largest_and_say_so(many_groups_output, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "many.html"

    report.build_report(many_groups_output, out, max_groups=2, overview_points=300)

    page = out.read_text()
    assert "Showing the 2 largest of 200 groups" in page
    assert len(embedded_pngs(page)) == 2 * 3 + 1
    # The largest groups are the 10 of 24 rows; ties go in key order.
    assert "<h3>store = store_019</h3>" in page
    assert "<h3>store = store_039</h3>" in page
    assert "the other 198 are grey" in page
    assert re.search(r"Drawn: \d{3} of 2,900 rows, a seeded sample", page)
    listed = re.findall(r"<tr><td>\d+</td><td>store_\d{3}</td>", page)
    assert len(listed) == 200


@pytest.mark.slow
def test_global_group_gets_its_figures_and_no_all_groups_panel(tmp_path):
    pytest.importorskip("matplotlib")
    output_dir = run_stage(
        tmp_path, input=str(IRIS), features=IRIS_FEATURES, passthrough=["species"]
    )

    out = report.build_report(output_dir)

    page = out.read_text()
    assert out == output_dir / "report.html"
    assert len(embedded_pngs(page)) == 3
    assert "all rows form one global group" in page
    assert "<th>key</th><td>none (one global group)</td>" in page
    assert "All groups" not in page
    assert "<th>rows projected</th><td>150</td>" in page


def test_sample_is_bounded_and_the_same_on_every_read(iris_output):
    first = report.load(iris_output, group_points=10, overview_points=30)
    second = report.load(iris_output, group_points=10, overview_points=30)

    # 150 rows kept with probability 30 / 150: about 30 points.
    assert 10 <= len(first.overview.pc_1) <= 60
    np.testing.assert_array_equal(first.overview.pc_1, second.overview.pc_1)
    np.testing.assert_array_equal(first.overview.group, second.overview.group)
    projected = ds.dataset(iris_output / "projected").to_table()
    known = set(projected.column("pc_1").to_pylist())
    assert set(first.overview.pc_1.tolist()) <= known
    for group in first.groups:
        assert group.n_projected == 50
        assert 1 <= len(group.pc_1) < 50
        assert len(group.pc_1) == len(group.pc_2)


def test_constant_feature_one_axis_and_a_tie_are_each_explained():
    pytest.importorskip("matplotlib")
    correlation = np.array([[1.0, np.nan, 0.5], [np.nan] * 3, [0.5, np.nan, 1.0]])
    group = report.Group(
        label="7",
        key=7,
        n_rows=40,
        correlation=correlation,
        explained_variance_ratio=np.array([0.9]),
        pc_1=np.linspace(-1.0, 1.0, 40),
        n_projected=40,
        diagnostics={"rank": 2, "condition_number": np.inf, "tied_at_cut": True},
    )
    run = report.RunOutput(
        output_dir=Path("unused"),
        summary={},
        features=["a", "flat", "c"],
        key="shop",
        n_groups=1,
        groups=[group],
        listed=[],
        n_scores=1,
        overview=None,
        has_projected=True,
    )

    section = report.group_section(run, group, "#1f77b4")

    assert len(embedded_pngs(section)) == 3
    assert "Grey hatched cells</span> are NaN" in section
    assert "flat has zero variance in this group" in section
    assert "one axis, so a histogram of pc_1" in section
    assert "rank 2 &middot; condition number infinite" in section
    assert "the kept axes are not unique" in section


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda tmp: tmp / "nowhere", ["does not exist", "pipeline.run"]),
        (lambda tmp: _file(tmp / "a_file"), ["is not a folder"]),
        (lambda tmp: tmp, ["holds no summary.json", "components/, projected/"]),
    ],
)
def test_wrong_output_dir_gives_one_line_and_status_2(
    tmp_path, capsys, make, fragments
):
    output_dir = make(tmp_path)

    code = report.main([str(output_dir)])

    assert_one_line_error(code, capsys.readouterr().err, str(output_dir), *fragments)
    assert not (tmp_path / "report.html").exists()


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def test_unreadable_summary_gives_one_line_and_status_2(iris_output, tmp_path, capsys):
    copy = Path(shutil.copytree(iris_output, tmp_path / "copy"))
    (copy / "summary.json").write_text("{not json")

    code = report.main([str(copy)])

    assert_one_line_error(code, capsys.readouterr().err, "summary.json", "JSON")


def test_missing_matplotlib_gives_one_line_and_status_2(
    iris_output, tmp_path, capsys, monkeypatch
):
    # None in sys.modules makes every import of matplotlib fail.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.html"

    code = report.main([str(iris_output), "--out", str(out)])

    err = capsys.readouterr().err
    assert_one_line_error(code, err)
    assert err.strip() == (
        'error: the report needs matplotlib; install it with pip install -e ".[report]"'
    )
    assert not out.exists()


def test_out_in_a_missing_folder_gives_one_line_and_status_2(
    iris_output, tmp_path, capsys
):
    pytest.importorskip("matplotlib")
    out = tmp_path / "no" / "report.html"

    code = report.main([str(iris_output), "--out", str(out)])

    assert_one_line_error(code, capsys.readouterr().err, "--out=", "does not exist")


def test_max_groups_below_one_gives_one_line_and_status_2(iris_output, capsys):
    code = report.main([str(iris_output), "--max-groups", "0"])

    assert_one_line_error(code, capsys.readouterr().err, "--max-groups=0")


def test_command_line_reports_a_missing_output_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert_one_line_error(result.returncode, result.stderr, "does not exist")
    assert result.stdout == ""


def test_headless_chromium_renders_the_report(iris_report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    image = pytest.importorskip("matplotlib.image")
    shot = tmp_path / "shot.png"

    subprocess.run(
        [
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1400,3000",
            iris_report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )

    data = shot.read_bytes()
    assert png_size(data) == (1400, 3000)
    assert len(data) > 50_000
    pixels = image.imread(shot)[..., :3]
    # The page is mostly white; figures and text must cover a good part.
    covered = (pixels < 0.9).any(axis=-1).mean()
    assert covered > 0.05, covered
