"""Training ConvMixer on image folders and TFDS datasets with the paper's recipes.

Modules:

* :mod:`training.train` (``python -m training.train``, also ``python -m training``): the command
  line; :mod:`training.config`: the ``TrainConfig`` dataclass and the named recipes
  (``training/recipes/*.json``).
* :mod:`training.trainer`: strategy, model, optimizer, loss, metrics, callbacks and ``fit``;
  :mod:`training.callbacks`: the learning-rate schedule and the callbacks;
  :mod:`training.distribute`: tf.distribute strategies, sharding, chief-only writes;
  :mod:`training.launch`: several local workers with their ``TF_CONFIG``.
* :mod:`training.data`: decoding image folders and TFDS datasets; :mod:`training.augment`: the
  augmentations; :mod:`training.pipeline`: the training and validation input pipelines;
  :mod:`training.ema`: the weight average of ``--ema``.
* :mod:`training.resume`: exact resume from backups; :mod:`training.rundir`: the run
  directory's lock and what a rerun may change.
* :mod:`training.evaluate`: accuracy of a saved model, with :mod:`training.tta`'s test-time
  views; :mod:`training.benchmark` and
  :mod:`training.measure`: training throughput against the matmul peak;
  :mod:`training.allocator`: glibc ``malloc`` tuning for CPU training.
"""
