"""Tests of training/trainer.py and training/callbacks.py: schedule, optimizer, fit, outputs,
resume after an interruption (in process and after kill -9), NaN stop, Keras 3 and tf_keras."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tf_keras

from training import callbacks as callbacks_lib
from training import trainer
from training.config import TrainConfig, check

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, output_dir, **overrides) -> TrainConfig:
    """4 images per class of the train and validation splits, 16x16, a 1-block ConvMixer."""
    values = dict(
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        limit_per_class=4,
        image_size=16,
        dim=16,
        depth=1,
        kernel_size=3,
        epochs=2,
        batch_size=8,
        verbose=0,
        lr_max=0.01,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("module", [keras, tf_keras])
def test_one_cycle_schedule_is_the_papers_triangle(module):
    schedule = callbacks_lib.one_cycle_class(module)(lr_max=0.05, total_steps=100)
    steps = [0, 20, 40, 60, 80, 90, 100, 120]
    expected = np.interp(steps, [0, 40, 80, 100], [0, 0.05, 0.0025, 0])
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, atol=1e-7)
    again = type(schedule).from_config(schedule.get_config())
    assert float(again(30)) == pytest.approx(float(schedule(30)))
    assert module.saving.get_registered_object("convmixer_training>OneCycle") is type(schedule)
    early = type(schedule)(lr_max=0.05, total_steps=100, peak_at=0.25)
    expected = np.interp(steps, [0, 25, 80, 100], [0, 0.05, 0.0025, 0])
    np.testing.assert_allclose([float(early(s)) for s in steps], expected, atol=1e-7)
    assert type(early).from_config(early.get_config()).peak_at == 0.25


def test_optimizer_takes_the_peak_position_of_the_config():
    config = TrainConfig(lr_max=0.05, lr_peak_at=0.2, clip_norm=None)
    optimizer = trainer.make_optimizer(config, 100, keras)
    assert float(optimizer.learning_rate) == 0.0  # step 0
    assert float(optimizer._learning_rate(20)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_peak_at"):
        check(TrainConfig(lr_peak_at=0.9))


def test_optimizer_decays_kernels_but_not_batchnorm_or_biases():
    model = trainer.build_model(TrainConfig(dim=16, depth=1), num_classes=10)
    optimizer = trainer.make_optimizer(TrainConfig(weight_decay=0.05, clip_norm=1.0), 10, keras)
    optimizer.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    kernels = {v.path for v in model.trainable_variables if v.path.endswith("kernel")}
    assert decayed == kernels
    assert {"stem_conv/kernel", "blocks_0_dwconv/kernel", "head/kernel"} <= decayed
    assert not {p for p in decayed if p.endswith(("bias", "gamma", "beta"))}
    assert optimizer.global_clipnorm == 1.0 and optimizer.epsilon == 1e-8


def test_compile_model_loss_metrics_and_label_smoothing():
    config = TrainConfig(dim=16, depth=1, label_smoothing=0.1, ema=True)
    model = trainer.compile_model(trainer.build_model(config, 10), config, steps_per_epoch=5)
    assert model.loss.label_smoothing == 0.1 and model.loss.from_logits
    assert not model.optimizer.use_ema  # --ema: training.ema.WeightAverage, a callback
    assert float(model.optimizer.learning_rate) == 0.0  # one-cycle starts at 0


class _StopAfterEpoch(keras.callbacks.Callback):
    """Simulates a crash right after the backup of epoch ``epoch`` (1-based) was written."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("simulated interruption")


class _RecordEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []
        self.first_iteration = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)
        if self.first_iteration is None:
            self.first_iteration = int(self.model.optimizer.iterations.numpy())


@pytest.mark.slow
def test_train_resumes_after_an_interruption_and_writes_every_output(cifar10_train_dir, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(cifar10_train_dir, out, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, extra_callbacks=[_StopAfterEpoch(2)])
    backup = json.loads((out / "backup" / "latest.json").read_text())
    assert backup["step"] == 2 * (40 // 8) and not backup["mid_epoch"]
    assert not (out / "model.keras").exists()

    recorder = _RecordEpochs()
    metrics = trainer.train(config, extra_callbacks=[recorder])
    assert recorder.epochs == [3]  # resumed, not restarted
    assert recorder.first_iteration == 2 * (40 // 8)  # optimizer state and lr schedule restored
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]

    names = set(os.listdir(out))
    expected = {
        "model.keras",
        "best.keras",
        "config.json",
        "metrics.json",
        "logs",
        "training_curves.png",
        "class_names.json",
    }
    assert expected <= names and "backup" not in names  # the backup goes once finished
    assert not [n for n in names if n.startswith(".tmp")]
    assert metrics["final"]["epoch"] == 3 and 0 <= metrics["final"]["val_accuracy"] <= 1
    assert metrics["best"]["val_accuracy"] == max(h["val_accuracy"] for h in metrics["history"])
    assert metrics["skipped_images"] == []
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "config.json").read_text())["keras_module"] == "keras"
    assert json.loads((out / "class_names.json").read_text())[0] == "airplane"
    assert os.listdir(out / "logs")  # TensorBoard event files
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    model = keras.saving.load_model(out / "model.keras")
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    assert model.predict(images, verbose=0).shape == (2, 10)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(cifar10_train_dir, tmp_path):
    config = tiny_config(
        cifar10_train_dir,
        tmp_path / "run",
        lr_max=1e30,
        clip_norm=None,
        lr_schedule="constant",
        epochs=3,
    )
    with pytest.raises(callbacks_lib.TrainingDivergedError, match="loss became nan.*epoch 1"):
        trainer.train(config)
    assert not (tmp_path / "run" / "model.keras").exists()


def test_stop_on_nan_callback_message():
    callback = callbacks_lib.callback_classes(keras).StopOnNaN()
    callback.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    callback.model.stop_training = False
    callback.on_epoch_begin(4)
    callback.on_train_batch_end(0, {"loss": 1.0})
    assert callback.message is None and not callback.model.stop_training
    callback.on_train_batch_end(6, {"loss": math.inf})
    assert "became inf at epoch 5, batch 7" in callback.message and callback.model.stop_training


def test_tf_keras_model_trains_with_the_same_code(cifar10_train_dir, tmp_path):
    config = tiny_config(
        cifar10_train_dir, tmp_path / "run", epochs=1, keras_module="tf_keras", val_split=None
    )
    metrics = trainer.train(config)
    assert metrics["final"]["epoch"] == 1 and np.isfinite(metrics["final"]["loss"])
    # The deliverable is the same model as Keras 3 with stock layers, whatever Keras trained it.
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert isinstance(model, keras.Model) and model.output_shape == (None, 10)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["keras_module"] == "tf_keras"


def test_build_training_for_the_benchmark(cifar10_train_dir):
    training = trainer.build_training(
        tiny_config(cifar10_train_dir, "unused", steps_per_epoch=3, val_split=None)
    )
    assert training.steps_per_epoch == 3 and training.val_ds is None
    assert training.model.input_shape == (None, 16, 16, 3)
    assert isinstance(training.model.optimizer, keras.optimizers.AdamW)
    assert training.model.compiled  # ready for fit (the train() tests run it)
    images, labels = next(iter(training.train_ds))
    assert images.shape == (8, 16, 16, 3) and labels.shape == (8, 10)
    # the stream is ordered: exact resume needs the same batches in the same order
    assert training.train_ds.options().deterministic is not False


@pytest.mark.slow
def test_kill_9_then_rerun_resumes(cifar10_train_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--data-dir",
        str(cifar10_train_dir),
        "--output-dir",
        str(out),
        "--limit-per-class",
        "4",
        "--image-size",
        "16",
        "--dim",
        "16",
        "--depth",
        "1",
        "--epochs",
        "40",
        "--batch-size",
        "8",
        "--verbose",
        "0",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = out / "backup" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not pointer.exists():
        assert process.poll() is None, "the training process ended before its first backup"
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert 1 <= killed_at < 40 * 5 and not (out / "model.keras").exists()

    # The killed run left its lock: stale (its process is gone), taken over by the rerun.
    assert (out / "run.lock").exists()
    rerun = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming at step {killed_at}" in rerun.stderr
    assert "stale lock" in rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 41))
    assert (out / "model.keras").exists() and not (out / "run.lock").exists()

    # A fresh process evaluates the saved model (its custom layers must deserialize).
    evaluation = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "--model",
            str(out / "best.keras"),
            "--data-dir",
            str(cifar10_train_dir),
            "--limit-per-class",
            "2",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["n"] == 20 and set(result) >= {"top1", "top5", "per_class"}


def test_mixed_bfloat16_training_learns_with_float32_logits(cifar10_train_dir, tmp_path):
    """--mixed-precision on a CPU: the fused GELU, BatchNorm and depthwise layers compute in
    bfloat16, the logits and the loss stay float32, the loss decreases, and the deliverable is
    the same stock float32 model as a float32 run's."""
    config = tiny_config(
        cifar10_train_dir, tmp_path / "run", epochs=5, mixed_precision=True, val_split=None,
        randaugment_ops=0, scale=(1.0, 1.0), hflip=False, lr_max=0.02,
    )  # fmt: skip
    try:
        training = trainer.build_training(config)
        model = training.model
        assert model.get_layer("blocks_0_dwconv").compute_dtype == "bfloat16"
        assert type(model.get_layer("blocks_0_dwconv")).__name__ == "FusedDepthwiseConv2D"
        images, _ = next(iter(training.train_ds))
        assert model(images, training=True).dtype == "float32"
        metrics = trainer.train(config)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = [epoch["loss"] for epoch in metrics["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    deliverable = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert {layer.dtype_policy.name for layer in deliverable.layers} == {"float32"}
    assert deliverable(images).dtype == "float32"
