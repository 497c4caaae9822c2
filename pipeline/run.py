"""Command line: ``python -m pipeline.run --config configs/iris.yaml [...]``.

Settings of the config file can be overridden by flags; every argument that
is not the stage's own goes to Beam as a pipeline option (``--runner``,
``--direct_num_workers``, ...). Exit status: 0 on success, 2 for a bad
config or input (one line on stderr says what and how to mend it), 1 for a
failure during the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.runner import PipelineState

import pipeline
from pipeline import config as config_module
from pipeline.config import Config, ConfigError
from transforms import counters, output, progress
from transforms.errors import StageError
from transforms.inputs import list_files, read_dataset, read_footer, scan_inputs

_LOGGER = logging.getLogger(__name__)


def _count_or_fraction(text: str) -> int | float:
    """An integer where the text is one (``3``), else a float (``0.95``)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


_OVERRIDES = {
    "--input": str,
    "--output-dir": str,
    "--key": str,
    "--n-components": _count_or_fraction,
    "--ddof": int,
    "--dtype": str,
    "--missing": str,
    "--block-rows": int,
    "--batch-blocks": int,
    "--n-shards": int,
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (and exit status 2)."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see python -m pipeline.run --help")


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The stage's own arguments, and the rest for Beam.

    Raises:
        ConfigError: a flag of the stage has a bad value, or an argument is
            neither the stage's nor a Beam pipeline option (a typo would
            otherwise be passed to Beam and ignored).
    """
    parser = _Parser(
        prog="python -m pipeline.run",
        description="Per-group covariance, correlation and PCA of Parquet data.",
        epilog="Other arguments are Beam pipeline options, e.g. --runner.",
    )
    parser.add_argument("--config", required=True, help="the YAML config file")
    for flag, kind in _OVERRIDES.items():
        parser.add_argument(flag, type=kind, help="overrides the config's setting")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="write into an output_dir that holds files this stage did not write",
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=_LOG_LEVELS
    )
    args, rest = parser.parse_known_args(argv)
    _check_beam_args(rest, parser)
    return args, rest


def _check_beam_args(args: list[str], parser: argparse.ArgumentParser) -> None:
    known = set(PipelineOptions([]).get_all_options(drop_default=False))
    ours = [flag for action in parser._actions for flag in action.option_strings]
    # A remote runner may register options of its own (Flink's, Spark's) that
    # are not loaded here; with one, only dashed names (the stage's style,
    # never Beam's) are checked.
    runner = PipelineOptions(args).view_as(StandardOptions).runner
    local = _local_runner(runner) is not None
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in known or not (local or "-" in name):
            continue
        close = difflib.get_close_matches(
            f"--{name}", ours + [f"--{k}" for k in known], n=1
        )
        hint = f" (did you mean {close[0]}?)" if close else ""
        msg = (
            f"argument --{name} is neither the stage's nor a Beam pipeline "
            f"option{hint}; see python -m pipeline.run --help"
        )
        raise ConfigError(msg)

    # TODO(#4): Beam's in-process multi_threading mode ran out of memory
    # (past 24 GB) on 1,000,000 rows in 200,000 groups, while one worker and
    # multi_processing ran the same job in 2.9 GB; refused until the cause is
    # found.
    mode = PipelineOptions(args).view_as(DirectOptions).direct_running_mode
    if local and mode == "multi_threading":
        msg = (
            "--direct_running_mode=multi_threading is not supported: with many "
            "groups it runs out of memory; use multi_processing (or in_memory, "
            "the default)"
        )
        raise ConfigError(msg)


def _counters(result) -> dict[str, int]:
    query = result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))
    counts: dict[str, int] = {}
    for counter in query["counters"]:
        value = (
            counter.committed if counter.committed is not None else counter.attempted
        )
        name = counter.key.metric.name
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def _by_reason(counts: dict[str, int], prefix: str) -> dict[str, int]:
    return {
        name[len(prefix) :]: value
        for name, value in sorted(counts.items())
        if name.startswith(prefix) and value
    }


def make_summary(config: Config, counts: dict[str, int], seconds: float) -> dict:
    """The figures of a finished run, as summary.json holds them."""
    return {
        "rows_read": counts.get(counters.ROWS_READ, 0),
        "rows_fitted": counts.get(counters.ROWS_FITTED, 0),
        "rows_projected": counts.get(counters.ROWS_PROJECTED, 0),
        "rows_left_out": _by_reason(counts, counters.ROWS_LEFT_OUT),
        "groups_written": counts.get(counters.GROUPS_WRITTEN, 0),
        "groups_left_out": _by_reason(counts, counters.GROUPS_LEFT_OUT),
        "seconds": round(seconds, 3),
        "config": config.to_dict(),
        "versions": {
            "stage": pipeline.__version__,
            "python": platform.python_version(),
            "apache_beam": beam.__version__,
            "tensorflow": _tensorflow_version(),
            "pyarrow": pa.__version__,
        },
    }


def _tensorflow_version() -> str:
    import tensorflow as tf

    return tf.__version__


def run(config: Config, beam_args: list[str]) -> dict:
    """Run the stage and move its outputs into place.

    Returns:
        The run's summary (also written to ``<output_dir>/summary.json``).

    Raises:
        StageError: the config does not fit the input, or the input is bad.
    """
    started = time.monotonic()
    config = absolute_paths(config)
    fits = config.mode in ("fit_transform", "fit")
    features = list(config.features) if config.features is not None else None
    if not fits:
        fitted, fit = read_fit(config)
        # A transform takes the fit's features unless told otherwise.
        if features is None:
            features = fit.get("features")
    # Weights matter to the fit only; a transform does not read them.
    spec = scan_inputs(
        config.input,
        config.key,
        features,
        list(config.passthrough),
        config.weight if fits else None,
    )
    n_features = len(spec.features)
    if (
        fits
        and isinstance(config.n_components, int)
        and config.n_components > n_features
    ):
        msg = (
            f"n_components={config.n_components} must be at most "
            f"n_features={n_features}"
        )
        raise ConfigError(msg)
    if fits:
        fitted = None
    else:
        check_fit(fitted, fit, config, spec)
    if spec.n_rows == 0:
        _LOGGER.warning("The input has no rows: the datasets will be empty")

    # TensorFlow loads here, after the config and the footers were checked,
    # so that a bad setting is reported in a second rather than ten, and
    # before output_dir is touched, so that an interrupt leaves nothing.
    from pipeline import graph
    from transforms import pca

    if config.export:
        from transforms import export

        if spec.key:
            try:
                export.key_dtype(spec.key, spec.key_type)
            except TypeError as exc:
                raise ConfigError(f"export=true: {exc}") from exc

    created = output.check_output_dir(config.output_dir, config.overwrite)
    staging = output.staging_dir(config.output_dir, uuid.uuid4().hex[:12])
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    _LOGGER.info("Running %s on %s", config.mode, runner or "DirectRunner")
    counts: dict[str, int] = {}
    names = [output.SUMMARY]
    try:
        with output.RunLock(config.output_dir):
            output.clean_leftovers(config.output_dir)
            if fits:
                counts = _run_pipeline(
                    options, runner, graph.build_fit, config, spec, staging
                )
                fitted = FileSystems.join(staging, "components")
                names.append("components")
                _LOGGER.info(
                    "Fit done: %d groups", counts.get(counters.GROUPS_WRITTEN, 0)
                )
            if config.mode != "fit":
                n_columns = _widest_basis(fitted)
                if fits and isinstance(config.n_components, int):
                    n_columns = config.n_components
                projected = _run_pipeline(
                    options,
                    runner,
                    graph.build_transform,
                    config,
                    spec,
                    fitted,
                    n_columns,
                    staging,
                )
                for name, value in projected.items():
                    counts[name] = counts.get(name, 0) + value
                names.append("projected")
            if config.export:
                bases = pca.table_to_bases(read_dataset(fitted), spec.key, n_features)
                model = FileSystems.join(staging, output.MODEL)
                export.export_saved_model(
                    bases, spec.key, list(spec.features), model, whiten=config.whiten
                )
                names.append(output.MODEL)
                _LOGGER.info("Exported the bases as a SavedModel")
            summary = make_summary(config, counts, time.monotonic() - started)
            output.write_summary(staging, summary)
            output.commit(config.output_dir, staging, names)
    except BaseException:
        output.discard([staging])
        if created and not output.children(config.output_dir):
            output.discard([config.output_dir])
        raise

    _log_summary(summary, config.output_dir)
    return summary


def absolute_paths(config: Config) -> Config:
    """The config with local paths made absolute.

    Workers of a remote or portable runner do not share the launcher's
    working folder; an absolute path means the same file to all of them.
    """
    changes = {}
    for name in ("input", "output_dir", "components"):
        path = getattr(config, name)
        if path is not None and FileSystems.get_scheme(path) is None:
            changes[name] = os.path.abspath(path)
    return dataclasses.replace(config, **changes)


def read_fit(config: Config) -> tuple[str, dict]:
    """The components folder ``mode: transform`` projects with, and its fit.

    Raises:
        ConfigError: the folder holds no components dataset, or it is inside
            this run's output_dir.
    """
    folder = config.components
    nested = FileSystems.join(folder, "components")
    if FileSystems.exists(nested):
        folder = nested
    if os.path.normpath(os.path.dirname(folder.rstrip("/"))) == os.path.normpath(
        config.output_dir
    ):
        msg = (
            f"output_dir={config.output_dir!r} holds the components this run "
            "projects with, and a run replaces all of its output_dir; write the "
            "transform's output to another folder"
        )
        raise ConfigError(msg)
    try:
        first = list_files(FileSystems.join(folder, "*.parquet"))[0]
    except StageError as exc:
        msg = f"components={config.components!r} holds no components dataset"
        raise ConfigError(msg) from exc
    metadata = read_footer(first).schema.metadata or {}
    return folder, json.loads(metadata.get(b"fit", b"{}"))


def check_fit(folder: str, fit: dict, config: Config, spec) -> None:
    """Refuse bases whose fit does not match this config and input.

    Raises:
        ConfigError: features and their order, key and its type, ddof, dtype
            or standardize differ.
    """
    expected = {
        "features": list(spec.features),
        "key": spec.key,
        "key_type": str(spec.key_type) if spec.key else None,
        "ddof": config.ddof,
        "dtype": config.dtype,
        "standardize": config.standardize,
    }
    for name, value in expected.items():
        if fit.get(name, "absent") != value:
            msg = (
                f"components at {folder} were fit with {name}={fit.get(name)!r} "
                f"but this run has {name}={value!r}; fit again or make them match"
            )
            raise ConfigError(msg)


def _run_pipeline(options, runner, build, *args) -> dict[str, int]:
    """Build one pipeline with ``build(pipeline, *args)``, run it, count.

    ``args`` are ``build``'s after the pipeline: config, spec, ...
    """
    p = beam.Pipeline(runner=_local_runner(runner), options=options)
    build(p, *args)
    result = p.run()
    step = "Fit" if build.__name__ == "build_fit" else "Transform"
    _watch(result, step, args[1].n_rows)
    result.wait_until_finish()
    return _counters(result)


def _watch(result, step: str, total_rows: int, every_s: float = 30.0) -> None:
    """Log the runner's row count while a job that runs on its own goes on.

    The in-process DirectRunner has finished when ``run()`` returns; its
    workers log their own progress.
    """
    started = time.monotonic()
    while not PipelineState.is_terminal(result.state):
        result.wait_until_finish(duration=int(every_s * 1000))
        if PipelineState.is_terminal(result.state):
            break
        try:
            done = _counters(result).get(counters.ROWS_READ, 0)
        except Exception:  # Some runners serve no metrics while running.
            continue
        elapsed = time.monotonic() - started
        _LOGGER.info("%s", progress.describe(step, done, total_rows, elapsed))


def _widest_basis(components: str) -> int:
    """The most axes any fitted group keeps (at least 1)."""
    table = read_dataset(components)
    lengths = pc.list_value_length(table.column("explained_variance"))
    widest = pc.max(lengths).as_py() if table.num_rows else None
    return int(widest or 1)


def _local_runner(name: str | None):
    """The DirectRunner as Beam's in-process FnApiRunner, or None for others.

    Beam's DirectRunner first tries to fetch the Prism runner binary from the
    internet; a batch job here needs none of it, and on a closed network the
    attempt only costs time. FnApiRunner is what it falls back to, with the
    same ``--direct_num_workers`` and ``--direct_running_mode`` options.
    """
    if name is None or name.lower() in ("directrunner", "direct"):
        return FnApiRunner()
    return None


def _log_summary(summary: dict, output_dir: str) -> None:
    _LOGGER.info(
        "Done in %.1f s: %d rows read, %d projected, %d groups written to %s",
        summary["seconds"],
        summary["rows_read"],
        summary["rows_projected"],
        summary["groups_written"],
        output_dir,
    )
    for reason, rows in summary["rows_left_out"].items():
        _LOGGER.warning("Left out %d rows: %s", rows, reason.replace("_", " "))
    for reason, groups in summary["groups_left_out"].items():
        _LOGGER.warning("Left out %d groups: %s", groups, reason.replace("_", " "))


def stage_error_message(exc: BaseException) -> str | None:
    """The message of a StageError behind ``exc``, if there is one.

    Runners wrap errors raised in workers: the DirectRunner re-raises the same
    type with the step appended, other runners only keep its text.
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, StageError):
            return re.sub(r"\s*\[while running .*$", "", str(seen).splitlines()[0])
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"(?:InputError|ConfigError|StageError): (.+)", str(exc))
    if found:
        return re.sub(r"\s*\[while running .*$", "", found.group(1))
    return None


