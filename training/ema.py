"""Weight averaging (``--ema``): an exponential moving average of every weight of the model.

After each training step, :class:`WeightAverage` updates ``average = m * average + (1 - m) *
weight`` for all of ``model.weights``: the trainable ones and the BatchNorm moving statistics
(as timm's ``ModelEmaV2`` averages the whole state), so the averaged model's BatchNorm layers
normalize with statistics averaged over the same steps as its filters. ``m`` is
``min(ema_momentum, (1 + t) / (10 + t))`` at step ``t``, the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=t)``: the first steps do not drag the initial weights
along.

During ``fit`` the averaged model is the one that is validated: the callback puts the averages
into the model when validation begins and the trained weights back at the end of the epoch,
after the epoch's metrics and best checkpoint were written (it sits just before the backup in
the callback list, and the backup stores the trained weights and the averages). At the end,
:meth:`WeightAverage.apply` leaves the averages in the model that is saved as ``model.keras``.
Keras' own ``use_ema`` optimizer option averages the trainable weights only, validates the
trained ones and copies the averages at the end of ``fit``: BatchNorm statistics that belong to
other weights.

Example:
    >>> import keras
    >>> average = weight_average_class(keras)(momentum=0.999)
    >>> average.build(model)  # doctest: +SKIP
    >>> model.fit(data, callbacks=[average])  # doctest: +SKIP
    >>> average.apply()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

# TensorFlow's ExponentialMovingAverage warm-up: the momentum at step t is at most this.
WARMUP_OFFSET = 10.0


def warmup_momentum(momentum: float, step):
    """``min(momentum, (1 + step) / (10 + step))``: the momentum at optimizer step ``step``."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(momentum, (1.0 + step) / (WARMUP_OFFSET + step))


def weight_average_class(keras):
    """The :class:`WeightAverage` callback class for ``keras`` or ``tf_keras``."""

    class WeightAverage(keras.callbacks.Callback):
        """Averages the model's weights after every step; the averaged model is validated.

        Call :meth:`build` with the model before ``fit`` (and before a backup is restored into
        :attr:`variables`), inside the strategy's scope when there is one.
        """

        def __init__(self, momentum: float, strategy: tf.distribute.Strategy | None = None):
            super().__init__()
            self.momentum = float(momentum)
            self.strategy = strategy
            self.variables: list[tf.Variable] = []
            self._weights: list = []
            self._swapped = False
            self._update = None

        def build(self, model) -> None:
            """Creates the averages as copies of ``model``'s current weights."""
            # Floating-point weights only (an integer state, if a layer had one, is no average).
            self._weights = [w for w in model.weights if tf.as_dtype(w.dtype).is_floating]
            scope = self.strategy.scope() if self.strategy else contextlib.nullcontext()
            with scope:
                self.variables = [
                    tf.Variable(
                        tf.convert_to_tensor(w),
                        trainable=False,
                        name=f"ema_{i}",
                        synchronization=tf.VariableSynchronization.ON_WRITE,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    )
                    for i, w in enumerate(self._weights)
                ]

            @tf.function
            def update(step):
                m = warmup_momentum(self.momentum, step)
                for average, weight in zip(self.variables, self._weights, strict=True):
                    value = tf.cast(tf.convert_to_tensor(weight), average.dtype)
                    average.assign(m * average + (1.0 - m) * value)

            self._update = update

        def _swap(self) -> None:
            for average, weight in zip(self.variables, self._weights, strict=True):
                trained = tf.identity(tf.convert_to_tensor(weight))
                weight.assign(tf.convert_to_tensor(average))
                average.assign(trained)
            self._swapped = not self._swapped

        def apply(self) -> None:
            """Leaves the averages in the model (for saving it)."""
            if not self._swapped:
                self._swap()

        def on_train_begin(self, logs=None):
            if not self.variables:
                raise RuntimeError("WeightAverage.build(model) must be called before fit.")
            if self._swapped:  # a fit after apply(): train the trained weights
                self._swap()

        def on_train_batch_end(self, batch, logs=None):
            self._update(self.model.optimizer.iterations)

        def on_test_begin(self, logs=None):
            # During fit, the epoch's validation: of the averaged model.
            if not self._swapped:
                self._swap()

        def on_epoch_end(self, epoch, logs=None):
            if self._swapped:  # back to the trained weights before the epoch's backup
                self._swap()

    return WeightAverage
