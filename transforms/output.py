"""Write the output datasets to a staging place and move them in at the end.

A run writes under ``<output_dir>/.staging-<run_id>/`` and only when the whole
pipeline has succeeded are the datasets moved to their final names, through
Beam's filesystems. A run that fails or is killed leaves the previous output
as it was.
"""

from __future__ import annotations

import json
import logging
import os

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from transforms.errors import InputError

_LOGGER = logging.getLogger(__name__)

DATASETS = ("components", "projected")
SUMMARY = "summary.json"
MODEL = "saved_model"
# Written by ``python -m pipeline.report`` into the output; it describes one
# run, so a new run removes it with the rest.
REPORT = "report.html"
_STAGING_PREFIX = ".staging-"
_LOCK = ".stage.lock"
_PREVIOUS_PREFIX = ".previous-"


class WriteDataset(beam.PTransform):
    """PCollection of Arrow tables -> Parquet files of one dataset.

    Args:
        directory: the dataset's folder (under the staging place).
        schema: the schema every table has.
    """

    def __init__(self, directory: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._schema = schema

    def expand(self, pcoll):
        return pcoll | beam.io.WriteToParquetBatched(
            FileSystems.join(self._directory, "part"),
            schema=self._schema,
            codec="snappy",
            file_name_suffix=".parquet",
        )


def staging_dir(output_dir: str, run_id: str) -> str:
    return FileSystems.join(output_dir, _STAGING_PREFIX + run_id)


def children(directory: str) -> list[str]:
    """Paths directly under a directory (local or remote)."""
    if not FileSystems.exists(directory):
        return []
    pattern = FileSystems.join(directory, "*")
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if FileSystems.get_scheme(directory) is None:
        # Local globbing skips dot-files; the staging folders start with one.
        paths = [os.path.join(directory, name) for name in os.listdir(directory)]
    return sorted(paths)


def _is_own(name: str) -> bool:
    return (
        name in DATASETS
        or name in (SUMMARY, MODEL, REPORT)
        or name == _LOCK
        or name.startswith((_STAGING_PREFIX, _PREVIOUS_PREFIX))
    )


def check_output_dir(output_dir: str, overwrite: bool) -> bool:
    """Refuse an output folder that holds files this stage did not write.

    Returns:
        Whether the folder was created here (a failed run removes it again).

    Raises:
        InputError: the path is a file, a foreign file is there and
            ``overwrite`` is False, or the folder cannot be written.
    """
    if FileSystems.get_scheme(output_dir) is None and os.path.isfile(output_dir):
        msg = f"output_dir={output_dir!r} is a file; expected a folder"
        raise InputError(msg)
    entries = [os.path.basename(path.rstrip("/")) for path in children(output_dir)]
    foreign = [name for name in entries if not _is_own(name)]
    if foreign and not overwrite:
        msg = (
            f"output_dir={output_dir!r} holds files this stage did not write "
            f"({', '.join(foreign[:3])}); choose an empty or new folder, or pass "
            "--overwrite to write beside them"
        )
        raise InputError(msg)
    created = not FileSystems.exists(output_dir)
    try:
        FileSystems.mkdirs(output_dir)
    except OSError as exc:
        if not FileSystems.exists(output_dir):
            msg = f"output_dir={output_dir!r} cannot be created: {exc}"
            raise InputError(msg) from exc
    probe = FileSystems.join(output_dir, _STAGING_PREFIX + "probe")
    try:
        FileSystems.create(probe).close()
        FileSystems.delete([probe])
    except Exception as exc:  # Each filesystem raises its own error types.
        msg = f"output_dir={output_dir!r} is not writable: {exc}"
        raise InputError(msg) from exc
    return created


def clean_leftovers(output_dir: str) -> None:
    """Clean up after killed runs; call it holding the ``RunLock``.

    Outputs that a run killed mid-commit had moved aside but not replaced
    are moved back; staging folders are removed.
    """
    entries = [os.path.basename(path.rstrip("/")) for path in children(output_dir)]
    for name in entries:
        if name.startswith(_PREVIOUS_PREFIX):
            _restore(output_dir, FileSystems.join(output_dir, name))
    stale = [
        FileSystems.join(output_dir, name)
        for name in entries
        if name.startswith((_STAGING_PREFIX, _PREVIOUS_PREFIX))
    ]
    stale = [path for path in stale if FileSystems.exists(path)]
    if stale:
        _LOGGER.warning("Removing %d leftover(s) of earlier runs", len(stale))
        FileSystems.delete(stale)


def _restore(output_dir: str, previous: str) -> None:
    """Move back outputs that a run killed mid-commit had moved aside."""
    for path in children(previous):
        name = os.path.basename(path.rstrip("/"))
        if not _exists(output_dir, name):
            _LOGGER.warning("Restoring %s of the last good run", name)
            _move(path.rstrip("/"), FileSystems.join(output_dir, name))


class RunLock:
    """One run at a time in a local output_dir: a lock file with the PID.

    A lock whose process no longer runs (a killed run) is taken over. Object
    stores get no lock: schedule runs into one output_dir one at a time.

    Raises:
        InputError: on entry, when another live run holds the lock.
    """

    def __init__(self, output_dir: str):
        self._path = None
        if FileSystems.get_scheme(output_dir) is None:
            self._path = os.path.join(output_dir, _LOCK)

    def __enter__(self) -> RunLock:
        if self._path is None:
            return self
        for _ in range(2):
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _lock_holder(self._path)
                if holder is not None:
                    msg = (
                        f"output_dir={os.path.dirname(self._path)!r} is being "
                        f"written by another run (process {holder}); wait for it "
                        "or choose another output_dir"
                    )
                    raise InputError(msg) from None
                os.remove(self._path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        msg = f"cannot take the lock {self._path}; remove it if no run is going on"
        raise InputError(msg)

    def __exit__(self, *exc_info) -> None:
        if self._path is not None and os.path.exists(self._path):
            os.remove(self._path)


def _lock_holder(path: str) -> int | None:
    """The PID in a lock file if that process still runs, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() else None


def write_summary(directory: str, summary: dict) -> None:
    """Write summary.json into a folder."""
    with FileSystems.create(FileSystems.join(directory, SUMMARY)) as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")


def _move(source: str, destination: str) -> None:
    """Move a file, or a folder of files, to another name."""
    if FileSystems.get_scheme(source) is None or source.endswith((".json", ".html")):
        # A local folder moves in one rename: readers see all or nothing.
        FileSystems.rename([source], [destination])
        return
    # Object stores have no folders: move the files one by one, those of
    # sub-folders (a SavedModel's variables/) too; "**" crosses "/".
    pattern = FileSystems.join(source, "**")
    files = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    prefix = source.rstrip("/") + "/"
    targets = [FileSystems.join(destination, f[len(prefix) :]) for f in files]
    FileSystems.rename(files, targets)


def commit(output_dir: str, staging: str, names: list[str]) -> None:
    """Replace the outputs in ``output_dir`` by those under ``staging``.

    The previous outputs are first moved aside, then the new ones moved in,
    then the old ones deleted, so that no reader sees a mix of two runs.
    """
    previous = staging.replace(_STAGING_PREFIX, _PREVIOUS_PREFIX)
    owned = (*DATASETS, SUMMARY, MODEL, REPORT)
    old = [name for name in owned if _exists(output_dir, name)]
    if old:
        FileSystems.mkdirs(previous)
        for name in old:
            _move(FileSystems.join(output_dir, name), FileSystems.join(previous, name))
    for name in names:
        _move(FileSystems.join(staging, name), FileSystems.join(output_dir, name))
    discard([staging, previous])


def _exists(directory: str, name: str) -> bool:
    return FileSystems.exists(FileSystems.join(directory, name))


def discard(paths: list[str]) -> None:
    """Delete folders that exist, ignoring those that do not."""
    existing = [path for path in paths if FileSystems.exists(path)]
    if existing:
        FileSystems.delete(existing)
