"""Command line: ``python -m pipeline.report OUTPUT_DIR [--out FILE] [--max-groups N]``.

Reads what a finished run of ``python -m pipeline.run`` wrote (``components/``,
``projected/`` and ``summary.json``) and writes one self-contained HTML page,
by default ``OUTPUT_DIR/report.html``: the run's figures as tables, and per
group the scatter of pc_1 against pc_2, the explained-variance ratios as a
scree plot and the correlation matrix as a heat map. The figures are PNG
images embedded in the page; it loads nothing from anywhere.

Only the largest ``--max-groups`` groups (by n_rows) get figures; the page
says how many there are in all and lists them in a table. Memory stays
bounded whatever the size of ``projected/``: only its key, pc_1 and pc_2
columns are read, batch by batch, and at most a fixed number of points per
panel is kept, drawn by a seeded random sample, so the same output gives the
same page.

matplotlib is an optional extra (``pip install -e ".[report]"``); it is
imported only when the figures are drawn. Exit status: 0 when the page was
written; 2 for a missing matplotlib or an output_dir that is not a finished
run's, with one line on stderr; 1 for any other failure.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from transforms.errors import StageError

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_GROUPS = 12
# Points drawn in one group's panel and in the all-groups panel; a group or a
# run with more rows is drawn from a seeded sample of this size (on average).
GROUP_POINTS = 5_000
OVERVIEW_POINTS = 20_000
# Groups coloured in the all-groups panel; more distinct colours cannot be
# told apart, so the groups past these are drawn in grey.
OVERVIEW_COLOURS = 20
# Correlation values are written into the cells up to this many features.
ANNOTATE_FEATURES = 10
# Groups listed in the table of all groups at the end of the page.
LISTED_GROUPS = 1_000
SAMPLE_SEED = 0

MATPLOTLIB_MISSING = (
    'the report needs matplotlib; install it with pip install -e ".[report]"'
)
_RUN = "python -m pipeline.run"
_BASIS_COLUMNS = (
    "n_rows",
    "mean",
    "covariance",
    "correlation",
    "components",
    "explained_variance",
    "explained_variance_ratio",
)
# Checks of a basis that newer runs write beside it; shown where present.
_DIAGNOSTICS = ("rank", "condition_number", "tied_at_cut")
_SCORE = re.compile(r"pc_(\d+)")
_DPI = 100
_LISTED_FEATURES = 30
_GREY = "#b0b0b0"
_SINGLE_COLOUR = "#1f77b4"
_NAN_COLOUR = "#d0d0d0"


class ReportError(StageError):
    """The output folder is not a finished run's, or the report cannot be made."""


@dataclasses.dataclass
class Group:
    """One group of ``components/`` that gets figures, and its sampled points.

    Attributes:
        label: the key value as text; "all rows" for the global group.
        key: the key value as Python holds it; None for the global group.
        n_rows: rows that went into the group's statistics.
        correlation: float64, shape (n_features, n_features); NaN in the row
            and column of a zero-variance feature.
        explained_variance_ratio: float64, shape (k,), the kept axes' ratios.
        pc_1: float64, shape (n_points,), the sampled rows' first score.
        pc_2: float64, shape (n_points,), their second score; None when the
            group (or the whole run) keeps one axis.
        n_projected: rows of ``projected/`` that belong to the group.
        diagnostics: the basis's checks that ``components/`` holds (rank,
            condition_number, tied_at_cut), where it holds them.
    """

    label: str
    key: Any
    n_rows: int
    correlation: np.ndarray
    explained_variance_ratio: np.ndarray
    pc_1: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))
    pc_2: np.ndarray | None = None
    n_projected: int = 0
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return len(self.explained_variance_ratio)


@dataclasses.dataclass
class Overview:
    """The seeded sample of all projected rows, for the all-groups panel.

    Attributes:
        pc_1: float64, shape (n_points,).
        pc_2: float64, shape (n_points,); None when the run keeps one axis.
        group: int64, shape (n_points,), the index of the row's group among
            the coloured ones, -1 for the others.
        n_rows: projected rows drawn from; rows without pc_2 are not counted
            when pc_2 is drawn.
        n_without_pc_2: projected rows left out because their group keeps
            one axis only.
    """

    pc_1: np.ndarray
    pc_2: np.ndarray | None
    group: np.ndarray
    n_rows: int
    n_without_pc_2: int = 0


@dataclasses.dataclass
class RunOutput:
    """What the report shows of one run's output folder."""

    output_dir: Path
    summary: dict
    features: list[str]
    key: str | None
    n_groups: int
    groups: list[Group]
    listed: list[tuple[str, int, int, float]]
    n_scores: int
    overview: Overview | None
    has_projected: bool


