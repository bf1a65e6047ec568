"""Callbacks and the learning-rate schedule, written once for Keras 3 and tf_keras.

The classes are built by :func:`callback_classes` / :func:`one_cycle_class` for one keras-like
module (``keras`` or ``tf_keras``): the two share the callback protocol but not the base
classes, and each needs its own serialization registration.

Example:
    >>> import keras
    >>> OneCycle = one_cycle_class(keras)
    >>> schedule = OneCycle(lr_max=0.05, total_steps=100)
    >>> round(float(schedule(40)), 4)
    0.05
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import types

import numpy as np
import tensorflow as tf

from convmixer_tf import files, saving
from convmixer_tf.cli import finite_json
from training import distribute
from training.rundir import CURVES_FILE, METRICS_FILE

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a final model."""


def triangular_one_cycle(step, total_steps: int, lr_max: float, peak_at: float = 0.4):
    """The paper's schedule: ``interp(t, [0, 2T/5, 4T/5, T], [0, lr_max, lr_max / 20, 0])``.

    ``peak_at`` moves the peak from 2/5 of the ``total_steps`` ``T`` to ``peak_at * T`` (in
    (0, 0.8)). ``step`` is the optimizer step (a tensor or a number); returns a float32 tensor.
    """
    t = tf.cast(step, tf.float32)
    total = float(total_steps)
    knots = [0.0, peak_at * total, 4.0 * total / 5.0, total]
    values = [0.0, lr_max, lr_max / 20.0, 0.0]
    lr = tf.constant(0.0)
    for (t0, t1), (v0, v1) in zip(
        zip(knots[:-1], knots[1:], strict=True),
        zip(values[:-1], values[1:], strict=True),
        strict=True,
    ):
        fraction = tf.clip_by_value((t - t0) / max(t1 - t0, 1e-12), 0.0, 1.0)
        inside = tf.logical_and(t >= t0, t < t1) if t1 < total else t >= t0
        lr = tf.where(inside, v0 + (v1 - v0) * fraction, lr)
    return tf.where(t >= total, 0.0, lr)


@functools.cache
def one_cycle_class(keras):
    """The ``OneCycle`` LearningRateSchedule class of ``keras`` (registered, serializable)."""

    @keras.saving.register_keras_serializable(package="convmixer_training", name="OneCycle")
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        """Triangular one-cycle learning rate, stepped per batch (see triangular_one_cycle)."""

        def __init__(self, lr_max: float, total_steps: int, peak_at: float = 0.4):
            super().__init__()
            if total_steps < 1:
                raise ValueError(f"`total_steps` must be positive. Received: {total_steps}")
            if not 0.0 < peak_at < 0.8:
                raise ValueError(f"`peak_at` must be in (0, 0.8). Received: {peak_at}")
            self.lr_max = float(lr_max)
            self.total_steps = int(total_steps)
            self.peak_at = float(peak_at)

        def __call__(self, step):
            return triangular_one_cycle(step, self.total_steps, self.lr_max, self.peak_at)

        def get_config(self):
            return {"lr_max": self.lr_max, "total_steps": self.total_steps, "peak_at": self.peak_at}

    return OneCycle


def _plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch (train and validation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [h.get(prefix + key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with files.replacing(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def read_history(output_dir: str) -> list[dict]:
    """The per-epoch metrics a previous run saved in ``metrics.json`` ([] if none)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("history", [])


def _floats(logs: dict | None) -> dict:
    return {k: float(v) for k, v in (logs or {}).items()}


def _finite(logs: dict | None) -> bool:
    return all(math.isfinite(v) for v in _floats(logs).values())


@functools.cache
def callback_classes(keras):
    """The project's callbacks for one keras-like module, as a namespace of classes."""

    class MetricsLogger(keras.callbacks.Callback):
        """Writes ``metrics.json`` (per-epoch metrics and the last) and the curves PNG each
        epoch, keeping the epochs of an interrupted run that was resumed."""

        def __init__(self, output_dir: str, plot: bool = True):
            super().__init__()
            self.output_dir = output_dir
            self.plot = plot
            self.history: list[dict] | None = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.history is None:  # first epoch of this process: keep the earlier ones
                self.history = [h for h in read_history(self.output_dir) if h["epoch"] <= epoch]

        def on_epoch_end(self, epoch, logs=None):
            entry = {"epoch": epoch + 1, **_floats(logs)}
            lr = self.model.optimizer.learning_rate
            entry["lr"] = float(lr.numpy() if hasattr(lr, "numpy") else lr)
            self.history = [h for h in self.history if h["epoch"] != epoch + 1] + [entry]
            summary = {"final": entry, "history": self.history}
            best = [h for h in self.history if "val_accuracy" in h]
            if best:
                top = max(best, key=lambda h: h["val_accuracy"])
                summary["best"] = {"epoch": top["epoch"], "val_accuracy": top["val_accuracy"]}
            # Strict JSON: a NaN loss is written as null (json.dumps would write a bare NaN).
            text = json.dumps(finite_json(summary), indent=2, allow_nan=False) + "\n"
            files.write_atomic(os.path.join(self.output_dir, METRICS_FILE), text)
            if self.plot:
                _plot_curves(self.history, os.path.join(self.output_dir, CURVES_FILE))

    class BestCheckpoint(keras.callbacks.Callback):
        """Saves the model (``.keras``) when ``val_accuracy`` improves, atomically; the best
        value of an interrupted run is read back from ``metrics.json``.

        Every worker of a multi-worker run needs it (saving runs collective ops); the
        non-chiefs save into a temporary folder that is deleted (``chief_write_dir``).
        """

        def __init__(self, path: str, monitor: str = "val_accuracy", strategy=None):
            super().__init__()
            self.path = path
            self.monitor = monitor
            self.strategy = strategy
            history = read_history(os.path.dirname(path))
            self.best = max((h.get(monitor, -math.inf) for h in history), default=-math.inf)

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is None or float(value) <= self.best:
                return
            if not _finite(logs) or not all(np.isfinite(w).all() for w in self.model.get_weights()):
                logger.warning(
                    "Epoch %d: not saving %s: the loss or the weights are not finite",
                    epoch + 1, self.path,
                )  # fmt: skip
                return
            self.best = float(value)
            folder, name = os.path.split(self.path)
            with distribute.chief_write_dir(folder, self.strategy) as write_dir:
                saving.save_model(self.model, os.path.join(write_dir, name))
            if not distribute.is_chief(self.strategy):
                return
            logger.info(
                "Epoch %d: %s improved to %.4f, saved %s",
                epoch + 1,
                self.monitor,
                self.best,
                self.path,
            )

    class StopOnNaN(keras.callbacks.Callback):
        """Stops at the first NaN/inf loss and remembers where, for a clear error."""

        def __init__(self):
            super().__init__()
            self.message: str | None = None
            self._epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                self.message = (
                    f"The training loss became {float(loss)} at epoch {self._epoch + 1}, batch "
                    f"{batch + 1}: training stopped. Lower `lr_max`, keep `clip_norm` on, or "
                    "check the data (images in 0..255, labels within the classes)."
                )
                logger.error(self.message)
                self.model.stop_training = True

    return types.SimpleNamespace(
        MetricsLogger=MetricsLogger,
        BestCheckpoint=BestCheckpoint,
        StopOnNaN=StopOnNaN,
    )
