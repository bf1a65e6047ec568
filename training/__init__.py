"""Training ConvMixer on image folders and TFDS datasets with the paper's recipes.

Modules: :mod:`training.data` (input pipelines), :mod:`training.augment` (augmentation),
:mod:`training.config` (the config dataclass and named recipes), :mod:`training.trainer`
(strategy, model, optimizer, callbacks, ``fit``), :mod:`training.train` (command line),
:mod:`training.evaluate` (accuracy of a saved model).
"""
