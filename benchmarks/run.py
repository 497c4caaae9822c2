"""Time the stage and its alternatives on one generated input, in one session.

Usage::

    python -m benchmarks.run --rows 2000000 --features 16 --groups 10000
    python -m benchmarks.run --smoke --work-dir /tmp/bench

Every measurement is a fresh process, started as a user starts it:

* ``stage``: ``python -m pipeline.run --config <generated yaml> --overwrite``,
  one worker (Beam's in-process runner);
* ``stage_mp2``: the same with ``--direct_num_workers=2
  --direct_running_mode=multi_processing``;
* ``numpy``, ``pandas``, ``beam``: ``python -m benchmarks.alternatives <name>``
  (see that module).

For each it records the wall time of the whole process (interpreter start and
imports included), the time the process itself reports after its imports
(``seconds`` of the stage's summary.json, or of the alternative's JSON line),
its user and system CPU time, how many cores other processes kept busy
meanwhile (the noise of a shared machine), and two memory figures:

* ``maxrss``: ``ru_maxrss`` from ``os.wait4`` of that one child, which Linux
  takes as the largest peak RSS of the child and of every descendant it has
  waited for: the biggest single process, not the sum over processes;
* ``tree_rss``: the largest sum of RSS over the child and all its descendants
  seen by sampling ``/proc`` every ``SAMPLE_SECONDS``, for runs of several
  processes (``stage_mp2``); shared pages count once per process and peaks
  shorter than the interval can be missed.

Times are medians over ``--repeats``, memory the largest over repeats. The
runs of one repeat go in turn (stage, stage_mp2, numpy, ...) so that slow
drifts of a noisy machine spread over all of them. Results go to
``<results-dir>/<name>.json`` and a table to stdout; the covariances and
components of every run are compared with those of the first stage run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks import generate

_LOGGER = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("stage", "stage_mp2", "numpy", "pandas", "beam")
REFERENCE = "stage"
SAMPLE_SECONDS = 0.25
SMOKE = {"rows": 5_000, "features": 4, "groups": 10, "repeats": 1}
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_PACKAGES = {
    "numpy": "numpy",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "apache_beam": "apache-beam",
    "tensorflow": "tensorflow-cpu",
}


def _children_of() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; ppid follows it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def tree_rss_kb(root: int) -> int:
    """Sum of the resident memory of ``root`` and all its descendants, in KiB."""
    children = _children_of()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * _PAGE_KB
        except (OSError, IndexError, ValueError):
            continue
    return total


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle and iowait rest.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def measure(
    command: list[str], cwd: str, log_prefix: str, timeout: float | None = None
) -> dict:
    """Run one command as a child and measure it.

    Returns:
        A dict with ``rc``, ``wall_s``, ``maxrss_kb``, ``tree_rss_kb``,
        ``timed_out`` and ``stdout`` (the child's standard output).
    """
    peak = [0]
    done = threading.Event()
    timed_out = [False]

    with (
        open(log_prefix + ".out", "w") as out,
        open(log_prefix + ".err", "w") as err,
    ):
        load = os.getloadavg()[0]
        busy = busy_cpu_seconds()
        started = time.perf_counter()
        # A session of its own, so that a timeout can end all its processes.
        child = subprocess.Popen(
            command, cwd=cwd, stdout=out, stderr=err, start_new_session=True
        )

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                peak[0] = max(peak[0], tree_rss_kb(child.pid))
                if timeout and time.perf_counter() - started > timeout:
                    timed_out[0] = True
                    os.killpg(child.pid, signal.SIGKILL)
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        busy = busy_cpu_seconds() - busy
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)

    with open(log_prefix + ".out", encoding="utf-8", errors="replace") as f:
        stdout = f.read()
    return {
        "rc": child.returncode,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "system_s": usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "tree_rss_kb": max(peak[0], usage.ru_maxrss),
        "timed_out": timed_out[0],
        "load_before": load,
        # Cores that other processes kept busy on average while this ran: the
        # noise of a shared machine.
        "others_cores": max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall,
        "stdout": stdout,
    }


def stage_config(path: str, input_path: str, output_dir: str, params: dict) -> None:
    """The YAML config a user would write for the generated input."""
    features = ", ".join(f"f{j}" for j in range(params["features"]))
    text = (
        "# Generated by benchmarks/run.py.\n"
        f"input: {input_path}\n"
        f"output_dir: {output_dir}\n"
        "key: key\n"
        f"features: [{features}]\n"
        "passthrough: [row_id]\n"
        "ddof: 1\n"
        f"n_components: {params['n_components']}\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@dataclasses.dataclass(frozen=True)
class Run:
    """One benchmarked command: what runs, where, and where it writes."""

    command: list[str]
    cwd: str
    output_dir: str


def commands(params: dict, work: str, stage_root: str) -> dict[str, Run]:
    """Every run, the stage's started from ``stage_root``."""
    python = sys.executable
    input_path = os.path.join(work, "input.parquet")
    config = os.path.join(work, "stage.yaml")
    stage_out = os.path.join(work, "out", "stage")
    stage_config(config, input_path, stage_out, params)
    stage = [python, "-m", "pipeline.run", "--config", config, "--overwrite"]
    mp2_out = os.path.join(work, "out", "stage_mp2")
    mp2 = [
        *stage,
        "--output-dir",
        mp2_out,
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    ]
    runs = {
        "stage": Run(stage, stage_root, stage_out),
        "stage_mp2": Run(mp2, stage_root, mp2_out),
    }
    features = ",".join(f"f{j}" for j in range(params["features"]))
    for name in ("numpy", "pandas", "beam"):
        out = os.path.join(work, "out", name)
        command = [python, "-m", "benchmarks.alternatives", name]
        command += ["--input", input_path, "--output-dir", out, "--key", "key"]
        command += ["--features", features]
        command += ["--n-components", str(params["n_components"])]
        runs[name] = Run(command, ROOT, out)
    return runs


def stage_snapshot(ref: str, work: str) -> str:
    """The stage's packages at a git ref, extracted under ``work``.

    Others may edit the working tree while a benchmark runs; a snapshot keeps
    every repeat on the same code.

    Raises:
        ValueError: git cannot resolve or extract ``ref``.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        msg = f"--stage-ref={ref!r} is not a commit: {exc.stderr.strip()}"
        raise ValueError(msg) from exc
    target = os.path.join(work, "stage-src", commit[:12])
    if not os.path.isdir(target):
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        archive = subprocess.run(
            ["git", "archive", commit, "pipeline", "transforms"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", partial], input=archive, check=True)
        os.replace(partial, target)
    return target


def tail(log_prefix: str, n_lines: int = 15) -> str:
    """The last lines of a run's standard error."""
    try:
        with open(log_prefix + ".err", encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n_lines:])
    except OSError:
        return ""


