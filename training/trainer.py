"""Strategy, model, optimizer, loss, metrics, callbacks and ``model.fit``, for Keras 3 and tf_keras.

The entry points other code builds on:

* :func:`build_training` ``(config) -> Training``: makes the strategy, the input pipelines and
  the model, and compiles it, everything inside ``strategy.scope()``. The perf benchmark times
  ``training.model.fit(training.train_ds, steps_per_epoch=...)`` on what it returns: the real
  training step.
* :func:`compile_model` ``(model, config, steps_per_epoch)``: AdamW (no weight decay on
  BatchNorm and biases), the triangular one-cycle schedule stepped per batch, global-norm
  clipping, label-smoothed cross-entropy, top-1/top-5 accuracy, optional weight EMA. Call it
  inside the strategy's scope.
* :func:`train` ``(config) -> dict``: the whole run with its outputs (see below); this is what
  ``python -m training.train`` calls.

The keras module comes from ``config.keras_module``: ``"keras"`` (Keras 3), ``"tf_keras"``, or
``"auto"`` (tf_keras for MultiWorkerMirroredStrategy, keras-team/keras#20585; Keras 3 otherwise).
The optimizer, schedule and callbacks are written once against the module; they differ in one
place, :func:`_backup_callback` (tf_keras' BackupAndRestore has the chief/worker logic).

Outputs in ``config.output_dir`` (written by the chief only): ``model.keras`` (final),
``best.keras`` (best validation accuracy), ``config.json`` (resolved config), ``metrics.json``
(per-epoch and final metrics), ``logs/`` (TensorBoard), ``training_curves.png``, and
``backup/`` while a run is unfinished: rerunning the same command resumes from it.

Example:
    >>> from training.config import TrainConfig
    >>> from training.trainer import train
    >>> config = TrainConfig(data_dir="tests/fixtures/cifar10", limit_per_class=20,
    ...                      dim=32, depth=2, epochs=2, batch_size=50, output_dir="runs/try")
    >>> metrics = train(config)  # doctest: +SKIP
    >>> sorted(metrics)  # doctest: +SKIP
    ['best', 'final', 'history']
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import warnings
from typing import Any

import tensorflow as tf

import convmixer_tf
from convmixer_tf import files, saving
from convmixer_tf.cli import finite_json
from training import allocator, data, distribute, ema, pipeline, resume, rundir
from training.callbacks import (
    TrainingDivergedError,
    callback_classes,
    one_cycle_class,
)
from training.config import TrainConfig
from training.rundir import (
    BACKUP_DIR,
    BEST_FILE,
    CLASS_NAMES_FILE,
    CONFIG_FILE,
    LOG_DIR,
    METRICS_FILE,
    MODEL_FILE,
)

logger = logging.getLogger(__name__)

# Variables AdamW does not decay (regular expressions searched in variable names): BatchNorm's
# scale and offset, and every bias.
NO_WEIGHT_DECAY = ("gamma", "beta", "bias")


@dataclasses.dataclass
class Training:
    """What :func:`build_training` returns: a compiled model and its input pipelines.

    Attributes:
        config: the config, with ``keras_module`` resolved and ``lr_max`` scaled.
        strategy: the tf.distribute strategy the model was built under.
        keras: the keras-like module of the model (``keras`` or ``tf_keras``).
        model: the compiled model.
        train_ds: the augmented training pipeline (repeats; global batches).
        val_ds: the validation pipeline (one pass), or None.
        class_names: the class names (the model's output order).
        steps_per_epoch: training steps per epoch.
        skipped: training image files that were unreadable and skipped.
        train_dataset_from: step -> the training pipeline from that global step.
        train_examples: training examples per epoch (None for a streamed TFDS split).
    """

    config: TrainConfig
    strategy: tf.distribute.Strategy
    keras: Any
    model: Any
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset | None
    class_names: list[str]
    steps_per_epoch: int
    skipped: tuple[str, ...] = ()
    train_dataset_from: Any = None  # step -> the training pipeline from that global step
    train_examples: int | None = None

    def data_record(self) -> dict:
        """What the training data is, as backups record it: a resume checks it is unchanged."""
        return {
            "classes": len(self.class_names),
            "train_examples": self.train_examples,
            "steps_per_epoch": self.steps_per_epoch,
        }


def keras_of(model) -> Any:
    """The keras-like module (``keras`` or ``tf_keras``) that built ``model``."""
    import keras

    if isinstance(model, keras.Model):
        return keras
    import tf_keras

    if isinstance(model, tf_keras.Model):
        return tf_keras
    raise ValueError(f"Not a Keras 3 or tf_keras model: {type(model).__name__}")


def resolve_keras_module(config: TrainConfig) -> str:
    """``"keras"`` or ``"tf_keras"`` for the config's strategy (``"auto"`` resolved)."""
    strategy_name = distribute.resolve_strategy_name(config.strategy, config.tpu)
    requested = None if config.keras_module == "auto" else config.keras_module
    return distribute.keras_module_for(strategy_name, requested)


def build_model(config: TrainConfig, num_classes: int, keras_module: str = "keras"):
    """The ConvMixer of ``config``: its preset, with dim/depth/kernel/patch/activation overrides.

    Example:
        >>> model = build_model(TrainConfig(dim=16, depth=1), num_classes=10)
        >>> model.output_shape
        (None, 10)
    """
    overrides = {
        name: getattr(config, name)
        for name in ("dim", "depth", "kernel_size", "patch_size", "activation")
        if getattr(config, name) is not None
    }
    return convmixer_tf.create_model(
        config.model,
        num_classes=num_classes,
        input_shape=(config.image_size, config.image_size, 3),
        synchronized_bn=config.sync_bn,
        initialization=config.initialization,
        keras_module=keras_module,
        **overrides,
    )


def make_optimizer(config: TrainConfig, total_steps: int, keras):
    """AdamW with the one-cycle (or constant) lr; no decay on BatchNorm and biases.

    Example:
        >>> import keras
        >>> optimizer = make_optimizer(TrainConfig(), total_steps=100, keras=keras)
    """
    if config.lr_schedule == "onecycle":
        learning_rate = one_cycle_class(keras)(
            lr_max=config.lr_max, total_steps=total_steps, peak_at=config.lr_peak_at
        )
    else:
        learning_rate = config.lr_max
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=config.weight_decay,
        epsilon=config.adam_epsilon,
        global_clipnorm=config.clip_norm or None,
    )  # --ema: training.ema.WeightAverage (Keras' use_ema leaves BatchNorm statistics out)
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def compile_model(model, config: TrainConfig, steps_per_epoch: int):
    """Compiles ``model`` for training with ``config`` (call inside ``strategy.scope()``).

    Labels are one-hot (mixup/cutmix make them soft); the loss applies label smoothing.

    Example:
        >>> model = compile_model(build_model(TrainConfig(dim=16, depth=1), 10),
        ...                       TrainConfig(), steps_per_epoch=10)
    """
    keras = keras_of(model)
    num_classes = model.output_shape[-1]
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=make_optimizer(config, config.epochs * steps_per_epoch, keras),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=metrics,
        jit_compile=config.jit_compile,
    )
    return model