def check_output_dir(output_dir: Path) -> tuple[Path, Path | None]:
    """The ``components/`` and ``projected/`` folders of a finished run.

    ``projected/`` is None where the run wrote none (a fit-only run). Where
    ``components/`` is missing, the folder that the summary's ``components``
    setting names (the bases a transform-only run used) is taken instead.

    Raises:
        ReportError: the folder is missing, is not a folder, or does not hold
            ``summary.json`` and the bases.
    """
    if not output_dir.exists():
        msg = (
            f"output_dir={str(output_dir)!r} does not exist; pass the "
            f"output_dir of a finished run of {_RUN}"
        )
        raise ReportError(msg)
    if not output_dir.is_dir():
        msg = (
            f"output_dir={str(output_dir)!r} is not a folder; pass the "
            f"output_dir of a finished run of {_RUN}"
        )
        raise ReportError(msg)
    expected = (
        "expected components/, projected/ and summary.json as a finished run "
        f"of {_RUN} writes them"
    )
    if not (output_dir / "summary.json").is_file():
        msg = f"output_dir={str(output_dir)!r} holds no summary.json; {expected}"
        raise ReportError(msg)

    components = output_dir / "components"
    if not components.is_dir():
        components = _bases_used(output_dir)
    if components is None:
        msg = f"output_dir={str(output_dir)!r} holds no components/; {expected}"
        raise ReportError(msg)
    projected = output_dir / "projected"
    return components, projected if projected.is_dir() else None


def _bases_used(output_dir: Path) -> Path | None:
    """The bases a transform-only run read, as its summary names them."""
    try:
        source = read_summary(output_dir).get("config", {}).get("components")
    except ReportError:
        return None
    if not isinstance(source, str):
        return None
    for candidate in (Path(source) / "components", Path(source)):
        if candidate.is_dir() and any(candidate.glob("*.parquet")):
            return candidate
    return None


def read_summary(output_dir: Path) -> dict:
    """``summary.json`` of a run, as a dict.

    Raises:
        ReportError: the file is not valid JSON or not a JSON object.
    """
    path = output_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = (
            f"{str(path)!r} cannot be read as JSON ({exc}); run {_RUN} again to "
            "write it"
        )
        raise ReportError(msg) from exc
    if not isinstance(summary, dict):
        msg = (
            f"{str(path)!r} holds a JSON {type(summary).__name__}, expected an "
            f"object; run {_RUN} again to write it"
        )
        raise ReportError(msg)
    return summary


def _open_dataset(path: Path) -> ds.Dataset:
    try:
        return ds.dataset(path, format="parquet")
    except (OSError, pa.ArrowException) as exc:
        msg = f"{str(path)!r} cannot be read as a Parquet dataset: {exc}"
        raise ReportError(msg) from exc