def inner_seconds(name: str, output_dir: str, stdout: str) -> float | None:
    """The time the run reports itself, after its imports."""
    try:
        if name.startswith("stage"):
            with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
                return float(json.load(f)["seconds"])
        return float(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def ensure_input(work: str, params: dict) -> str:
    """Generate the input unless the work folder holds one of the same params."""
    path = os.path.join(work, "input.parquet")
    wanted = {k: params[k] for k in ("rows", "features", "groups", "skew", "seed")}
    wanted["row_group_rows"] = params["row_group_rows"]
    sidecar = path + ".json"
    try:
        with open(sidecar, encoding="utf-8") as f:
            found = json.load(f)
        if all(found.get(k) == v for k, v in wanted.items()) and os.path.exists(path):
            _LOGGER.info("Reusing %s", path)
            return path
    except (OSError, ValueError):
        pass
    info = generate.generate(
        path,
        params["rows"],
        params["features"],
        params["groups"],
        params["skew"],
        params["seed"],
        params["row_group_rows"],
    )
    with open(sidecar, "w", encoding="utf-8") as f:
        json.dump(info, f)
    return path


def to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column of nested float lists of equal lengths as one ndarray."""
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        flat = pc.list_flatten(array)
        shape.append(len(flat) // max(len(array), 1))
        array = flat
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def read_components(output_dir: str) -> dict[str, np.ndarray]:
    """A components dataset as arrays sorted by key."""
    table = pq.read_table(os.path.join(output_dir, "components"))
    table = table.sort_by("key")
    return {
        "key": table.column("key").to_numpy(),
        "n_rows": table.column("n_rows").to_numpy(),
        "covariance": to_numpy(table.column("covariance")),
        "components": to_numpy(table.column("components")),
    }


# An axis whose eigenvalue lies closer than this (relative to the group's
# largest) to another has no unique direction: rank-deficient groups, such as
# two rows in eight features, leave the later axes to round-off.
GAP_RTOL = 1e-8


def distinct_axes(covariance: np.ndarray, n_components: int) -> np.ndarray:
    """Which of the top axes of each group have a well separated eigenvalue.

    Returns:
        bool, shape (n_groups, n_components).
    """
    eigenvalues = np.linalg.eigvalsh(covariance)[:, ::-1]
    scale = np.maximum(np.abs(eigenvalues[:, :1]), np.finfo(float).tiny)
    gaps = np.abs(np.diff(eigenvalues, axis=1)) / scale
    before = np.pad(gaps, ((0, 0), (1, 0)), constant_values=np.inf)
    after = np.pad(gaps, ((0, 0), (0, 1)), constant_values=np.inf)
    distinct = np.minimum(before, after) > GAP_RTOL
    return distinct[:, :n_components]


def compare(found: dict, expected: dict) -> dict:
    """Largest relative differences of covariance and components, per group.

    A covariance difference is relative to the largest absolute entry of the
    expected group's matrix. Components are compared up to the sign of each
    axis, and only on axes whose eigenvalue is distinct (``distinct_axes``);
    the others are counted in ``axes_not_compared``.
    """
    if not np.array_equal(found["key"], expected["key"]):
        return {"same_groups": False}
    scale = np.abs(expected["covariance"]).max(axis=(1, 2), keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    covariance = np.abs(found["covariance"] - expected["covariance"]) / scale
    distinct = distinct_axes(expected["covariance"], expected["components"].shape[1])
    sign = np.sign((found["components"] * expected["components"]).sum(axis=-1))
    components = np.abs(found["components"] * sign[..., None] - expected["components"])
    components = np.where(distinct[..., None], components, 0.0)
    return {
        "same_groups": True,
        "same_n_rows": bool(np.array_equal(found["n_rows"], expected["n_rows"])),
        "covariance_rel": float(covariance.max(initial=0.0)),
        "components_abs": float(components.max(initial=0.0)),
        "axes_not_compared": int((~distinct).sum()),
    }


def source_state() -> dict:
    """The commit of the working tree and whether the stage's code differs."""
    state = {}
    for field, command in (
        ("commit", ["git", "rev-parse", "HEAD"]),
        ("changed", ["git", "status", "--porcelain", "pipeline", "transforms"]),
    ):
        try:
            done = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, check=True
            )
            state[field] = done.stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            state[field] = None
    if state["changed"] is not None:
        state["changed"] = state["changed"].splitlines()
    return state


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name, package in _PACKAGES.items():
        try:
            found[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict, names: list[str]) -> None:
    """Medians, peaks and ratios to the reference run, in place."""
    for name in names:
        entry = results[name]
        ok = [m for m in entry["measurements"] if m["rc"] == 0]
        entry["ok"] = len(ok) == len(entry["measurements"]) and bool(ok)
        entry["wall_s_median"] = _median([m["wall_s"] for m in ok])
        entry["inner_s_median"] = _median([m["inner_s"] for m in ok])
        entry["cpu_s_median"] = _median([m["user_s"] + m["system_s"] for m in ok])
        entry["others_cores_median"] = _median([m["others_cores"] for m in ok])
        entry["maxrss_mb"] = max((m["maxrss_kb"] for m in ok), default=0) / 1024
        entry["tree_rss_mb"] = max((m["tree_rss_kb"] for m in ok), default=0) / 1024
    reference = results.get(REFERENCE)
    for name in names:
        entry = results[name]
        for field, ratio in (
            ("wall_s_median", "wall_ratio"),
            ("inner_s_median", "inner_ratio"),
            ("cpu_s_median", "cpu_ratio"),
            ("maxrss_mb", "rss_ratio"),
        ):
            base = reference and reference.get(field)
            value = entry.get(field)
            entry[ratio] = value / base if base and value is not None else None


def _cell(value, fmt: str) -> str:
    """``value`` in ``fmt`` (width first, as "8.2f"), or a dash as wide."""
    if value is None:
        return "-".rjust(int(fmt.split(".")[0]))
    return format(value, fmt)


def table(results: dict, names: list[str]) -> str:
    header = (
        f"{'run':<10} {'n':>2} {'wall s':>8} {'inner s':>8} {'cpu s':>8} "
        f"{'maxrssMiB':>10} {'treeMiB':>8} {'wall/st':>8} {'cpu/st':>7} {'rss/st':>7} "
        f"{'cov rel':>9} {'comp abs':>9} {'noise':>5}"
    )
    lines = [header, "-" * len(header)]
    for name in names:
        entry = results[name]
        agreement = entry.get("agreement") or {}
        timed_out = [m for m in entry["measurements"] if m["timed_out"]]
        status = "" if entry["ok"] else "  FAILED (see logs)"
        if timed_out:
            status = f"  TIMED OUT after {timed_out[0]['wall_s']:.0f} s"
        lines.append(
            f"{name:<10} {len(entry['measurements']):2d} "
            f"{_cell(entry['wall_s_median'], '8.2f')} "
            f"{_cell(entry['inner_s_median'], '8.2f')} "
            f"{_cell(entry['cpu_s_median'], '8.2f')} "
            f"{entry['maxrss_mb']:10.0f} {entry['tree_rss_mb']:8.0f} "
            f"{_cell(entry['wall_ratio'], '8.2f')} "
            f"{_cell(entry['cpu_ratio'], '7.2f')} "
            f"{_cell(entry['rss_ratio'], '7.2f')} "
            f"{_cell(agreement.get('covariance_rel'), '9.1e')} "
            f"{_cell(agreement.get('components_abs'), '9.1e')} "
            f"{_cell(entry['others_cores_median'], '5.1f')}{status}"
        )
    return "\n".join(lines)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a generated input (shared with benchmarks.profile)."""
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row-group-rows", type=int, default=262_144)
    parser.add_argument("--n-components", type=int, default=2)


def check_input_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """One-line errors (exit 2) for sizes no input can have."""
    for name in ("rows", "features", "groups", "row_group_rows"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag}={getattr(args, name)} must be a positive integer")
    if args.n_components < 1:
        parser.error(f"--n-components={args.n_components} must be at least 1")
    if not 0 <= args.skew <= 1:
        parser.error(f"--skew={args.skew} must be between 0 and 1")
    if args.n_components > args.features:
        parser.error(
            f"--n-components={args.n_components} must be at most "
            f"--features={args.features}"
        )


def input_params(args: argparse.Namespace) -> dict:
    """The generated input's parameters, as ``ensure_input`` takes them."""
    names = ("rows", "features", "groups", "skew", "seed", "row_group_rows")
    return {name: getattr(args, name) for name in (*names, "n_components")}


def sizes_name(args: argparse.Namespace) -> str:
    """The work folder's and results file's name for a set of sizes."""
    return f"r{args.rows}_f{args.features}_g{args.groups}_s{args.skew:g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument(
        "--once",
        help="comma-separated runs to measure in the first repeat only (slow ones)",
    )
    parser.add_argument(
        "--work-dir",
        default=os.path.join(ROOT, "benchmarks", "work"),
        help="inputs, outputs and logs (default: benchmarks/work/, git-ignored)",
    )
    parser.add_argument(
        "--results-dir",
        help="where <name>.json goes (default: benchmarks/results/, or "
        "<work-dir>/results/ with --smoke)",
    )
    parser.add_argument("--name", help="results file name (default: from the sizes)")
    parser.add_argument(
        "--timeout", type=float, help="seconds after which one run is killed"
    )
    parser.add_argument(
        "--stage-ref",
        help="run the stage's pipeline/ and transforms/ as of this git ref "
        "(extracted into the work folder) instead of the working tree",
    )
    parser.add_argument(
        "--recompare",
        action="store_true",
        help="run nothing: compare the outputs left by the last run of this name "
        "again and rewrite its results",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run: 5,000 rows, 4 features, 10 groups, 1 repeat",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        # A smoke run has fixed sizes; a size given with it would be ignored.
        given = [
            name for name in SMOKE if getattr(args, name) != parser.get_default(name)
        ]
        if given:
            flag = "--" + given[0].replace("_", "-")
            parser.error(f"--smoke sets its own sizes; drop {flag}")
        for name, value in SMOKE.items():
            setattr(args, name, value)
    check_input_arguments(parser, args)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be a positive integer")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout={args.timeout} must be a positive number of seconds")
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        parser.error(f"--only names {unknown[0]!r}; expected some of {RUNS}")
    args.names = names
    args.once = args.once.split(",") if args.once else []
    unknown = [name for name in args.once if name not in RUNS]
    if unknown:
        parser.error(f"--once names {unknown[0]!r}; expected some of {RUNS}")
    if args.name is None and args.smoke:
        args.name = "smoke"
    elif args.name is None:
        args.name = sizes_name(args)
    return args


