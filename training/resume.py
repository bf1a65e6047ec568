"""Exact resume: the whole training state at a step, saved atomically, restored before ``fit``.

A backup (``<output_dir>/backup/``) holds, at global step ``g``: every model variable (weights
and BatchNorm statistics), every optimizer variable (the step counter that drives the
learning-rate schedule, AdamW's moments, the EMA weights) and, for a backup inside an epoch,
the metric accumulators of that epoch. ``latest.json`` points at the current state file and is
replaced last: a kill at any moment leaves the previous complete backup. The state before the
current one is kept too: a current file found unreadable (a disk error, a file cut short) is
named in a warning and the run resumes from the one before (:func:`load_backup`).

With the input pipeline a function of (seed, step) (:func:`training.pipeline.make_train_dataset`
skips to ``g`` before decoding), the resumed run continues exactly as the uninterrupted run:
same batches, same augmentation, same updates. The same code serves Keras 3 and tf_keras.

Example:
    >>> import tempfile, keras, convmixer_tf
    >>> model = convmixer_tf.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), num_classes=2)
    >>> model.compile(optimizer="adamw", loss="mse")
    >>> folder = tempfile.mkdtemp()
    >>> path = save_state(model, folder, step=3, mid_epoch=False)
    >>> load_backup(folder).step
    3
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zipfile

import numpy as np
import tensorflow as tf

from convmixer_tf import files

logger = logging.getLogger(__name__)

POINTER = "latest.json"
# By default a backup every 1/50 of an epoch: a preemption costs at most 2% of an epoch (41
# steps of ImageNet's 2,002 at batch 640) ...
BACKUPS_PER_EPOCH = 50
# ... unless writing it would take more than this share of the training time (a large model
# on fast accelerators): then less often, so that backups cost at most 2% of the run.
MAX_BACKUP_TIME_SHARE = 0.02


def default_backup_freq(steps_per_epoch: int) -> int:
    """Steps between backups when none is given: :data:`BACKUPS_PER_EPOCH` per epoch."""
    return max(1, math.ceil(steps_per_epoch / BACKUPS_PER_EPOCH))


def _metric_variables(model) -> list:
    variables = getattr(model, "metrics_variables", None)  # Keras 3
    if variables is None:  # tf_keras
        variables = [v for metric in model.metrics for v in metric.variables]
    return list(variables)


def _optimizer_variables(model) -> list:
    variables = model.optimizer.variables
    return list(variables() if callable(variables) else variables)


def state_variables(model, extra: dict[str, list] | None = None) -> dict[str, list]:
    """The variables of the training state: ``model``, ``optimizer`` and ``metrics``, and the
    ``extra`` groups (the weight averages of ``--ema``: ``{"ema": [...]}``)."""
    return {
        "model": list(model.weights),
        "optimizer": _optimizer_variables(model),
        "metrics": _metric_variables(model),
        **(extra or {}),
    }


def collect_state(
    model, mid_epoch: bool, extra: dict[str, list] | None = None
) -> dict[str, np.ndarray]:
    """The training state's values. Every worker of a multi-worker run must call it (reading a
    metric aggregated over workers is a collective operation); the chief writes them.

    The metric accumulators are kept only for a backup inside an epoch (a new epoch starts
    them from zero).
    """
    groups = state_variables(model, extra)
    if not mid_epoch:
        groups["metrics"] = []
    return {
        f"{group}/{i:05d}": np.asarray(variable.numpy())
        for group, variables in groups.items()
        for i, variable in enumerate(variables)
    }


def save_state(
    model,
    backup_dir: str,
    step: int,
    mid_epoch: bool,
    arrays: dict | None = None,
    data: dict | None = None,
) -> str:
    """Writes the training state at ``step`` (a new file, then the pointer); returns its path.

    ``arrays``: the values from :func:`collect_state` (collected here when None). ``data``:
    what the training data was (classes, examples, steps per epoch), kept in the pointer so
    that a resume can tell whether it continues the same run (:attr:`Backup.data`).
    """
    if arrays is None:
        arrays = collect_state(model, mid_epoch)
    os.makedirs(backup_dir, exist_ok=True)
    name = f"state_{step:09d}.npz"
    path = os.path.join(backup_dir, name)
    with files.replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    counts = {}
    for key in arrays:
        group = key.split("/", 1)[0]
        counts[group] = counts.get(group, 0) + 1
    last = _readable_pointer(backup_dir)
    previous = None
    if last is not None:  # the state before this one (unless this one is written again)
        previous = last.get("previous") if last["file"] == name else last
        previous = {k: v for k, v in previous.items() if k != "previous"} if previous else None
    pointer = {"step": step, "file": name, "mid_epoch": mid_epoch, "counts": counts,
               "data": data, "previous": previous}  # fmt: skip
    files.write_atomic(os.path.join(backup_dir, POINTER), json.dumps(pointer))
    keep = {name, previous["file"] if previous else None}
    for old in os.listdir(backup_dir):  # keep the current state and the one before
        if old.startswith("state_") and old.endswith(".npz") and old not in keep:
            os.remove(os.path.join(backup_dir, old))
    return path


def _readable_pointer(backup_dir: str) -> dict | None:
    try:
        return read_pointer(backup_dir)
    except ValueError:
        return None


@dataclasses.dataclass
class Backup:
    """A backup that was read completely: its step, kind and arrays (``group/index``), and
    what the training data was when it was written (None: not recorded)."""

    step: int
    mid_epoch: bool
    path: str
    arrays: dict[str, np.ndarray]
    data: dict | None = None


def load_backup(backup_dir: str) -> Backup | None:
    """The newest readable backup in ``backup_dir`` (None if there is none).

    The current state file is read whole; if it is unreadable (cut short, corrupt), a warning
    names it and the state before it is used. Raises a ValueError naming the files when no
    backup can be read (remove the folder, or ``--overwrite``, to start over).
    """
    pointer = read_pointer(backup_dir)
    if pointer is None:
        return None
    candidates = [pointer] + ([pointer["previous"]] if pointer.get("previous") else [])
    failures = []
    for entry in candidates:
        path = os.path.join(backup_dir, entry["file"])
        try:
            with np.load(path) as saved:
                arrays = {key: saved[key] for key in saved.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            failures.append(f"{path!r} ({reason})")
            logger.warning("The backup %s is unreadable (%s)", path, reason)
            continue
        if failures:
            logger.warning("Resuming from the backup before it: %s (step %d)", path, entry["step"])
        data = entry.get("data") if isinstance(entry.get("data"), dict) else None
        return Backup(int(entry["step"]), bool(entry["mid_epoch"]), path, arrays, data)
    raise ValueError(
        f"No readable backup in {backup_dir!r}: {'; '.join(failures)}. Remove that folder to "
        "start the run over, or add --overwrite."
    )


def read_pointer(backup_dir: str) -> dict | None:
    """The current backup's pointer (``step``, ``file``, ``mid_epoch``), or None."""
    path = os.path.join(backup_dir, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pointer = json.load(f)
        int(pointer["step"]), str(pointer["file"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Unreadable backup pointer {path!r}: {e}") from e
    return pointer


def restore_state(
    model, backup: Backup | str, strategy=None, extra: dict[str, list] | None = None
) -> tuple[int, list[np.ndarray]]:
    """Assigns the backup's model and optimizer variables (and the ``extra`` groups) to
    ``model`` (compiled, optimizer built here if needed); returns ``(step, metric
    accumulators)``: those are added to the metrics after the first resumed batch
    (:class:`ResumeMetrics`), once Keras built them. ``backup``: :func:`load_backup`'s result,
    or the backup folder to read it from."""
    if isinstance(backup, str):
        backup = load_backup(backup)
    if backup is None:
        return 0, []
    optimizer = model.optimizer
    # Keras 3 has `built`; tf_keras' optimizer keeps it private.
    if not getattr(optimizer, "built", getattr(optimizer, "_built", False)):
        if strategy is not None:
            with strategy.scope():
                optimizer.build(model.trainable_variables)
        else:
            optimizer.build(model.trainable_variables)
    path, stored = backup.path, backup.arrays
    groups = state_variables(model, extra)
    for group in ("model", "optimizer", *(extra or {})):
        variables = groups[group]
        values = [stored[k] for k in sorted(stored) if k.startswith(group + "/")]
        if len(values) != len(variables):
            raise ValueError(
                f"The backup {path!r} holds {len(values)} {group} variables, the model has "
                f"{len(variables)}: it was written by another model or optimizer."
            )
        for variable, value in zip(variables, values, strict=True):
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"The backup {path!r} does not fit {variable.name}: shape {value.shape} vs "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)
    metrics = [stored[k] for k in sorted(stored) if k.startswith("metrics/")]
    return backup.step, metrics


def callback_classes(keras):
    """The backup callbacks for one keras-like module (``keras`` or ``tf_keras``)."""

    class StepBackup(keras.callbacks.Callback):
        """Saves the training state every ``backup_freq`` steps and at every epoch's end
        (:func:`save_state`); every worker collects the values, the chief writes them."""

        def __init__(
            self,
            backup_dir: str,
            steps_per_epoch: int,
            backup_freq: int,
            chief: bool,
            bound_time: bool = False,
            extra: dict[str, list] | None = None,
            data: dict | None = None,
        ):
            """``bound_time``: skip a due backup while the last one took more than
            :data:`MAX_BACKUP_TIME_SHARE` of the time since (the default frequency of a
            single-worker run; workers of a multi-worker run must decide alike, by steps).
            ``extra``: more variable groups to store (:func:`state_variables`). ``data``:
            what the training data is (:func:`save_state`)."""
            super().__init__()
            self.backup_dir = backup_dir
            self.steps_per_epoch = steps_per_epoch
            self.backup_freq = backup_freq
            self.chief = chief
            self.bound_time = bound_time
            self.extra = extra
            self.data = data
            self._last_end = time.monotonic()
            self._last_duration = 0.0

        def _step(self) -> int:
            return int(self.model.optimizer.iterations.numpy())

        def _save(self, step: int, mid_epoch: bool) -> None:
            start = time.monotonic()
            arrays = collect_state(self.model, mid_epoch, self.extra)
            if not all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("model/")):
                # A diverged model (NaN or inf weights) is no state to resume from: the
                # previous backups stay.
                logger.warning("Not backing up step %d: the model's weights are not finite", step)
                return
            if self.chief:
                save_state(self.model, self.backup_dir, step, mid_epoch, arrays, self.data)
            self._last_end = time.monotonic()
            self._last_duration = self._last_end - start

        def on_train_batch_end(self, batch, logs=None):
            step = self._step()
            if step % self.backup_freq or not step % self.steps_per_epoch:
                return
            since = time.monotonic() - self._last_end
            if self.bound_time and self._last_duration > MAX_BACKUP_TIME_SHARE * since:
                return
            self._save(step, mid_epoch=True)

        def on_epoch_end(self, epoch, logs=None):
            self._save(self._step(), mid_epoch=False)

    class ResumeMetrics(keras.callbacks.Callback):
        """Adds a mid-epoch backup's metric accumulators after the first resumed batch, so the
        resumed epoch's metrics cover the whole epoch (Keras builds metrics on first use)."""

        def __init__(self, values: list[np.ndarray]):
            super().__init__()
            self.values = values

        def on_train_batch_end(self, batch, logs=None):
            if not self.values:
                return
            variables = _metric_variables(self.model)
            if len(variables) != len(self.values):
                logger.warning(
                    "The backup's %d metric accumulators do not fit the model's %d: the "
                    "resumed epoch's metrics cover its remaining steps only.",
                    len(self.values),
                    len(variables),
                )
            else:
                try:
                    for variable, value in zip(variables, self.values, strict=True):
                        variable.assign_add(tf.cast(value, variable.dtype))
                except (ValueError, NotImplementedError, tf.errors.OpError) as e:
                    # tf.distribute may not allow it on metrics aggregated across workers.
                    logger.warning(
                        "Could not restore the epoch's metric accumulators (%s): the resumed "
                        "epoch's metrics cover its remaining steps only.",
                        e,
                    )
            self.values = []

    return StepBackup, ResumeMetrics
