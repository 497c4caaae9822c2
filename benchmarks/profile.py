"""Profile the stage with py-spy and rank the hotspots in its own code.

Usage::

    python -m benchmarks.profile --rows 2000000 --features 16 --groups 10000 \
        --stage-ref HEAD

py-spy is not a dependency of the project; install it into the environment
first (``pip install py-spy``). The stage runs once, as ``benchmarks.run``
starts it, under ``py-spy record --subprocesses --full-filenames --function
--format raw``: every process (the workers of ``--workers 2`` included) and
every thread that is not idle is sampled ``--rate`` times a second.

The report ranks the functions of ``pipeline/`` and ``transforms/`` by
inclusive samples (a sample counts for every stage function on its stack),
and gives each as a share of the samples the run could have had on one
thread (``rate * wall seconds``), which for a run that mostly keeps one
thread busy is its share of the wall time. It also splits all samples by the
package of the innermost Python frame. The raw stacks (flamegraph's collapsed
format) and a JSON report go into the work folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

from benchmarks import run as bench

_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_PACKAGES = (
    "tensorflow",
    "apache_beam",
    "pyarrow",
    "numpy",
    "grpc",
    "google",
    "pandas",
)


def parse_frame(frame: str) -> tuple[str, str]:
    """``function (path:line)`` as (function, path); other labels as they are."""
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip(), ""
    return found.group("function"), found.group("path")


def stage_package(path: str, stage_root: str) -> str | None:
    """``pipeline`` or ``transforms`` for a file of the stage, else None."""
    relative = os.path.relpath(path, stage_root) if os.path.isabs(path) else path
    top = relative.split(os.sep, 1)[0]
    return top if top in ("pipeline", "transforms") else None


def library(path: str) -> str:
    """The package a frame's file belongs to, coarsely."""
    parts = path.split(os.sep)
    if "site-packages" in parts:
        after = parts[parts.index("site-packages") + 1 :]
        name = after[0] if after else "?"
        for package in _PACKAGES:
            if name.startswith(package):
                return package
        return name
    if "/lib/python" in path:
        return "stdlib"
    return "other"