def results_folder(args: argparse.Namespace) -> str:
    """Where the results JSON goes: ``--results-dir``, else the repository's
    ``benchmarks/results/``; a smoke run's figures are not worth keeping beside
    the real ones, so they go under the work folder."""
    if args.results_dir:
        return args.results_dir
    if args.smoke:
        return os.path.join(args.work_dir, "results")
    return os.path.join(ROOT, "benchmarks", "results")


def measure_all(args: argparse.Namespace, runs: dict[str, Run], work: str) -> dict:
    """Every repeat of every run named in ``args``, in turn."""
    results = {
        name: {**dataclasses.asdict(runs[name]), "measurements": []}
        for name in args.names
    }
    for repeat in range(args.repeats):
        for name in args.names:
            if repeat > 0 and name in args.once:
                continue
            run = runs[name]
            shutil.rmtree(run.output_dir, ignore_errors=True)
            log = os.path.join(work, "logs", f"{name}.{repeat}")
            _LOGGER.info("Repeat %d/%d: %s", repeat + 1, args.repeats, name)
            m = measure(run.command, run.cwd, log, args.timeout)
            m["inner_s"] = inner_seconds(name, run.output_dir, m.pop("stdout"))
            m["log"] = log
            results[name]["measurements"].append(m)
            state = "timed out" if m["timed_out"] else f"rc={m['rc']}"
            _LOGGER.info(
                "  %s: %.2f s wall, %.2f s cpu, %.0f MiB maxrss, %.0f MiB tree, "
                "others kept %.1f cores busy (%s)",
                name,
                m["wall_s"],
                m["user_s"] + m["system_s"],
                m["maxrss_kb"] / 1024,
                m["tree_rss_kb"] / 1024,
                m["others_cores"],
                state,
            )
            if m["rc"] != 0:
                _LOGGER.warning("  %s failed; end of %s.err:\n%s", name, log, tail(log))
    return results


def agree(results: dict, names: list[str]) -> str | None:
    """Compare every successful run's components with the first one's."""
    compared = [name for name in names if results[name]["ok"]]
    if not compared:
        return None
    expected = read_components(results[compared[0]]["output_dir"])
    for name in compared:
        found = read_components(results[name]["output_dir"])
        results[name]["agreement"] = compare(found, expected)
    return compared[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    work = os.path.abspath(os.path.join(args.work_dir, args.name))
    results_dir = results_folder(args)
    path = os.path.join(results_dir, f"{args.name}.json")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.makedirs(results_dir, exist_ok=True)

    if args.recompare:
        # The outputs of the last repeat are still in the work folder.
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        names = list(report["runs"])
        report["agreement_reference"] = agree(report["runs"], names)
        params = report["params"]
    else:
        params = {**input_params(args), "repeats": args.repeats, "once": args.once}
        input_path = ensure_input(work, params)
        source = source_state()
        if args.stage_ref:
            try:
                stage_root = stage_snapshot(args.stage_ref, work)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            source["stage_ref"] = args.stage_ref
            source["stage_commit"] = os.path.basename(stage_root)
        else:
            stage_root = ROOT
        source["stage_root"] = stage_root
        names = args.names
        results = measure_all(args, commands(params, work, stage_root), work)
        summarise(results, names)
        report = {
            "name": args.name,
            "params": params,
            "input": {"path": input_path, "bytes": os.path.getsize(input_path)},
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "versions": versions(),
            "source": source,
            "reference": REFERENCE,
            "agreement_reference": agree(results, names),
            "sample_seconds": SAMPLE_SECONDS,
            "runs": results,
        }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    results = report["runs"]
    print(
        f"{args.name}: {params['rows']} rows, {params['features']} features, "
        f"{params['groups']} groups, skew {params['skew']:g}, "
        f"{params['repeats']} repeat(s), {report['cpu_count']} cores"
    )
    print(table(results, names))
    print(f"results: {path}")
    return 0 if all(results[name]["ok"] for name in names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