def resolve_config(config: TrainConfig) -> TrainConfig:
    """``config`` as the run uses it (and ``config.json`` records it): ``keras_module``
    resolved (``"auto"``), ``lr_max`` scaled to the batch (``lr_scaling``)."""
    lr_max = distribute.scale_learning_rate(
        config.lr_max,
        config.batch_size,
        config.base_batch_size or config.batch_size,
        config.lr_scaling,
    )
    return dataclasses.replace(config, keras_module=resolve_keras_module(config), lr_max=lr_max)


def build_training(
    config: TrainConfig, strategy: tf.distribute.Strategy | None = None, start_step: int = 0
) -> Training:
    """Builds the strategy, input pipelines and compiled model of ``config``.

    ``strategy`` defaults to ``training.distribute.make_strategy(config)``. The training
    pipeline starts at global step ``start_step`` (a resumed run); the model's initial weights
    are drawn from ``config.seed``, and ``config.deterministic`` turns on TensorFlow's op
    determinism.

    Example:
        >>> t = build_training(TrainConfig(data_dir="tests/fixtures/cifar10",
        ...                                limit_per_class=8, dim=16, depth=1, batch_size=16))
        >>> t.model.fit(t.train_ds, steps_per_epoch=2, epochs=1)  # doctest: +SKIP
    """
    if config.keep_freed_memory:
        allocator.keep_freed_memory()
    config = resolve_config(config)
    keras_module = config.keras_module
    if strategy is None:
        strategy = distribute.make_strategy(config)
    distribute.set_precision_policy(
        distribute.precision_policy(config.mixed_precision, strategy), keras_module
    )
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    train_data = pipeline.make_train_dataset(config, start_step)
    class_names, steps, skipped = (
        train_data.class_names, train_data.steps_per_epoch, train_data.skipped
    )  # fmt: skip
    shard_policy = distribute.resolve_shard_policy(
        config.shard_policy, image_folder=config.data_dir is not None
    )
    if distribute.needs_static_shapes(strategy):
        distribute.check_static_shapes(train_data.dataset)
    workers = distribute.num_workers(strategy)
    train_ds = distribute.with_shard_policy(train_data.dataset, shard_policy, workers)

    def train_dataset_from(step: int) -> tf.data.Dataset:
        again = pipeline.make_train_dataset(config, step, source=train_data.source)
        return distribute.with_shard_policy(again.dataset, shard_policy, workers)

    val_ds = None
    if config.val_split:
        val_ds, _ = pipeline.make_validation_dataset(config, len(class_names))
        val_ds = distribute.with_shard_policy(val_ds, shard_policy, workers)
    keras = importlib.import_module(keras_module)
    keras.utils.set_random_seed(config.seed)  # the same initial weights in every run
    with strategy.scope():
        model = build_model(config, len(class_names), keras_module)
        compile_model(model, config, steps)
    return Training(
        config, strategy, keras, model, train_ds, val_ds, class_names, steps, skipped,
        train_dataset_from,
        train_data.source.num_examples if train_data.source is not None else None,
    )  # fmt: skip


def make_weight_average(training: Training):
    """``--ema``'s :class:`training.ema.WeightAverage`, built on the model (None without)."""
    if not training.config.ema:
        return None
    average = ema.weight_average_class(training.keras)(
        training.config.ema_momentum, training.strategy
    )
    average.build(training.model)
    return average


def make_callbacks(training: Training, chief: bool, average=None) -> tuple[list, Any]:
    """The run's callbacks and the NaN watcher among them (to read its message after fit).
    ``average``: the run's :class:`training.ema.WeightAverage`, if any."""
    keras, output_dir = training.keras, training.config.output_dir
    classes = callback_classes(keras)
    stop_on_nan = classes.StopOnNaN()
    step_backup, _ = resume.callback_classes(keras)
    steps = training.steps_per_epoch
    backup = step_backup(
        os.path.join(output_dir, BACKUP_DIR),
        steps,
        training.config.backup_freq or resume.default_backup_freq(steps),
        chief,
        bound_time=(
            training.config.backup_freq is None and distribute.num_workers(training.strategy) == 1
        ),
        extra=_average_state(average),
        data=training.data_record(),
    )
    # Order matters for a kill at any moment: the epoch's metrics and best checkpoint are
    # written before its backup, so a resumed run never lacks an epoch it will not redo.
    callbacks = [stop_on_nan]
    if training.val_ds is not None:  # on every worker: saving is a collective operation
        best_path = os.path.join(output_dir, BEST_FILE)
        callbacks.append(classes.BestCheckpoint(best_path, strategy=training.strategy))
    if chief:
        callbacks += [
            classes.MetricsLogger(output_dir),
            keras.callbacks.TensorBoard(os.path.join(output_dir, LOG_DIR)),
        ]
    if average is not None:  # validated averages out before the backup, updates before it
        callbacks.append(average)
    callbacks.append(backup)
    return callbacks, stop_on_nan