def summarise(raw_path: str, stage_root: str) -> dict:
    """Inclusive and self samples of stage functions, samples by library."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    by_library: collections.Counter = collections.Counter()
    by_process: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            total += count
            frames = [parse_frame(frame) for frame in stack.split(";")]
            by_process[frames[0][0]] += count
            seen = set()
            for function, path in frames:
                package = stage_package(path, stage_root) if path else None
                if package:
                    relative = os.path.relpath(path, stage_root)
                    seen.add(f"{relative}:{function}")
            for name in seen:
                inclusive[name] += count
            innermost = [(fn, p) for fn, p in frames if p]
            if innermost:
                function, path = innermost[-1]
                if stage_package(path, stage_root):
                    own[f"{os.path.relpath(path, stage_root)}:{function}"] += count
                by_library[library(path)] += count
    return {
        "samples": total,
        "inclusive": dict(inclusive.most_common()),
        "self": dict(own.most_common()),
        "by_library": dict(by_library.most_common()),
        "by_process": dict(by_process.most_common()),
    }


def stage_tree(raw_path: str, stage_root: str) -> dict:
    """Samples as a tree of stage functions, library time as leaves.

    Every stack is cut down to its stage frames, in order, plus one leaf
    ``[library]`` for the innermost frame when that is not the stage's; a
    node's ``samples`` count every stack through it.
    """
    root = {"samples": 0, "children": {}}
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            path = []
            innermost = ""
            for function, file in (parse_frame(frame) for frame in stack.split(";")):
                if not file:
                    continue
                innermost = file
                if stage_package(file, stage_root):
                    name = f"{os.path.relpath(file, stage_root)}:{function}"
                    if not path or path[-1] != name:
                        path.append(name)
            if innermost and not stage_package(innermost, stage_root):
                path.append(f"[{library(innermost)}]")
            node = root
            node["samples"] += int(count)
            for name in path:
                node = node["children"].setdefault(name, {"samples": 0, "children": {}})
                node["samples"] += int(count)
    return root


def print_tree(node: dict, possible: float, threshold: float, depth: int = 0):
    children = sorted(node["children"].items(), key=lambda kv: -kv[1]["samples"])
    for name, child in children:
        share = child["samples"] / possible
        if share < threshold:
            continue
        print(f"{share:6.1%}  {'  ' * depth}{name}")
        print_tree(child, possible, threshold, depth + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.splitlines()[0]
    )
    bench.add_input_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--threshold", type=float, default=0.005, help="of the call tree's nodes"
    )
    parser.add_argument(
        "--raw", help="summarise this raw file of an earlier profile instead of a run"
    )
    parser.add_argument(
        "--work-dir", default=os.path.join(bench.ROOT, "benchmarks", "work")
    )
    parser.add_argument("--stage-ref", help="as for benchmarks.run")
    args = parser.parse_args(argv)
    bench.check_input_arguments(parser, args)

    py_spy = shutil.which("py-spy") or os.path.join(
        os.path.dirname(sys.executable), "py-spy"
    )
    if not os.path.exists(py_spy):
        print("error: py-spy is not installed; pip install py-spy", file=sys.stderr)
        return 2
    work = os.path.abspath(os.path.join(args.work_dir, bench.sizes_name(args)))
    os.makedirs(os.path.join(work, "profile"), exist_ok=True)
    params = bench.input_params(args)
    bench.ensure_input(work, params)
    stage_root = (
        bench.stage_snapshot(args.stage_ref, work) if args.stage_ref else bench.ROOT
    )
    run = bench.commands(params, work, stage_root)[
        "stage" if args.workers == 1 else "stage_mp2"
    ]

    label = f"stage_w{args.workers}"
    raw = os.path.join(work, "profile", f"{label}.txt")
    report_path = os.path.join(work, "profile", f"{label}.json")
    if args.raw:
        # Re-read an earlier profile: its wall time is in its report.
        raw = args.raw
        with open(os.path.splitext(raw)[0] + ".json", encoding="utf-8") as f:
            earlier = json.load(f)
        wall, inner = earlier["wall_s"], earlier["inner_s"]
        report_path = os.path.splitext(raw)[0] + ".json"
    else:
        shutil.rmtree(run.output_dir, ignore_errors=True)
        command = [py_spy, "record", "--rate", str(args.rate), "--subprocesses"]
        command += ["--full-filenames", "--function", "--format", "raw", "-o", raw]
        command += ["--", *run.command]
        started = time.perf_counter()
        with open(os.path.join(work, "profile", f"{label}.log"), "w") as log:
            done = subprocess.run(command, cwd=run.cwd, stdout=log, stderr=log)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(
                f"error: the profiled run failed (rc={done.returncode}); see {log.name}"
            )
            return 1
        inner = bench.inner_seconds("stage", run.output_dir, "")

    report = summarise(raw, stage_root)
    tree = stage_tree(raw, stage_root)
    report.update(
        {
            "wall_s": wall,
            "inner_s": inner,
            "rate": args.rate,
            "workers": args.workers,
            "params": params,
            "stage_root": stage_root,
            "tree": tree,
        }
    )
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)

    possible = args.rate * wall
    print(
        f"{label}: {wall:.1f} s wall under py-spy ({report['inner_s']} s inside), "
        f"{report['samples']} samples of {possible:.0f} possible on one thread"
    )
    print(f"{'share':>6} {'self':>6}  stage function (inclusive)")
    for function, samples in list(report["inclusive"].items())[: args.top]:
        own = report["self"].get(function, 0)
        print(f"{samples / possible:6.1%} {own / possible:6.1%}  {function}")
    print(f"call tree of stage functions (shares of {args.threshold:.1%} or more):")
    print_tree(tree, possible, args.threshold)
    print("samples by library of the innermost frame:")
    for package, samples in report["by_library"].items():
        print(f"{samples / possible:6.1%}  {package}")
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
