"""A run directory belongs to one run: a lock, the run's state, and what a rerun may change.

- :class:`RunLock`: the chief holds ``<output_dir>/run.lock`` (host, pid, start time) for the
  whole run; a second process aiming at the same folder fails at once. A lock whose process is
  gone (same host, pid not alive: a killed run) is stale and taken over. A lock of another host
  cannot be checked from here: the error says which host holds it and to delete the lock file if
  that run is dead. Object stores (``gs://``, ``s3://``) have no atomic create: no lock there (a
  warning says so).
- :func:`run_state`: ``"new"``, ``"unfinished"`` (a rerun resumes) or ``"finished"`` (the final
  model is written and the backup removed).
- :func:`check_resume`: a resume must train the same thing: every config key that changes the
  model, the data or the schedule (``epochs`` included: it stretches the one-cycle schedule)
  must equal the saved ``config.json``; the error names the keys that differ.
- :func:`clear_outputs`: ``--overwrite`` starts clean: it removes the run's own files only.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> run_state(folder)
    'new'
    >>> with RunLock(folder):
    ...     RunLock(folder).acquire()
    Traceback (most recent call last):
    ...
    training.rundir.RunDirectoryInUseError: ...
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
from typing import Any

from convmixer_tf import files
from convmixer_tf.constants import RUN_CLASS_NAMES_FILE, RUN_CONFIG_FILE

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
MODEL_FILE = "model.keras"
BEST_FILE = "best.keras"
CONFIG_FILE = RUN_CONFIG_FILE  # what the tools that take a model file read beside it
CLASS_NAMES_FILE = RUN_CLASS_NAMES_FILE
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
# Everything a run writes into its folder (what --overwrite removes).
RUN_OUTPUTS = (
    MODEL_FILE, BEST_FILE, CONFIG_FILE, CLASS_NAMES_FILE, METRICS_FILE, CURVES_FILE, BACKUP_DIR,
    LOG_DIR,
)  # fmt: skip
# Config keys a resumed run may change: how it runs, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {
        "description", "recipe", "verbose", "output_dir", "keep_freed_memory", "cache",
        "backup_freq", "jit_compile", "strategy", "cpu_replicas", "tpu", "shard_policy",
        "overwrite", "deterministic",
    }
)  # fmt: skip


class RunDirectoryInUseError(ValueError):
    """Another live process holds the run directory."""


def _is_remote(path: str) -> bool:
    return "://" in path


class RunLock:
    """The run directory's lock file, held by the chief for the run's duration."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        if _is_remote(self.output_dir):
            logger.warning(
                "%s is an object store: it cannot be locked; make sure no other run writes there.",
                self.output_dir,
            )
            return
        os.makedirs(self.output_dir, exist_ok=True)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise RunDirectoryInUseError(
                        f"Run directory {self.output_dir!r} is in use by pid "
                        f"{holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('started')}. Use another --output-dir; if that run is "
                        f"dead (on another machine), delete {self.path!r}."
                    ) from None
                logger.warning(
                    "Taking over the stale lock of a run that no longer exists: %s", holder
                )
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return
        raise RunDirectoryInUseError(
            f"Could not lock {self.output_dir!r}: {self.path!r} keeps coming back."
        )

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable: being written right now, or garbage

    @staticmethod
    def _stale(holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        return not files.process_alive(pid)

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_state(output_dir: str) -> str:
    """``"new"`` (no run config), ``"finished"`` (final model, no backup) or ``"unfinished"``."""
    if not os.path.exists(os.path.join(output_dir, CONFIG_FILE)):
        return "new"
    finished = os.path.exists(os.path.join(output_dir, MODEL_FILE)) and not os.path.exists(
        os.path.join(output_dir, BACKUP_DIR)
    )
    return "finished" if finished else "unfinished"


def saved_config(output_dir: str) -> dict[str, Any]:
    path = os.path.join(output_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read the run's config {path!r}: {e}") from e


def check_resume(
    output_dir: str,
    resolved: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    state: str = "unfinished",
) -> None:
    """Raises a ValueError naming the keys in which ``resolved`` (the new run's resolved config,
    as ``config.json`` stores it) differs from the saved run's, :data:`RESUMABLE_CHANGES` aside:
    an unfinished run would resume with other settings, a finished one would look as if it had
    trained the new config.

    A key that the saved config lacks (a run started by an older version) counts as its value in
    ``defaults``."""
    saved = {**(defaults or {}), **saved_config(output_dir)}
    differing = {
        key: (saved.get(key), value)
        for key, value in resolved.items()
        if key not in RESUMABLE_CHANGES and _comparable(saved.get(key)) != _comparable(value)
    }
    if differing:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differing.items())
        again = "to resume" if state == "unfinished" else "to see its results"
        raise ValueError(
            f"The {state} run in {output_dir!r} trained something else: {details}. Rerun its "
            f"own command {again}, or add --overwrite to start a new run there (or use "
            "another --output-dir)."
        )


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def clear_outputs(output_dir: str) -> list[str]:
    """Removes the run's own outputs (:data:`RUN_OUTPUTS`) from ``output_dir``; other files
    stay. Returns the removed names."""
    removed = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed
