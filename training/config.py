"""The training configuration: one typed dataclass, named recipes as JSON files, overrides.

A recipe is ``training/recipes/<name>.json``: a JSON object whose keys are :class:`TrainConfig`
fields. :func:`from_recipe` loads it over the defaults; :func:`apply_overrides` changes fields
from the command line (values as typed Python values or as strings to parse); both reject an
unknown key with a ValueError naming it and listing the valid ones.

Example:
    >>> from training.config import from_recipe, apply_overrides
    >>> config = from_recipe("cifar10_convmixer_256_8")
    >>> config = apply_overrides(config, {"epochs": "2", "batch_size": 64})
    >>> config.epochs, config.lr_max
    (2, 0.05)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any

from convmixer_tf import constants, files, image_files
from convmixer_tf.constants import INTERPOLATIONS

RECIPES_DIR = pathlib.Path(__file__).resolve().parent / "recipes"
# "auto": tf_keras for multi_worker (keras-team/keras#20585), Keras 3 otherwise.
TRAINING_KERAS_MODULES = ("auto", *constants.KERAS_MODULES)
LR_SCALING_RULES = ("none", "linear", "sqrt")
# tf.data auto-shard policies (training.distribute maps them onto tf.data's enum).
SHARD_POLICIES = ("auto", "data", "file", "off")
LR_SCHEDULES = ("onecycle", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. ``batch_size`` is the GLOBAL batch.

    The fields are grouped as: model, data, optimization, augmentation, run, distribution.
    ``training/recipes/*.json`` set some of them; the rest keep these defaults.
    """

    description: str = ""
    recipe: str = ""
    # Model: a preset of convmixer_tf (its architecture, overridden field by field).
    model: str = "convmixer_256_8"
    dim: int | None = None
    depth: int | None = None
    kernel_size: int | None = None
    patch_size: int | None = None
    activation: str | None = None
    initialization: str = "keras"  # or "pytorch" (convmixer_tf.ConvMixer's initialization)
    keras_module: str = "auto"  # auto: tf_keras for multi_worker, Keras 3 otherwise
    # Data: an image folder (data_dir) or a TFDS dataset (dataset), exactly one.
    data_dir: str | None = None  # class folders, or a root with train/ and val/ (validation/)
    dataset: str | None = None
    val_dir: str | None = None  # a separate validation folder (else held out of data_dir)
    val_labels: str | None = None  # label file of a flat val_dir (official ImageNet val)
    tfds_data_dir: str | None = None
    train_split: str = "train"
    val_split: str | None = "validation"  # None: no validation
    validation_fraction: float = 0.1
    limit_per_class: int | None = None
    image_size: int = 32
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    cache: bool | None = None
    # Optimization: AdamW, triangular one-cycle lr stepped per batch, global-norm clipping.
    epochs: int = 25
    batch_size: int = 512
    steps_per_epoch: int | None = None
    lr_max: float = 0.01
    lr_schedule: str = "onecycle"
    lr_peak_at: float = 0.4  # onecycle: the fraction of the steps at which lr_max is reached
    lr_scaling: str = "none"  # scale lr_max to batch_size from base_batch_size
    base_batch_size: int | None = None
    weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    clip_norm: float | None = 1.0
    label_smoothing: float = 0.0
    ema: bool = False
    ema_momentum: float = 0.9999
    # Augmentation (training split only).
    scale: tuple[float, float] = (0.75, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    translate: int = 0  # pixels: random shifts up to this far, reflect-filled, after the crop
    randaugment_ops: int = 2
    randaugment_magnitude: float = 12.0
    randaugment_magnitude_max: float = 30.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Run.
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite: bool = False  # start a new run in output_dir, removing an earlier run's outputs
    mixed_precision: bool = False
    jit_compile: bool = False
    # Reuse freed memory instead of unmapping it (glibc; training.allocator): a third faster on CPU.
    keep_freed_memory: bool = True
    verbose: int = 1
    # Distribution (read by training.distribute.make_strategy).
    strategy: str = "auto"
    cpu_replicas: int = 0
    tpu: str | None = None
    sync_bn: bool = False
    shard_policy: str = "auto"
    # Fault tolerance: back up the whole training state every this many steps (and at every
    # epoch's end); None: 50 times per epoch (training.resume.default_backup_freq). A rerun
    # resumes exactly at the step after the last backup.
    backup_freq: int | None = None
    # TensorFlow's op determinism: bit-identical reruns (and resumed runs) on the same machine.
    deterministic: bool = False

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | None = None) -> str:
        """Returns the config as JSON; with ``path``, also writes it there atomically.

        Example:
            >>> TrainConfig(epochs=3).to_json().count('"epochs": 3')
            1
        """
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            files.write_atomic(path, text)
        return text


# One line per key for ``python -m training.train --help`` (a test checks that every key has one).
HELP: dict[str, str] = {
    "description": "free text describing the recipe",
    "recipe": "the recipe the config came from (set by --recipe)",
    "model": "a convmixer_tf variant name (option --preset); dim, depth, kernel_size, patch_size, "
    "activation override its architecture",
    "dim": "channels of every layer (the paper's h)",
    "depth": "number of ConvMixer blocks",
    "kernel_size": "depthwise kernel size",
    "patch_size": "patch size (stride of the first convolution)",
    "activation": "gelu, relu or silu (None: the variant's)",
    "initialization": "keras (Keras' defaults) or pytorch (PyTorch's default initializers)",
    "keras_module": "keras, tf_keras, or auto (tf_keras for multi_worker, Keras 3 otherwise)",
    "data_dir": "an image folder DIR/<class>/<image>, or a root with train/ and val/",
    "dataset": "a TFDS dataset name (instead of data_dir), downloaded on first use",
    "val_dir": "a separate validation folder (else the last validation_fraction is held out)",
    "val_labels": "label file of a flat val_dir: '<image> <class>' per line",
    "tfds_data_dir": "TFDS data_dir",
    "train_split": "TFDS split to train on",
    "val_split": "TFDS split to validate on (None: no validation)",
    "validation_fraction": "image folders: the share of each class held out for validation",
    "limit_per_class": "use at most this many images per class (quick runs)",
    "image_size": "square training and evaluation size in pixels",
    "crop_pct": "evaluation: resize to image_size / crop_pct, then center-crop",
    "interpolation": "resize method: bilinear, bicubic, nearest or area",
    "cache": "keep decoded images in memory (None: when the split fits)",
    "epochs": "training epochs",
    "batch_size": "global batch size (all replicas together)",
    "steps_per_epoch": "steps per epoch (None: one pass over the training images)",
    "lr_max": "peak learning rate (AdamW)",
    "lr_schedule": "onecycle (triangular, stepped per batch) or constant",
    "lr_peak_at": "onecycle: the fraction of the steps at which lr_max is reached",
    "lr_scaling": "none, linear or sqrt: scale lr_max from base_batch_size to batch_size",
    "base_batch_size": "the batch size lr_max was tuned for (with lr_scaling)",
    "weight_decay": "AdamW's decoupled weight decay (not on BatchNorm or biases)",
    "adam_epsilon": "AdamW's epsilon",
    "clip_norm": "global gradient-norm clipping (None: off)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "ema": "validate and save an exponential moving average of every weight",
    "ema_momentum": "the average's momentum per step",
    "scale": "random resized crop: area range (min,max) of the crop; 1,1 turns it off",
    "ratio": "random resized crop: aspect-ratio range (min,max)",
    "hflip": "random horizontal flips (--no-hflip turns them off)",
    "translate": "random shifts up to this many pixels, reflect-filled, after the crop",
    "randaugment_ops": "RandAugment: ops per image (0: off)",
    "randaugment_magnitude": "RandAugment: magnitude, of randaugment_magnitude_max",
    "randaugment_magnitude_max": "RandAugment: the top magnitude (30 torchvision's, 10 timm's)",
    "color_jitter": "color jitter strength (0: off)",
    "random_erasing": "probability of random erasing (0: off)",
    "mixup_alpha": "mixup's Beta alpha (0: off)",
    "cutmix_alpha": "CutMix's Beta alpha (0: off)",
    "seed": "seed of the initialization, the data order and the augmentations",
    "output_dir": "run folder: model.keras, best.keras, config.json, metrics.json, backups",
    "overwrite": "start a new run in output_dir, removing an earlier run's outputs",
    "mixed_precision": "train in bfloat16 (CPU, TPU) or float16 (GPU); the saved model is float32",
    "jit_compile": "compile the training step with XLA",
    "keep_freed_memory": "reuse freed memory instead of unmapping it (glibc; faster on CPU)",
    "verbose": "Keras' progress output: 0 none, 1 bar, 2 a line per epoch",
    "strategy": "auto, default, mirrored, multi_worker or tpu (training.distribute)",
    "cpu_replicas": "split the CPU into this many logical devices (testing mirrored)",
    "tpu": "TPU name or address (strategy tpu)",
    "sync_bn": "synchronized BatchNorm across replicas",
    "shard_policy": "tf.data auto-shard policy: auto, data, file or off",
    "backup_freq": "back up the training state every this many steps (None: 50 per epoch)",
    "deterministic": "TensorFlow's op determinism: bit-identical reruns on the same machine",
}


def field_names() -> list[str]:
    """The valid config keys, sorted."""
    return sorted(f.name for f in dataclasses.fields(TrainConfig))


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


def _numbers(value: Any) -> list:
    return list(value) if isinstance(value, tuple | list) else [value]


def check(config: TrainConfig) -> None:
    """Raises a ValueError naming the first field whose value makes no sense."""
    for field in dataclasses.fields(config):  # every number finite (json reads "Infinity")
        value = getattr(config, field.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in _numbers(value)):
            raise ValueError(f"`{field.name}` must be finite. Received: {field.name}={value!r}")
    if not str(config.output_dir).strip():
        raise ValueError("`output_dir` (--output-dir) must name a folder. Received: ''")
    for name in ("dim", "depth", "kernel_size", "patch_size", "limit_per_class",
                 "base_batch_size"):  # fmt: skip
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be positive or None. Received: {name}={value}")
    for name in ("seed", "cpu_replicas", "verbose", "mixup_alpha", "cutmix_alpha", "translate"):
        if getattr(config, name) < 0:
            raise ValueError(f"`{name}` must be >= 0. Received: {name}={getattr(config, name)}")
    if not 0.0 <= config.ema_momentum < 1.0:
        raise ValueError(f"`ema_momentum` must be in [0, 1). Received: {config.ema_momentum}")
    _choice("keras_module", config.keras_module, TRAINING_KERAS_MODULES)
    _choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    _choice("interpolation", config.interpolation, INTERPOLATIONS)
    _choice("lr_scaling", config.lr_scaling, LR_SCALING_RULES)
    _choice("shard_policy", config.shard_policy, SHARD_POLICIES)
    _choice("activation", config.activation, (None, *constants.ACTIVATIONS))
    _choice("initialization", config.initialization, constants.INITIALIZATIONS)
    if config.backup_freq is not None and config.backup_freq < 1:
        raise ValueError(
            f"`backup_freq` must be a positive number of steps or None (the default). "
            f"Received: backup_freq={config.backup_freq}"
        )
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(config, name)}")
    if config.image_size**2 > image_files.max_image_pixels():
        raise ValueError(
            f"`image_size` {config.image_size} means {config.image_size**2} pixels per image, "
            f"above the image limit of {image_files.max_image_pixels()} "
            f"({image_files.LIMIT_VARIABLE})."
        )
    if not 0.0 < config.lr_peak_at < 0.8:
        raise ValueError(
            f"`lr_peak_at` must be in (0, 0.8): the one-cycle schedule reaches lr_max at that "
            f"fraction of the steps and lr_max / 20 at 0.8. Received: {config.lr_peak_at}"
        )
    if not config.lr_max > 0:
        raise ValueError(f"`lr_max` must be positive. Received: lr_max={config.lr_max}")
    if not 0.0 <= config.weight_decay < 1.0:
        raise ValueError(
            f"`weight_decay` must be in [0, 1). Received: weight_decay={config.weight_decay}"
        )
    if not config.adam_epsilon > 0:
        raise ValueError(f"`adam_epsilon` must be positive. Received: {config.adam_epsilon}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise ValueError(f"`clip_norm` must be positive or None. Received: {config.clip_norm}")
    if not 0.0 <= config.validation_fraction < 1.0:
        raise ValueError(
            "`validation_fraction` must be in [0, 1). "
            f"Received: validation_fraction={config.validation_fraction}"
        )
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ValueError(f"`steps_per_epoch` must be positive. Received: {config.steps_per_epoch}")
    if (config.val_dir or config.val_labels) and config.data_dir is None:
        raise ValueError("`val_dir` and `val_labels` apply to image folders: give `data_dir`.")
    if config.data_dir is not None and config.dataset is not None:
        raise ValueError(
            "Give either `data_dir` (an image folder) or `dataset` (a TFDS name), not both. "
            f"Received: data_dir={config.data_dir!r}, dataset={config.dataset!r}"
        )
    for name in ("random_erasing", "color_jitter"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value}")
    if not (config.randaugment_ops >= 0 and config.randaugment_magnitude >= 0):
        raise ValueError(
            "`randaugment_ops` and `randaugment_magnitude` must be >= 0 (0 turns RandAugment "
            f"off). Received: randaugment_ops={config.randaugment_ops}, "
            f"randaugment_magnitude={config.randaugment_magnitude}"
        )
    if not 0 < config.randaugment_magnitude_max >= config.randaugment_magnitude:
        raise ValueError(
            "`randaugment_magnitude` must be at most `randaugment_magnitude_max` (the top bin, "
            "positive: 30 for torchvision's, 10 for timm's). Received: "
            f"{config.randaugment_magnitude} of {config.randaugment_magnitude_max}"
        )
    if config.translate >= config.image_size:
        raise ValueError(
            f"`translate` must be below `image_size` ({config.image_size}): reflection fills at "
            f"most image_size - 1 pixels. Received: translate={config.translate}"
        )
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1). Received: {config.label_smoothing}")
    lo, hi = config.scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"`scale` must be (min, max) with 0 < min <= max <= 1. Received: {config.scale}"
        )
    if not 0.0 < config.ratio[0] <= config.ratio[1]:
        raise ValueError(
            f"`ratio` must be (min, max) with 0 < min <= max. Received: {config.ratio}"
        )


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``tuple[float, float]`` -> (tuple[...], False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Converts ``value`` (a typed value or a command-line string) to the field's type."""
    base, optional = _base_type(annotation)
    if isinstance(value, str) and base is not str:
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"`{name}` must be true or false. Received: {name}={value!r}")
        if typing.get_origin(base) is tuple:
            value = json.loads(text) if text.startswith("[") else text.split(",")
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"Cannot parse `{name}` from {value!r}: {e}") from e
    if value is None:
        if not optional:
            raise ValueError(f"`{name}` cannot be None.")
        return None
    try:
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is tuple:
            item_types = typing.get_args(base)
            if len(value) != len(item_types):
                raise TypeError
            return tuple(t(v) for t, v in zip(item_types, value, strict=True))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be of type {getattr(annotation, '__name__', annotation)}. "
            f"Received: {name}={value!r}"
        ) from e
    raise TypeError(f"Unsupported config field type {annotation} for `{name}`.")


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Returns a copy of ``config`` with ``overrides`` applied and checked.

    Keys may use dashes (``batch-size``) or underscores; string values are parsed to the
    field's type (``"0.5"``, ``"none"``, ``"true"``, ``"0.08,1"`` for a pair).

    Raises:
        ValueError: an unknown key (the message lists the valid keys) or a bad value.

    Example:
        >>> apply_overrides(TrainConfig(), {"lr-max": "0.02", "scale": "0.08,1"}).scale
        (0.08, 1.0)
    """
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ValueError(f"Unknown config key {key!r}. Valid keys: {', '.join(field_names())}")
        changes[name] = _coerce(name, value, hints[name])
    return dataclasses.replace(config, **changes)


def available_recipes() -> list[str]:
    """Names of the recipe files in ``training/recipes/``, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def from_recipe(name: str) -> TrainConfig:
    """Loads a named recipe (``training/recipes/<name>.json``) or a recipe file path.

    Raises:
        ValueError: an unknown recipe name, invalid JSON, or an unknown key in the file.

    Example:
        >>> from_recipe("cifar10_convmixer_256_8").batch_size
        512
    """
    if name.endswith(".json") or os.sep in name:
        path = pathlib.Path(name)
        if not path.is_file():
            raise ValueError(f"Recipe file not found: {name!r}")
    else:
        path = RECIPES_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(
                f"Unknown recipe {name!r}. Available recipes: {', '.join(available_recipes())}"
            )
    return from_json(path, recipe=path.stem)


def from_json(path: str | os.PathLike, recipe: str | None = None) -> TrainConfig:
    """Reads a config JSON file (a recipe or a run's saved ``config.json``)."""
    try:
        values = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a JSON object.")
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in config file {str(path)!r}. "
            f"Valid keys: {', '.join(field_names())}"
        )
    if recipe is not None:
        values["recipe"] = recipe
    return apply_overrides(TrainConfig(), values)
