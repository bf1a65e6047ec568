"""--ema: the average of every weight (BatchNorm statistics too), validated during fit, saved
at the end, and carried through a backup and resume."""

import json

import keras
import numpy as np
import pytest
import tf_keras

from tests.test_trainer import _StopAfterEpoch, tiny_config
from training import ema, pipeline, trainer


def _batchnorm_model(module):
    inputs = module.Input((4,))
    x = module.layers.Dense(8)(inputs)
    x = module.layers.BatchNormalization(momentum=0.5)(x)
    outputs = module.layers.Dense(3)(x)
    model = module.Model(inputs, outputs)
    model.compile(
        optimizer=module.optimizers.SGD(0.1),
        loss=module.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _RecordWeights:
    """Records every weight after each training step (a callback placed before the average)."""

    def __init__(self, module):
        record = self

        class Callback(module.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                record.steps.append([np.array(w) for w in self.model.get_weights()])

        self.steps = []
        self.callback = Callback()


@pytest.mark.parametrize("module", [keras, tf_keras])
def test_the_average_of_every_weight_is_validated_and_applied(module):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 4)).astype("float32"), rng.integers(0, 3, 24)
    model = _batchnorm_model(module)
    initial = [np.array(w) for w in model.get_weights()]
    average = ema.weight_average_class(module)(momentum=0.5)
    average.build(model)
    record = _RecordWeights(module)
    history = model.fit(
        x, y, batch_size=8, epochs=2, validation_data=(x[:8], y[:8]), shuffle=False,
        callbacks=[record.callback, average], verbose=0,
    )  # fmt: skip

    # avg <- m avg + (1 - m) w after step t, m = min(0.5, (1 + t) / (10 + t)), for every
    # weight: the BatchNorm moving mean and variance (non-trainable) as well.
    expected = initial
    for t, weights in enumerate(record.steps, start=1):
        m = min(0.5, (1 + t) / (10 + t))
        expected = [m * a + (1 - m) * w for a, w in zip(expected, weights, strict=True)]
    assert len(record.steps) == 6 and len(average.variables) == len(initial) == 8
    for got, want in zip(average.variables, expected, strict=True):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    # After fit the model trains on with its own weights; the averages wait in the callback.
    for got, want in zip(model.get_weights(), record.steps[-1], strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.allclose(expected[4], record.steps[-1][4])  # a moving mean differs

    # The last epoch's validation was of the averaged model: apply() reproduces it.
    average.apply()
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    val_loss = model.evaluate(x[:8], y[:8], verbose=0)
    assert val_loss == pytest.approx(history.history["val_loss"][-1], rel=1e-5)


@pytest.mark.slow
def test_ema_run_saves_the_averages_and_resumes_them_exactly(cifar10_train_dir, tmp_path):
    """An --ema run interrupted after epoch 1 and resumed ends with the same model.keras as one
    that was not interrupted: the backup holds the averages."""
    config = dict(ema=True, ema_momentum=0.9, epochs=2, deterministic=True)
    straight = tiny_config(cifar10_train_dir, tmp_path / "straight", **config)
    trainer.train(straight)
    broken = tiny_config(cifar10_train_dir, tmp_path / "broken", **config)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(broken, extra_callbacks=[_StopAfterEpoch(1)])
    pointer = json.loads((tmp_path / "broken" / "backup" / "latest.json").read_text())
    assert pointer["counts"]["ema"] == pointer["counts"]["model"] > 0
    metrics = trainer.train(broken)

    models = [keras.saving.load_model(tmp_path / r / "model.keras") for r in ("straight", "broken")]
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # model.keras is the validated model: evaluating it gives the last epoch's val_loss.
    val_ds, _ = pipeline.make_validation_dataset(broken, 10)
    model = models[1]
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    val_loss = model.evaluate(val_ds, verbose=0)
    assert val_loss == pytest.approx(metrics["final"]["val_loss"], rel=1e-5)