def _batches(
    dataset: ds.Dataset, columns: list[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Batches of ``columns``, file after file in name order.

    One thread and a fixed order, so that the seeded sample and the row
    positions are the same on every read.
    """
    fragments = sorted(dataset.get_fragments(), key=lambda fragment: fragment.path)
    for fragment in fragments:
        try:
            yield from fragment.to_batches(
                schema=dataset.schema,
                columns=columns,
                batch_size=batch_size,
                use_threads=False,
            )
        except (OSError, pa.ArrowException) as exc:
            msg = f"{fragment.path!r} cannot be read as Parquet: {exc}"
            raise ReportError(msg) from exc


def _label(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _features(dataset: ds.Dataset, path: Path) -> list[str]:
    metadata = dataset.schema.metadata or {}
    try:
        features = json.loads(metadata[b"features"])
    except (KeyError, ValueError) as exc:
        msg = (
            f"{str(path)!r} has no JSON list of feature names under the schema "
            f"metadata key 'features'; run {_RUN} again to write it"
        )
        raise ReportError(msg) from exc
    return [str(name) for name in features]


def _key_column(summary: dict, names: list[str], components: Path) -> str | None:
    """The key column, as the run's configuration names it; None for no key."""
    config = summary.get("config")
    if not isinstance(config, dict) or "key" not in config:
        # An older summary: the key is the one column besides the bases.
        others = [
            name for name in names if name not in (*_BASIS_COLUMNS, *_DIAGNOSTICS)
        ]
        return others[0] if len(others) == 1 else None
    key = config["key"]
    if key is not None and key not in names:
        msg = (
            f"{str(components)!r} has no column {key!r}, the key that "
            f"summary.json names; run {_RUN} again to write both"
        )
        raise ReportError(msg)
    return key


def read_groups(
    components: Path, max_groups: int, summary: dict
) -> tuple[list[str], str | None, int, list[Group], list[tuple[str, int, int, float]]]:
    """The largest groups of ``components/``, with their correlation and ratios.

    Args:
        components: the ``components/`` dataset of a run.
        max_groups: how many groups get figures; the largest by n_rows, ties
            in the dataset's (key) order.
        summary: the run's ``summary.json``; its configuration names the key.

    Returns:
        The feature names, the key column (None for the global group), the
        number of groups, the largest ``max_groups`` groups (largest first)
        and, for at most ``LISTED_GROUPS`` of the largest, (label, n_rows, k,
        sum of the explained-variance ratios).

    Raises:
        ReportError: the dataset cannot be read or lacks a column.
    """
    dataset = _open_dataset(components)
    features = _features(dataset, components)
    names = dataset.schema.names
    missing = [name for name in _BASIS_COLUMNS if name not in names]
    if missing:
        msg = (
            f"{str(components)!r} lacks the column(s) {', '.join(missing)}; run "
            f"{_RUN} again to write it"
        )
        raise ReportError(msg)
    key = _key_column(summary, names, components)
    key_columns = [key] if key else []

    # A first pass over the small columns finds the largest groups; only
    # their d x d correlations are read, in a second pass.
    columns = [*key_columns, "n_rows", "explained_variance_ratio"]
    table = pa.Table.from_batches(
        list(_batches(dataset, columns, 4096)),
        schema=pa.schema([dataset.schema.field(name) for name in columns]),
    )
    n_rows = table.column("n_rows").to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((np.arange(len(n_rows)), -n_rows))
    keys = table.column(key).to_pylist() if key else [None] * len(n_rows)
    ratios = table.column("explained_variance_ratio").to_pylist()
    listed = [
        (
            _label(keys[i]) if key else "all rows",
            int(n_rows[i]),
            len(ratios[i] or []),
            float(np.sum(ratios[i] or [0.0])),
        )
        for i in order[:LISTED_GROUPS]
    ]

    chosen = order[:max_groups]
    rank = {int(row): position for position, row in enumerate(chosen)}
    groups: list[Group | None] = [None] * len(chosen)
    start = 0
    diagnostics = [name for name in _DIAGNOSTICS if name in names]
    columns = [
        *key_columns,
        "n_rows",
        "correlation",
        "explained_variance_ratio",
        *diagnostics,
    ]
    for batch in _batches(dataset, columns, 256):
        for offset in range(batch.num_rows):
            position = rank.get(start + offset)
            if position is None:
                continue
            row = batch.slice(offset, 1).to_pylist()[0]
            value = row[key] if key else None
            groups[position] = Group(
                label=_label(value) if key else "all rows",
                key=value,
                n_rows=int(row["n_rows"]),
                correlation=_square(row["correlation"], len(features)),
                explained_variance_ratio=np.asarray(
                    row["explained_variance_ratio"] or [], dtype=np.float64
                ),
                diagnostics={name: row[name] for name in diagnostics},
            )
        start += batch.num_rows
    return features, key, len(n_rows), [g for g in groups if g is not None], listed


def _square(rows: list[list[float]] | None, n_features: int) -> np.ndarray:
    values = np.full((n_features, n_features), np.nan)
    for i, row in enumerate(rows or []):
        values[i, : len(row)] = [np.nan if v is None else v for v in row]
    return values


def read_points(
    projected: Path,
    key: str | None,
    groups: list[Group],
    n_coloured: int,
    group_points: int = GROUP_POINTS,
    overview_points: int = OVERVIEW_POINTS,
) -> tuple[int, Overview]:
    """Fill in the groups' sampled scores; the sample of all rows besides.

    Reads only the key, pc_1 and pc_2 columns, batch by batch. A row is kept
    for its group's panel with probability ``group_points / n_rows`` of its
    group and for the all-groups panel with ``overview_points / rows``, both
    drawn from one seeded generator, so memory stays near
    ``len(groups) * group_points + overview_points`` points.

    Args:
        projected: the ``projected/`` dataset of a run.
        key: the key column; None for the global group.
        groups: the groups that get figures; their pc_1, pc_2 and
            n_projected are set here.
        n_coloured: the first this many groups are coloured in the
            all-groups panel, the rest of the rows are grey.
        group_points: points kept per group, on average.
        overview_points: points kept for the all-groups panel, on average.

    Returns:
        The number of score columns (K of pc_1 ... pc_K) and the sample of
        all rows.

    Raises:
        ReportError: the dataset cannot be read or lacks pc_1 or the key.
    """
    dataset = _open_dataset(projected)
    names = dataset.schema.names
    scores = [int(m.group(1)) for m in map(_SCORE.fullmatch, names) if m]
    n_scores = max(scores, default=0)
    needed = [*([key] if key else []), "pc_1"]
    missing = [name for name in needed if name not in names]
    if missing:
        msg = (
            f"{str(projected)!r} lacks the column(s) {', '.join(missing)}; run "
            f"{_RUN} again to write it"
        )
        raise ReportError(msg)
    two = n_scores >= 2
    columns = [*needed, *(["pc_2"] if two else [])]

    total = dataset.count_rows()
    overview_fraction = min(1.0, overview_points / max(total, 1))
    group_fraction = np.array(
        [min(1.0, group_points / max(g.n_rows, 1)) for g in groups] + [0.0]
    )
    if key:
        key_type = dataset.schema.field(key).type
        if pa.types.is_dictionary(key_type):
            key_type = key_type.value_type
        value_set = pa.array([g.key for g in groups], type=key_type)
    rng = np.random.default_rng(SAMPLE_SEED)
    counts = np.zeros(len(groups) + 1, dtype=np.int64)
    kept: dict[str, list[np.ndarray]] = {"i": [], "g": [], "o": [], "1": [], "2": []}
    for batch in _batches(dataset, columns, 65_536):
        n = batch.num_rows
        if key:
            values = batch.column(key)
            if pa.types.is_dictionary(values.type):
                values = values.cast(values.type.value_type)
            index = pc.index_in(values.cast(key_type), value_set=value_set)
            index = index.fill_null(len(groups)).to_numpy(zero_copy_only=False)
        else:
            index = np.zeros(n, dtype=np.int64)
        index = index.astype(np.int64)
        counts += np.bincount(index, minlength=len(groups) + 1)
        draw = rng.random(n)
        for_group = draw < group_fraction[index]
        for_overview = draw < overview_fraction
        keep = for_group | for_overview
        kept["i"].append(index[keep])
        kept["g"].append(for_group[keep])
        kept["o"].append(for_overview[keep])
        for name in ("1", "2") if two else ("1",):
            column = batch.column(f"pc_{name}").to_numpy(zero_copy_only=False)
            kept[name].append(column.astype(np.float64)[keep])

    joined = {
        name: np.concatenate(parts) if parts else np.empty(0)
        for name, parts in kept.items()
    }
    index = joined["i"].astype(np.int64)
    pc_1 = joined["1"]
    pc_2 = joined["2"] if two else None
    for position, group in enumerate(groups):
        mine = joined["g"].astype(bool) & (index == position)
        group.n_projected = int(counts[position])
        group.pc_1 = pc_1[mine]
        if pc_2 is not None and group.n_components >= 2:
            group.pc_2 = pc_2[mine]
        finite = np.isfinite(group.pc_1)
        if group.pc_2 is not None:
            finite &= np.isfinite(group.pc_2)
            group.pc_2 = group.pc_2[finite]
        group.pc_1 = group.pc_1[finite]

    # Rows of a group that keeps one axis have a null (NaN) pc_2; the
    # scatter of all groups can only leave them out.
    in_overview = joined["o"].astype(bool)
    n_without = 0
    if pc_2 is not None:
        lacking = in_overview & ~np.isfinite(pc_2)
        n_without = int(round(lacking.sum() / overview_fraction))
        in_overview &= np.isfinite(pc_2)
    in_overview &= np.isfinite(pc_1)
    colour = np.where(index < n_coloured, index, -1)[in_overview]
    overview = Overview(
        pc_1=pc_1[in_overview],
        pc_2=pc_2[in_overview] if pc_2 is not None else None,
        group=colour,
        n_rows=max(total - n_without, 0),
        n_without_pc_2=min(n_without, total),
    )
    return n_scores, overview


def load(
    output_dir: Path,
    max_groups: int = DEFAULT_MAX_GROUPS,
    group_points: int = GROUP_POINTS,
    overview_points: int = OVERVIEW_POINTS,
) -> RunOutput:
    """Everything the report shows of one run's output folder.

    Raises:
        ReportError: the folder is not a finished run's output.
    """
    components, projected = check_output_dir(output_dir)
    summary = read_summary(output_dir)
    features, key, n_groups, groups, listed = read_groups(
        components, max_groups, summary
    )

    n_scores, overview = 0, None
    if projected is not None:
        n_coloured = min(len(groups), OVERVIEW_COLOURS)
        n_scores, overview = read_points(
            projected, key, groups, n_coloured, group_points, overview_points
        )
    return RunOutput(
        output_dir=output_dir,
        summary=summary,
        features=features,
        key=key,
        n_groups=n_groups,
        groups=groups,
        listed=listed,
        n_scores=n_scores,
        overview=overview if n_groups > 1 else None,
        has_projected=projected is not None,
    )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends import backend_agg  # noqa: F401
    except ImportError as exc:
        raise ReportError(MATPLOTLIB_MISSING) from exc


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The Agg canvas, never pyplot: no display, no global figure state.
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the same figure gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _text(value: str, limit: int = 40) -> str:
    """Text for matplotlib: no mathtext, no hidden legend entry, not too long.

    A long name loses its middle: names that share a prefix (``sensor_01``,
    ``sensor_02``) stay told apart by their ends.
    """
    if len(value) > limit:
        head = (limit - 1) // 2
        value = value[:head] + "\u2026" + value[len(value) - (limit - 1 - head) :]
    value = value.replace("$", r"\$")
    return " " + value if value.startswith("_") else value


def palette(n: int) -> list[str]:
    """``n`` distinct colours (at most OVERVIEW_COLOURS), as hex strings."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    name = "tab10" if n <= 10 else "tab20"
    colours = colormaps[name].colors
    if name == "tab20":
        # Dark shades first, then the light ones, so neighbours differ most.
        colours = [*colours[0::2], *colours[1::2]]
    return [to_hex(colours[i % len(colours)]) for i in range(n)]


def _marker(n: int) -> tuple[float, float]:
    """Marker area and alpha for a scatter of n points."""
    if n <= 300:
        return 18.0, 0.85
    if n <= 3_000:
        return 8.0, 0.6
    return 3.0, 0.35


def _axis_label(n: int, ratio: np.ndarray | None) -> str:
    if ratio is not None and len(ratio) >= n:
        return f"pc_{n} ({ratio[n - 1]:.1%} of variance)"
    return f"pc_{n}"


def scores_figure(group: Group, colour: str, title: str) -> str:
    """The group's pc_2 against pc_1, or a histogram of pc_1 with one axis."""
    figure = _figure(4.2, 3.7)
    axes = figure.add_subplot()
    ratio = group.explained_variance_ratio
    if group.pc_2 is not None:
        size, alpha = _marker(len(group.pc_1))
        axes.axhline(0, color="#dddddd", linewidth=0.8, zorder=0)
        axes.axvline(0, color="#dddddd", linewidth=0.8, zorder=0)
        # One group per panel: no overlap of groups to see through.
        axes.scatter(
            group.pc_1,
            group.pc_2,
            s=size,
            alpha=max(alpha, 0.8),
            color=colour,
            linewidths=0,
        )
        # Both scores are in the features' units: equal scales show the
        # true spread along each axis.
        axes.set_aspect("equal", adjustable="datalim")
        axes.set_ylabel(_axis_label(2, ratio))
    else:
        _histogram(axes, group.pc_1, colour)
        axes.set_ylabel("rows")
    axes.set_xlabel(_axis_label(1, ratio))
    axes.set_title(_text(title, 48), fontsize=10)
    return _png(figure)


def _histogram(axes, values: np.ndarray, colour: str) -> None:
    bins = min(40, max(5, int(math.sqrt(max(len(values), 1)))))
    axes.hist(values, bins=bins, color=colour, alpha=0.8)
    if 0 < len(values) <= 500:
        # A strip of the rows themselves below the bars.
        axes.plot(
            values,
            np.zeros_like(values),
            "|",
            color="black",
            alpha=0.5,
            markersize=8,
        )


def overview_figure(run: RunOutput, colours: list[str]) -> str:
    """All groups' scores in one panel, the largest coloured, the rest grey."""
    overview = run.overview
    n_coloured = len(colours)
    n_grey = run.n_groups - n_coloured
    figure = _figure(9.0, 6.0)
    axes = figure.add_subplot()
    grey = overview.group < 0
    size, alpha = _marker(len(overview.pc_1))
    if overview.pc_2 is not None:
        _overview_scatter(axes, run, colours, size, alpha)
    else:
        _overview_histogram(axes, run, colours)
    if grey.any():
        # The grey rows stand for many groups; their legend entry says so.
        label = f"{n_grey:,} other groups (grey)"
        axes.plot([], [], "o", color=_GREY, markersize=5, label=label)
    legend = axes.legend(
        title=_text(run.key or "group", 28),
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([30.0])
    axes.set_title("All groups", fontsize=11)
    return _png(figure)


def _overview_scatter(axes, run: RunOutput, colours, size: float, alpha: float):
    from matplotlib.patches import Ellipse

    overview = run.overview
    grey = overview.group < 0
    axes.axhline(0, color="#dddddd", linewidth=0.8, zorder=0)
    axes.axvline(0, color="#dddddd", linewidth=0.8, zorder=0)
    if grey.any():
        axes.scatter(
            overview.pc_1[grey],
            overview.pc_2[grey],
            s=max(1.0, size / 2),
            alpha=0.25,
            color=_GREY,
            linewidths=0,
            zorder=1,
        )
    # The largest first, so that smaller groups are drawn on top of them.
    for position, colour in enumerate(colours):
        mine = overview.group == position
        pc_1, pc_2 = overview.pc_1[mine], overview.pc_2[mine]
        if not len(pc_1):
            continue
        axes.scatter(
            pc_1,
            pc_2,
            s=max(size, 6.0),
            alpha=max(alpha, 0.6),
            color=colour,
            linewidths=0,
            zorder=2,
            label=_text(run.groups[position].label, 28),
        )
        if len(pc_1) >= 3:
            # Where the points pile up at 0, the outline of two standard
            # deviations still tells the groups' spreads apart.
            axes.add_patch(
                Ellipse(
                    (0.0, 0.0),
                    4.0 * float(np.std(pc_1)),
                    4.0 * float(np.std(pc_2)),
                    fill=False,
                    edgecolor=colour,
                    linewidth=1.4,
                    zorder=3,
                )
            )
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_xlabel("pc_1 (each group on its own axes)")
    axes.set_ylabel("pc_2")


def _overview_histogram(axes, run: RunOutput, colours) -> None:
    overview = run.overview
    grey = overview.group < 0
    values = overview.pc_1
    edges = np.histogram_bin_edges(values, bins=min(60, max(10, len(values) // 20)))
    if grey.any():
        axes.hist(values[grey], bins=edges, color=_GREY, alpha=0.6)
    for position, colour in enumerate(colours):
        if not (overview.group == position).any():
            continue
        axes.hist(
            values[overview.group == position],
            bins=edges,
            histtype="step",
            linewidth=1.6,
            color=colour,
            label=_text(run.groups[position].label, 28),
        )
    axes.set_xlabel("pc_1 (each group on its own axis)")
    axes.set_ylabel("rows drawn")


def scree_figure(group: Group, n_features: int, colour: str) -> str:
    """Bars of the kept axes' explained-variance ratios and their running sum."""
    ratio = group.explained_variance_ratio
    k = len(ratio)
    figure = _figure(max(3.9, 0.32 * k + 2.0), 3.7)
    axes = figure.add_subplot()
    positions = np.arange(1, k + 1)
    axes.bar(positions, ratio, color=colour, alpha=0.85, label="each axis")
    cumulative = np.cumsum(ratio)
    axes.plot(
        positions,
        cumulative,
        marker="o",
        color="#333333",
        linewidth=1.5,
        markersize=4,
        label="cumulative",
    )
    if k <= 10:
        for x, y in zip(positions, cumulative, strict=True):
            axes.annotate(
                f"{y:.0%}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_ylim(0, 1.12)
    if k <= 12:
        axes.set_xticks(positions, [f"pc_{i}" for i in positions])
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(0.4, k + 0.6)
    axes.set_xlabel(f"principal axis ({k} of {n_features} kept)")
    axes.set_ylabel("explained variance ratio")
    # Above the axes, where no bar or point can be.
    axes.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    return _png(figure)


def correlation_figure(correlation: np.ndarray, features: list[str]) -> str:
    """The correlation matrix as a heat map; NaN cells grey and hatched."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    n = len(features)
    side = min(max(3.7, 0.28 * n + 2.4), 9.0)
    figure = _figure(side + 0.9, side)
    axes = figure.add_subplot()
    colour_map = colormaps["RdBu_r"].with_extremes(bad=_NAN_COLOUR)
    image = axes.imshow(
        np.ma.masked_invalid(correlation), cmap=colour_map, vmin=-1.0, vmax=1.0
    )
    for i, j in zip(*np.nonzero(np.isnan(correlation)), strict=True):
        axes.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                fill=False,
                hatch="//",
                edgecolor="#888888",
                linewidth=0,
            )
        )
    if n <= ANNOTATE_FEATURES:
        for (i, j), value in np.ndenumerate(correlation):
            text = "NaN" if np.isnan(value) else f"{value:.2f}"
            dark = not np.isnan(value) and abs(value) > 0.6
            axes.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=9 if n <= 6 else 7,
                color="white" if dark else "black",
            )
    step = max(1, math.ceil(n / 40))
    ticks = np.arange(0, n, step)
    labels = [_text(features[i], 24) for i in ticks]
    size = 9 if n <= 12 else 7 if n <= 25 else 6
    axes.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels)
    axes.tick_params(labelsize=size)
    figure.colorbar(image, ax=axes, shrink=0.8, label="Pearson correlation")
    axes.set_title("Correlation", fontsize=10)
    return _png(figure)


def _img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure_block(image: str, caption: str = "") -> str:
    note = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{image}{note}</figure>"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in pairs)


def _by_reason(what: str, counts: Any) -> list[tuple[str, str]]:
    if not isinstance(counts, dict) or not counts:
        return [(f"{what} left out", "none")]
    return [
        (f"{what} left out: {html.escape(str(reason))}", _number(n))
        for reason, n in sorted(counts.items())
    ]


def summary_section(run: RunOutput) -> str:
    """Tables of the summary's figures, the configuration and the versions."""
    summary = run.summary
    rows = [
        ("rows read", _number(summary.get("rows_read", "?"))),
        ("rows projected", _number(summary.get("rows_projected", "?"))),
        *_by_reason("rows", summary.get("rows_left_out")),
        ("groups written", _number(summary.get("groups_written", "?"))),
        *_by_reason("groups", summary.get("groups_left_out")),
        ("seconds", _number(summary.get("seconds", "?"))),
    ]

    check = ""
    left_out = summary.get("rows_left_out") or {}
    figures = (summary.get("rows_read"), summary.get("rows_projected"))
    if all(isinstance(v, int) for v in figures) and isinstance(left_out, dict):
        accounted = figures[1] + sum(int(v) for v in left_out.values())
        if run.has_projected and accounted != figures[0]:
            check = (
                f'<p class="warn">rows projected plus rows left out make '
                f"{accounted:,}, not the {figures[0]:,} rows read.</p>"
            )

    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    config_rows = [
        (html.escape(str(name)), html.escape(_setting(name, value)))
        for name, value in sorted(config.items())
    ]
    versions = summary.get("versions")
    versions = versions if isinstance(versions, dict) else {}
    version_rows = [
        (html.escape(str(name)), html.escape(str(value)))
        for name, value in sorted(versions.items())
    ]
    return (
        '<section><h2>Run summary</h2><div class="tables">'
        f"<table><caption>Rows and groups</caption>{_rows(rows)}</table>"
        f"<table><caption>Configuration</caption>{_rows(config_rows)}</table>"
        f"<table><caption>Versions</caption>{_rows(version_rows)}</table>"
        f"</div>{check}</section>"
    )


def _setting(name: str, value: Any) -> str:
    if value is None and name == "key":
        return "none (one global group)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _nan_note(correlation: np.ndarray, features: list[str]) -> str:
    """What the NaN cells of a correlation heat map mean; empty without any."""
    if not np.isnan(correlation).any():
        return ""
    diagonal = np.diag(correlation)
    flat = [name for name, v in zip(features, diagonal, strict=True) if np.isnan(v)]
    cells = '<span class="nan">Grey hatched cells</span> are NaN'
    if not flat:
        return f"{cells}: the correlation is undefined there."
    names = ", ".join(html.escape(name) for name in flat)
    verb, its = ("has", "its") if len(flat) == 1 else ("have", "their")
    return (
        f"{cells}: {names} {verb} zero variance in this group, so {its} "
        "correlations are undefined."
    )


def _diagnostics_note(diagnostics: dict[str, Any]) -> str:
    """The basis's checks, for the facts line under a group's heading."""
    note = ""
    if diagnostics.get("rank") is not None:
        note += f" &middot; rank {diagnostics['rank']}"
    condition = diagnostics.get("condition_number")
    if condition is not None:
        shown = "infinite" if math.isinf(condition) else f"{condition:.3g}"
        note += f" &middot; condition number {shown}"
    if diagnostics.get("tied_at_cut"):
        note += (
            '<br><span class="warn">The last kept and the first dropped '
            "eigenvalue tie: the kept axes are not unique.</span>"
        )
    return note


def group_section(run: RunOutput, group: Group, colour: str) -> str:
    """One group's heading, figures and their notes."""
    if run.key:
        title = f"{run.key} = {group.label}"
    else:
        title = "All rows (one global group)"
    ratio = group.explained_variance_ratio
    facts = (
        f"n_rows {group.n_rows:,} &middot; {group.n_components} of "
        f"{len(run.features)} axes kept &middot; {float(np.sum(ratio)):.1%} of the "
        "variance explained"
    )
    facts += _diagnostics_note(group.diagnostics)

    figures = []
    if run.has_projected and len(group.pc_1):
        drawn = len(group.pc_1)
        note = (
            f"{drawn:,} of {group.n_projected:,} rows drawn (a seeded sample)"
            if drawn < group.n_projected
            else f"all {drawn:,} rows"
        )
        if group.pc_2 is None:
            note += "; one axis, so a histogram of pc_1"
        figures.append(
            _figure_block(
                _img(scores_figure(group, colour, title), f"scores of {title}"),
                html.escape(note),
            )
        )
    elif run.has_projected:
        figures.append(_figure_block("", "no rows of this group in projected/"))
    figures.append(
        _figure_block(
            _img(
                scree_figure(group, len(run.features), colour),
                f"explained variance of {title}",
            )
        )
    )
    note = _nan_note(group.correlation, run.features)
    figures.append(
        _figure_block(
            _img(
                correlation_figure(group.correlation, run.features),
                f"correlation of {title}",
            ),
            note,
        )
    )
    return (
        f'<section class="group"><h3>{html.escape(title)}</h3>'
        f'<p class="facts">{facts}</p><div class="figures">{"".join(figures)}'
        "</div></section>"
    )


def overview_section(run: RunOutput, colours: list[str]) -> str:
    """The all-groups panel and what it shows and leaves out."""
    overview = run.overview
    drawn = len(overview.pc_1)
    notes = [
        "Each group is projected onto its own principal axes, so every group is "
        "centred at 0 and the axes of two groups are not the same directions: "
        "the panel compares the groups' spread and shape, not their position."
    ]
    if overview.pc_2 is not None:
        notes.append(
            "Each outline reaches two standard deviations from 0 along pc_1 and "
            "pc_2 of its coloured group."
        )
    if run.n_groups > len(colours):
        notes.append(
            f"The {len(colours)} largest groups are coloured; the other "
            f"{run.n_groups - len(colours):,} are grey."
        )
    if drawn < overview.n_rows:
        notes.append(
            f"Drawn: {drawn:,} of {overview.n_rows:,} rows, a seeded sample that "
            "is the same on every run."
        )
    if overview.n_without_pc_2:
        notes.append(
            f"About {overview.n_without_pc_2:,} rows of groups that keep one "
            "axis have no pc_2 and are not in this panel."
        )
    image = _img(overview_figure(run, colours), "scores of all groups")
    return (
        '<section><h2>All groups</h2><div class="figures">'
        f"{_figure_block(image, html.escape(' '.join(notes)))}</div></section>"
    )


def _groups_note(run: RunOutput) -> str:
    shown = len(run.groups)
    if run.key is None:
        return "No key was set: all rows form one global group."
    if shown < run.n_groups:
        return (
            f"Showing the {shown:,} largest of {run.n_groups:,} groups (by "
            "n_rows); pass --max-groups to show more. All groups are listed in "
            "the table at the end."
        )
    if run.n_groups == 0:
        return "No group was written; see the groups left out above."
    return f"Showing all {run.n_groups:,} groups, largest first."


def listing_section(run: RunOutput) -> str:
    """A folded table of the groups, largest first."""
    if run.key is None or not run.listed:
        return ""
    rows = "".join(
        f"<tr><td>{rank}</td><td>{html.escape(label)}</td>"
        f'<td class="num">{n:,}</td><td class="num">{k}</td>'
        f'<td class="num">{share:.1%}</td></tr>'
        for rank, (label, n, k, share) in enumerate(run.listed, start=1)
    )
    title = f"Table of all {run.n_groups:,} groups"
    if run.n_groups > len(run.listed):
        title = f"Table of the {len(run.listed):,} largest of {run.n_groups:,} groups"
    return (
        f"<section><details><summary>{title}</summary>"
        f'<table class="list"><tr><th>#</th><th>{html.escape(run.key)}</th>'
        "<th>n_rows</th><th>axes kept</th><th>variance explained</th></tr>"
        f"{rows}</table></details></section>"
    )


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif;
  margin: 24px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px;
  margin-top: 1.6em; }
h3 { font-size: 1.1em; margin: 1.2em 0 0.2em; }
.meta, .facts, figcaption { color: #555; }
.note { font-weight: 600; }
.warn { color: #a40000; font-weight: 600; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
table { border-collapse: collapse; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
th, td { text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }
th { font-weight: 500; color: #444; }
td { font-variant-numeric: tabular-nums; }
table.list th { border-bottom: 1px solid #ccc; }
td.num { text-align: right; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; display: table; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { display: table-caption; caption-side: bottom; font-size: 0.85em;
  margin-top: 2px; }
.group { border-top: 1px solid #eee; }
.nan { background: #d0d0d0; padding: 0 3px; }
"""


def render(run: RunOutput) -> str:
    """The report page of a loaded run, as HTML text."""
    _require_matplotlib()
    coloured = min(len(run.groups), OVERVIEW_COLOURS)
    colours = palette(coloured) if run.n_groups > 1 else []
    group_colours = [
        colours[i] if i < coloured and colours else _SINGLE_COLOUR
        for i in range(len(run.groups))
    ]

    features = ", ".join(html.escape(name) for name in run.features[:_LISTED_FEATURES])
    if len(run.features) > _LISTED_FEATURES:
        features += f" and {len(run.features) - _LISTED_FEATURES:,} more"
    key = html.escape(run.key) if run.key else "none (one global group)"
    meta = (
        f"output_dir: {html.escape(str(run.output_dir))} &middot; key: {key} "
        f"&middot; {len(run.features)} features: {features}"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>PCA report: {html.escape(run.output_dir.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Per-group PCA report</h1>",
        f'<p class="meta">{meta}</p>',
        summary_section(run),
        f'<section><h2>Groups</h2><p class="note">{_groups_note(run)}</p>',
    ]
    if not run.has_projected:
        parts.append(
            "<p>This run wrote no projected/ (fit only): no scatter of the scores.</p>"
        )
    if run.n_scores == 1:
        parts.append(
            "<p>The run keeps one axis: the scores are drawn as histograms of pc_1.</p>"
        )
    parts.append("</section>")
    if run.overview is not None and len(run.overview.pc_1):
        parts.append(overview_section(run, colours[:coloured]))
    if run.groups:
        heading = "<h2>Each group</h2>" if run.key else ""
        parts.append(f"<section>{heading}")
        parts += [
            group_section(run, group, colour)
            for group, colour in zip(run.groups, group_colours, strict=True)
        ]
        parts.append("</section>")
    parts += [listing_section(run), "</body></html>", ""]
    return "\n".join(part for part in parts if part)


def build_report(
    output_dir: str | Path,
    out: str | Path | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    group_points: int = GROUP_POINTS,
    overview_points: int = OVERVIEW_POINTS,
) -> Path:
    """Write the report page of one run's output folder.

    Args:
        output_dir: the output_dir of a finished run of the stage.
        out: the HTML file to write; default ``<output_dir>/report.html``.
        max_groups: the largest this many groups (by n_rows) get figures.
        group_points: points drawn per group panel, on average; more rows
            are drawn from a seeded sample.
        overview_points: points drawn in the all-groups panel, on average.

    Returns:
        The path of the written page.

    Raises:
        ReportError: the folder is not a finished run's output, ``out``
            cannot be written, or matplotlib is missing.
        ValueError: ``max_groups`` or a points limit is below 1.
    """
    output_dir = Path(output_dir)
    for name, value in (
        ("max_groups", max_groups),
        ("group_points", group_points),
        ("overview_points", overview_points),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name}={value!r} must be a positive integer"
            raise ValueError(msg)
    target = Path(out) if out is not None else output_dir / "report.html"
    # What the user can mend in the folder is said before a missing extra.
    check_output_dir(output_dir)
    read_summary(output_dir)
    _require_matplotlib()
    if not target.parent.is_dir():
        msg = (
            f"--out={str(target)!r} is in a folder that does not exist; create "
            f"{str(target.parent)!r} first or choose another file"
        )
        raise ReportError(msg)
    if target.is_dir():
        msg = f"--out={str(target)!r} is a folder; name an HTML file instead"
        raise ReportError(msg)

    run = load(output_dir, max_groups, group_points, overview_points)
    page = render(run)

    # Written beside its place and moved there, so that a reader never sees
    # half a page.
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        msg = f"--out={str(target)!r} cannot be written: {exc}"
        raise ReportError(msg) from exc
    _LOGGER.info(
        "Wrote %s: %d of %d groups drawn", target, len(run.groups), run.n_groups
    )
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's arguments; argparse exits 2 on a malformed one."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description=(
            "An HTML page of a finished run: per group the scores, the "
            "explained variance and the correlation matrix."
        ),
    )
    parser.add_argument("output_dir", help="the output_dir of a finished run")
    parser.add_argument(
        "--out", help="the HTML file to write (default: OUTPUT_DIR/report.html)"
    )
    parser.add_argument(
        "--max-groups",
        type=int,
        default=DEFAULT_MAX_GROUPS,
        help=f"draw the largest N groups by n_rows (default: {DEFAULT_MAX_GROUPS})",
    )
    parser.add_argument("--log-level", default="INFO", help="default: INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the report page; returns the exit status (0, 1 or 2)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.max_groups < 1:
        print(
            f"error: --max-groups={args.max_groups} must be at least 1",
            file=sys.stderr,
        )
        return 2
    try:
        build_report(args.output_dir, args.out, args.max_groups)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        _LOGGER.debug("Report failed", exc_info=True)
        text = " ".join(str(exc).split())
        print(
            f"error: the report failed: {type(exc).__name__}: {text}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