def _is_not_stage_error(record: logging.LogRecord) -> bool:
    # Beam logs the traceback of every exception raised in a DoFn; for a bad
    # input the one line that main() prints says all there is to say.
    error = record.exc_info[1] if record.exc_info else record.msg
    return not isinstance(error, StageError)


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; Beam's copies of input errors only at DEBUG."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    beam_steps = logging.getLogger("apache_beam.runners.common")
    beam_steps.removeFilter(_is_not_stage_error)
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    if not verbose:
        beam_steps.addFilter(_is_not_stage_error)
    # Beam's own info lines (type hints, shards) are for Beam's developers.
    root_level = logging.getLogger().getEffectiveLevel()
    logging.getLogger("apache_beam").setLevel(
        logging.NOTSET if verbose else max(logging.WARNING, root_level)
    )


def failure_message(exc: BaseException) -> str:
    """One line for an unexpected failure: its type, text and Beam step."""
    text = str(exc).split("\nTraceback")[0]
    step = re.search(r"\[while running '([^']+)'\]", text)
    text = re.sub(r"\s*\[while running '[^']+'\]", "", text)
    text = " ".join(text.split())
    where = f" (in step {step.group(1)!r})" if step else ""
    if step and "ReadParquet" in step.group(1):
        where += "; a file of the input has unreadable data pages"
    return f"{type(exc).__name__}: {text}{where}"


def _stop_on_sigterm(signum, frame):
    # A scheduler's SIGTERM unwinds like Ctrl-C: staging is removed and the
    # previous output stays.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args, beam_args = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    overrides = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag in _OVERRIDES
    }
    overrides["overwrite"] = args.overwrite
    try:
        config = config_module.load(args.config, overrides)
        run(config, beam_args)
    except KeyboardInterrupt:
        print("error: interrupted; output_dir is as it was", file=sys.stderr)
        return 130
    except Exception as exc:
        if "KeyboardInterrupt" in str(exc):
            print("error: interrupted; output_dir is as it was", file=sys.stderr)
            return 130
        message = stage_error_message(exc)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return 2
        _LOGGER.debug("Run failed", exc_info=True)
        print(f"error: the run failed: {failure_message(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
