"""Starts a multi-worker training job on this host: N processes with the right TF_CONFIG.

Every worker runs ``python -m training.train <train args>`` with ``TF_CONFIG`` naming all
workers on free localhost ports and its own index; their output is streamed with a
``[worker i]`` prefix. The launcher fails (exit code of the first failing worker) as soon as
one worker fails, after stopping the others: a multi-worker job cannot finish without all
of them.

Example::

    python -m training.launch --workers 2 -- \\
        --strategy multi_worker --data DATA/cifar10/train --batch-size 64

On several hosts, start the same training command on each with its own ``TF_CONFIG`` instead
(docs/scaling.md shows one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from convmixer_tf import cli

POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10.0


def free_ports(count: int, host: str = "localhost") -> list[int]:
    """Returns ``count`` distinct TCP ports that are free on ``host`` right now.

    Example:
        >>> len(set(free_ports(3)))
        3
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def make_tf_config(worker_addresses: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` JSON of worker ``index`` in a cluster of ``worker_addresses``.

    Example:
        >>> make_tf_config(["localhost:1234", "localhost:1235"], 1)
        '{"cluster": {"worker": ["localhost:1234", "localhost:1235"]}, "task": {"type": "worker", "index": 1}}'
    """  # noqa: E501 (doctest output)
    if not 0 <= index < len(worker_addresses):
        raise ValueError(
            f"Worker index {index} is outside the cluster of {len(worker_addresses)} workers."
        )
    return json.dumps(
        {"cluster": {"worker": list(worker_addresses)}, "task": {"type": "worker", "index": index}}
    )


def _stream(prefix: str, source: TextIO, sink: TextIO, lock: threading.Lock) -> None:
    for line in source:
        with lock:
            sink.write(f"{prefix}{line}")
            sink.flush()


def launch(
    program: Sequence[str],
    num_workers: int,
    *,
    host: str = "localhost",
    env: dict[str, str] | None = None,
    output: TextIO | None = None,
) -> int:
    """Runs ``program`` as ``num_workers`` workers of one cluster; returns the exit code.

    Every line the workers print (stdout and stderr) goes to ``output`` (default: stderr),
    prefixed with ``[worker N]``. Returns 0 when every worker exits with 0; otherwise the first
    non-zero exit code (128 + N for a worker killed by signal N), after terminating the workers
    still running.

    Example:
        >>> check = "import json, os; assert json.loads(os.environ['TF_CONFIG'])['cluster']"
        >>> launch([sys.executable, "-c", check], 2)
        0
    """
    if num_workers < 1:
        raise ValueError(f"`workers` must be at least 1. Received: workers={num_workers}")
    if not program:
        raise ValueError("No program to launch: give the training arguments after `--`.")
    output = output if output is not None else sys.stderr
    try:
        addresses = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    except OSError as e:
        raise ValueError(
            f"Could not reserve {num_workers} free ports on {host!r} for the workers "
            f"({e.strerror or e}). Received: workers={num_workers}"
        ) from e
    lock = threading.Lock()
    processes, threads = [], []
    status = 0
    try:
        # Inside the try: a worker that cannot start stops the ones started before it.
        for index in range(num_workers):
            worker_env = dict(os.environ if env is None else env)
            worker_env["TF_CONFIG"] = make_tf_config(addresses, index)
            worker_env["PYTHONUNBUFFERED"] = "1"
            try:
                process = subprocess.Popen(
                    list(program),
                    env=worker_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            except OSError as e:
                raise OSError(
                    f"Could not start worker {index} of {num_workers}: {e.strerror or e}"
                ) from e
            thread = threading.Thread(
                target=_stream,
                args=(f"[worker {index}] ", process.stdout, output, lock),
                daemon=True,
            )
            thread.start()
            processes.append(process)
            threads.append(thread)

        # Poll every process (not any(): it would stop at the first running one).
        while None in (codes := [p.poll() for p in processes]):
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                status = failed[0]
                break
            time.sleep(POLL_SECONDS)
        else:
            status = next((p.returncode for p in processes if p.returncode), 0)
    finally:
        _stop(processes)
        for thread in threads:
            thread.join(timeout=STOP_GRACE_SECONDS)
    if status:
        with lock:
            output.write(f"[launch] a worker failed with exit code {status}; stopped the others\n")
    # A worker killed by signal N has returncode -N; report it as a shell does (128 + N).
    return 128 - status if status < 0 else status


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """Terminates the processes still running, then kills those that ignore it."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options; everything after ``--`` goes to the training module."""
    parser = cli.ArgumentParser(
        prog="python -m training.launch",
        description="Start N multi-worker training processes on this host (TF_CONFIG set); "
        "their output goes to stderr, one JSON line with the job's exit code to stdout.",
    )
    parser.add_argument("--workers", type=cli.positive_int, required=True,
                        help="number of worker processes")  # fmt: skip
    parser.add_argument(
        "--module",
        default="training.train",
        help="Python module each worker runs (default: training.train)",
    )
    parser.add_argument("--host", default="localhost", help="address the workers listen on")
    cli.add_debug_argument(parser)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then training arguments")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the launcher's options, dropping the ``--`` before the training arguments."""
    return _drop_separator(build_parser().parse_args(argv))


def _drop_separator(args: argparse.Namespace) -> argparse.Namespace:
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    return args


def run(args: argparse.Namespace) -> int:
    """Launches the job ``args`` describe; returns its exit code."""
    args = _drop_separator(args)
    program = [sys.executable, "-m", args.module, *args.train_args]
    status = launch(program, args.workers, host=args.host)
    cli.emit({"workers": args.workers, "module": args.module, "exit_code": status})
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the job's exit code (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
