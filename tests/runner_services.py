"""Beam's local job service and an SDK worker pool, as children of a test.

The portable-runner test needs two servers: Beam's job service, which runs the
job with its FnApiRunner, and a worker pool, which starts the SDK workers of
an ``EXTERNAL`` environment. Both listen on loopback ports only, log to files
that a failing test can show, and are terminated and waited for on exit.

Run as ``python -m tests.runner_services``, this module is the worker pool:
Beam's own servicer, bound to 127.0.0.1 (``worker_pool_main`` binds
``[::]``, every interface) and stopping its workers on SIGTERM
(``worker_pool_main`` only does so at a normal exit, which SIGTERM skips).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on the loopback interface just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def service_env() -> dict[str, str]:
    """The environment of the servers and of the workers they start.

    The worker pool starts SDK workers with the ``python`` on PATH, so this
    interpreter's bin goes first; the repository goes first on PYTHONPATH so
    that the workers import the same stage code as the test.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable), env.get("PATH", "")]
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT, *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def log_tail(path: str, n_chars: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n_chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def wait_for_port(
    port: int, process: subprocess.Popen, name: str, log_path: str, timeout: float
) -> None:
    """Return once ``process`` accepts connections on the loopback ``port``.

    Raises:
        RuntimeError: the process exited, or did not listen within ``timeout``
            seconds; the message holds the end of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            msg = (
                f"{name} exited with status {process.returncode} before "
                f"listening on {LOOPBACK}:{port}; its log ends:\n"
                f"{log_tail(log_path)}"
            )
            raise RuntimeError(msg)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        if time.monotonic() > deadline:
            msg = (
                f"{name} did not accept connections on {LOOPBACK}:{port} within "
                f"{timeout:.0f} s; its log ends:\n{log_tail(log_path)}"
            )
            raise RuntimeError(msg)
        time.sleep(0.2)


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate a server and wait for it; kill it if it does not stop."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serving(
    name: str, args: list[str], port: int, log_path: str, timeout: float = 60.0
) -> Iterator[subprocess.Popen]:
    """Start ``python <args>``, wait until it listens on ``port``, stop it after.

    The server is stopped however the body ends, also when waiting fails.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=service_env(),
            cwd=os.path.dirname(log_path),
        )
    try:
        wait_for_port(port, process, name, log_path, timeout)
        yield process
    finally:
        stop(process)


def job_service_args(port: int, staging_dir: str) -> list[str]:
    """Beam's local job service; it binds ``localhost:port``."""
    return [
        "-m",
        "apache_beam.runners.portability.local_job_service_main",
        f"--port={port}",
        f"--staging_dir={staging_dir}",
    ]


def worker_pool_args(port: int) -> list[str]:
    """The worker pool of this module, bound to ``127.0.0.1:port``."""
    return ["-m", "tests.runner_services", f"--service_port={port}"]


def _serve_worker_pool(port: int) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import (
        BeamFnExternalWorkerPoolServicer,
        kill_process_gracefully,
    )
    from apache_beam.utils import thread_pool_executor

    # The same server and servicer as worker_pool_main, bound to loopback.
    server = grpc.server(
        thread_pool_executor.shared_unbounded_instance(),
        options=[
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    # One address, so that a taken port fails the start instead of leaving
    # the pool on ::1 alone.
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    pool = BeamFnExternalWorkerPoolServicer(use_process=True)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    print(f"worker pool listening on {LOOPBACK}:{port}", flush=True)

    def _exit(*_):
        sys.exit(0)

    signal.signal(signal.SIGTERM, _exit)
    try:
        while True:
            time.sleep(3600)
    finally:
        for worker in list(pool._worker_processes.values()):
            kill_process_gracefully(worker)
        server.stop(0)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SDK worker pool on loopback.")
    parser.add_argument("--service_port", type=int, required=True)
    _serve_worker_pool(parser.parse_args().service_port)