def _average_state(average) -> dict[str, list] | None:
    return {"ema": average.variables} if average is not None else None


def _fit_phases(training: Training, step: int, metric_state: list) -> list[tuple]:
    """``(initial_epoch, epochs, steps_per_epoch, dataset, extra callbacks)`` of the ``fit``
    calls that train from global ``step`` on: the rest of an interrupted epoch (its metric
    accumulators restored), then the remaining epochs."""
    steps, epochs = training.steps_per_epoch, training.config.epochs
    epoch, done = divmod(step, steps)
    phases = []
    if done and epoch < epochs:
        _, resume_metrics = resume.callback_classes(training.keras)
        phases.append(
            (epoch, epoch + 1, steps - done, training.train_ds, [resume_metrics(metric_state)])
        )
        epoch += 1
    if epoch < epochs:
        dataset = training.train_ds if not phases else training.train_dataset_from(epoch * steps)
        phases.append((epoch, epochs, steps, dataset, []))
    return phases


def train(config: TrainConfig, extra_callbacks: list | None = None) -> dict:
    """Trains as ``config`` says and writes the outputs; returns ``metrics.json``'s content.

    A run directory belongs to one run (:mod:`training.rundir`): the chief locks it; rerunning
    the same config after an interruption resumes from the last backup; a config that trains
    something else is refused before any file is touched; a finished run of the same config is
    left as it is (its metrics are returned), of another config refused, unless
    ``config.overwrite``, which clears the run's outputs first. The output folder may not be
    (or lie inside) a data folder. ``extra_callbacks`` are added after the project's own.

    Raises:
        TrainingDivergedError: the loss became NaN or infinite (no final model is written).
        ValueError: the directory is in use by another run, or the config differs from the
            run's there.
    """
    output_dir = config.output_dir
    files.check_output_dir(output_dir)
    files.check_not_input(
        {"--output-dir": output_dir},
        {"--data-dir": config.data_dir, "--val-dir": config.val_dir,
         "--val-labels": config.val_labels, "--tfds-data-dir": config.tfds_data_dir},
    )  # fmt: skip
    if config.data_dir is not None:  # the folders exist: checked before anything is locked
        data.resolve_layout(config.data_dir, config.val_dir, config.val_labels)
    state = rundir.run_state(output_dir)
    if state != "new" and not config.overwrite:
        rundir.check_resume(
            output_dir, resolve_config(config).to_dict(), TrainConfig().to_dict(), state
        )
    if state == "finished" and not config.overwrite:
        with open(os.path.join(output_dir, METRICS_FILE)) as f:
            metrics = json.load(f)
        logger.warning(
            "The run in %s is finished (epoch %s): nothing to do. Add --overwrite to start a new "
            "run there, or use another --output-dir.",
            output_dir,
            metrics.get("final", {}).get("epoch"),
        )
        return metrics
    lock = rundir.RunLock(output_dir) if distribute.is_chief() else None
    if lock is not None:
        lock.acquire()
    try:
        if config.overwrite and lock is not None:
            removed = rundir.clear_outputs(output_dir)
            logger.warning("--overwrite: removed %s from %s", removed, output_dir)
        return _train(config, extra_callbacks)
    finally:
        if lock is not None:
            lock.release()


def check_same_data(training: Training, backup: resume.Backup, output_dir: str) -> None:
    """Refuses to resume on other training data than the backup's (images added to or removed
    from the folder, a class renamed): the run would not continue, it would silently train on
    other batches with another held-out split."""
    changes = []
    # The run's class_names.json, read (and checked) as every tool reads a run's files.
    before = saving.training_run_settings(os.path.join(output_dir, MODEL_FILE)).get("class_names")
    if before is not None and before != training.class_names:
        added = sorted(set(training.class_names) - set(before))
        removed = sorted(set(before) - set(training.class_names))
        changes.append(f"classes added {added}, removed {removed}")
    recorded = backup.data or {}
    for key, now in training.data_record().items():
        if recorded.get(key) is not None and now is not None and recorded[key] != now:
            changes.append(f"{key} {recorded[key]} -> {now}")
    if changes:
        raise ValueError(
            f"The training data is not the data of the run in {output_dir!r} "
            f"({'; '.join(changes)}): resuming would train on other batches with another "
            "held-out split. Restore the data as it was, or add --overwrite to start over."
        )


def _train(config: TrainConfig, extra_callbacks: list | None) -> dict:
    backup_dir = os.path.join(config.output_dir, BACKUP_DIR)
    backup = resume.load_backup(backup_dir)
    training = build_training(config, start_step=backup.step if backup else 0)
    config = training.config
    chief = distribute.is_chief(training.strategy)
    output_dir = config.output_dir
    if backup is not None:
        check_same_data(training, backup, output_dir)
    if chief:
        os.makedirs(output_dir, exist_ok=True)
        config.to_json(os.path.join(output_dir, CONFIG_FILE))
        files.write_atomic(
            os.path.join(output_dir, CLASS_NAMES_FILE), json.dumps(training.class_names) + "\n"
        )
    average = make_weight_average(training)
    callbacks, stop_on_nan = make_callbacks(training, chief, average)
    step, metric_state = 0, []
    if backup is not None:
        step, metric_state = resume.restore_state(
            training.model, backup, training.strategy, _average_state(average)
        )
        logger.warning(
            "Resuming at step %d (epoch %d, batch %d) from the backup %s",
            step, step // training.steps_per_epoch + 1, step % training.steps_per_epoch,
            backup.path,
        )  # fmt: skip
    with warnings.catch_warnings():
        # Keras 3 warns at the end of every (finite) validation pass; the training set repeats.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        for first_epoch, end_epoch, steps, dataset, extra in _fit_phases(
            training, step, metric_state
        ):
            training.model.fit(
                dataset,
                initial_epoch=first_epoch,
                epochs=end_epoch,
                steps_per_epoch=steps,
                validation_data=training.val_ds,
                callbacks=callbacks + extra + list(extra_callbacks or []),
                verbose=config.verbose,
                shuffle=False,  # the pipeline shuffles
            )
            if stop_on_nan.message is not None:
                break
    if stop_on_nan.message is not None:
        raise TrainingDivergedError(stop_on_nan.message)
    # Every worker saves (non-chiefs into a temporary folder they delete, as in TF's
    # multi-worker tutorial), then waits for the others: a worker that exits early breaks the
    # chief's remaining TensorFlow ops.
    if average is not None:
        average.apply()  # model.keras holds the averaged weights (validated each epoch)
    with distribute.chief_write_dir(output_dir, training.strategy) as write_dir:
        saving.save_model(training.model, os.path.join(write_dir, MODEL_FILE))
    distribute.barrier(training.strategy)
    if not chief:
        return {}
    shutil.rmtree(os.path.join(output_dir, BACKUP_DIR), ignore_errors=True)
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    with open(metrics_path) as f:
        metrics = json.load(f)
    metrics["skipped_images"] = list(training.skipped)
    text = json.dumps(finite_json(metrics), indent=2, allow_nan=False) + "\n"
    files.write_atomic(metrics_path, text)
    if training.skipped:
        logger.warning(
            "Skipped %d unreadable training image(s); their paths are in %s",
            len(training.skipped),
            metrics_path,
        )
    return metrics
