"""Loading, saving and rebuilding ConvMixer models: the one place every tool goes through.

- :func:`model_arguments` reads a built ConvMixer's :func:`convmixer_tf.ConvMixer` arguments off
  its layers (names, configs and shapes: nothing of ours is stored in the file for it).
- :func:`rebuild` builds the same model again, with Keras 3 or tf_keras (the only bridge between
  the two), a static batch size, or other overrides, and copies the weights by layer name.
- :func:`load_model` opens a ``.keras`` file saved by Keras 3 or tf_keras and returns a model of
  the Keras asked for. It never runs code from the file: only ``.keras`` zip archives are read,
  with ``safe_mode=True`` (no Lambda, no pickled functions); legacy HDF5 / SavedModel inputs are
  refused.
- :func:`save_model` writes a ``.keras`` file atomically (:mod:`convmixer_tf.files`).
- :func:`training_run_settings` reads what a training run's folder says about a model file in
  it (class names, evaluation crop and interpolation), for the tools that take a model file.

Example:
    >>> import os, tempfile
    >>> import convmixer_tf
    >>> model = convmixer_tf.ConvMixer(16, 2, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> convmixer_tf.model_arguments(model)["kernel_size"]
    5
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> convmixer_tf.saving.save_model(model, path)
    >>> convmixer_tf.load_model(path, keras_module="tf_keras").__class__.__module__.split(".")[0]
    'tf_keras'
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from convmixer_tf import files
from convmixer_tf import model as model_lib
from convmixer_tf.constants import (
    INTERPOLATIONS,
    KERAS_MODULES,
    RUN_CLASS_NAMES_FILE,
    RUN_CONFIG_FILE,
)

REQUIRED_LAYERS = ("stem_conv", "stem_act", "stem_bn", "blocks_0_dwconv")


def model_arguments(model) -> dict:
    """Recovers the :func:`convmixer_tf.ConvMixer` arguments of a built ConvMixer.

    Works on Keras 3 and tf_keras models. Raises a ValueError naming the missing layer if
    ``model`` is not a ConvMixer built by :mod:`convmixer_tf`.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 2, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> args = convmixer_tf.model_arguments(model)
        >>> args["dim"], args["depth"], args["patch_size"], args["num_classes"]
        (16, 2, 2, 10)
    """
    names = {layer.name for layer in getattr(model, "layers", [])}
    for required in REQUIRED_LAYERS:
        if required not in names:
            raise ValueError(
                f"Model {getattr(model, 'name', model)!r} is not a ConvMixer built by "
                f"convmixer_tf: it has no layer named {required!r}."
            )
    depth = 0
    while f"blocks_{depth}_dwconv" in names:
        depth += 1
    stem = model.get_layer("stem_conv")
    dwconv = model.get_layer("blocks_0_dwconv")
    activation = model.get_layer("stem_act").get_config()["activation"]
    if not isinstance(activation, str):
        raise ValueError(f"Unsupported activation in 'stem_act': {activation!r}")
    args = {
        "dim": int(stem.filters),
        "depth": depth,
        "kernel_size": int(dwconv.kernel_size[0]),
        "patch_size": int(stem.kernel_size[0]),
        "activation": activation,
        "input_shape": tuple(model.input_shape[1:]),
        "include_preprocessing": "preprocessing" in names,
        "include_top": "head" in names,
        "synchronized_bn": bool(model.get_layer("stem_bn").get_config().get("synchronized")),
        "name": model.name,
    }
    if args["include_preprocessing"]:
        norm = model.get_layer("preprocessing")
        mean = np.ravel(np.asarray(norm.mean, dtype="float64"))
        variance = np.ravel(np.asarray(norm.variance, dtype="float64"))
        args["mean"] = tuple(float(v) for v in mean / 255.0)
        args["std"] = tuple(float(v) for v in np.sqrt(variance) / 255.0)
    if args["include_top"]:
        head = model.get_layer("head")
        args["num_classes"] = int(head.units)
        head_activation = head.get_config()["activation"]
        args["classifier_activation"] = None if head_activation == "linear" else head_activation
    else:
        args["pooling"] = "avg" if "avg_pool" in names else "max" if "max_pool" in names else None
    return args


def rebuild(model, *, keras_module: str = "keras", batch_size: int | None = None, **overrides):
    """Builds ``model``'s ConvMixer again with :func:`convmixer_tf.ConvMixer`, same weights.

    Args:
        model: a ConvMixer (Keras 3 or tf_keras), e.g. loaded from a ``.keras`` file.
        keras_module: ``"keras"`` (Keras 3) or ``"tf_keras"`` (for tfmot, multi-worker ``fit``).
        batch_size: a static batch size for the input (1 for edge exports) or None.
        **overrides: :func:`convmixer_tf.ConvMixer` arguments to change (for example
            ``include_preprocessing=False``). Layers of the rebuilt model take the weights of
            the source's layers of the same name; the shapes must match.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> convmixer_tf.rebuild(model, keras_module="tf_keras", batch_size=1).input_shape
        (1, 16, 16, 3)
    """
    args = {**model_arguments(model), **overrides}
    target_keras = model_lib.resolve_keras(keras_module)
    input_shape = args.pop("input_shape")
    pixels = target_keras.Input(shape=input_shape, batch_size=batch_size, name="pixels")
    rebuilt = model_lib.ConvMixer(**args, input_tensor=pixels, keras_module=keras_module)
    for layer in rebuilt.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name).get_weights()
        target = [tuple(w.shape) for w in layer.get_weights()]
        if [w.shape for w in source] != target:
            raise ValueError(
                f"Cannot rebuild layer {layer.name!r}: weight shapes differ "
                f"({[w.shape for w in source]} vs {target})."
            )
        layer.set_weights(source)
    return rebuilt


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
UNSAFE_HINT = (
    "Files that hold code (Lambda layers, legacy HDF5) load only with unsafe=True "
    "(--unsafe): pass it only for files you trust."
)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise ValueError(f"Model file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(
            f"{path!r} is a directory; give a .keras file (SavedModel folders are not loaded)."
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"Model file {path!r} is empty.")


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def _archive_metadata(path: str) -> dict:
    """The metadata of a ``.keras`` archive; ValueError naming the file if it is not one."""
    if not zipfile.is_zipfile(path):
        kind = "a legacy HDF5 model" if _is_hdf5(path) else "truncated, corrupt, or another format"
        raise ValueError(
            f"{path!r} is not a .keras archive (a zip file): it is {kind}. {UNSAFE_HINT}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            json.loads(archive.read("config.json"))
            return json.loads(archive.read("metadata.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable .keras archive: {e}") from e


def load_model(
    path: str | os.PathLike,
    *,
    keras_module: str = "keras",
    compile: bool = False,
    unsafe: bool = False,
):
    """Loads a ``.keras`` file saved by Keras 3 or by tf_keras, as a model of ``keras_module``.

    Nothing stored in the file runs: only ``.keras`` archives are read, with ``safe_mode=True``
    (a Lambda layer or a pickled function is an error), whichever Keras saved them. tf_keras
    would send any other file to its legacy HDF5 loader, which runs Lambdas outside any safe
    mode, so other files are refused. ``unsafe=True`` lifts both (``safe_mode=False``, legacy
    HDF5 files through tf_keras): only for files you trust.

    A ConvMixer saved by the other Keras is rebuilt (:func:`rebuild`) with the same weights;
    other models must be asked for with the Keras that saved them. Files with this project's
    fused layers (``convmixer_tf>GELU``, ``convmixer_tf>FusedBatchNormalization``,
    ``convmixer_tf>FusedDepthwiseConv2D``: files of version 0.1, or a built model saved with
    ``model.save`` rather than :func:`save_model`) load too.

    Raises:
        ValueError: naming the file, if it is missing, empty, not a ``.keras`` archive, holds
            code (without ``unsafe``), or cannot be deserialized.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.load_model("runs/cifar10/model.keras")  # doctest: +SKIP
    """
    from convmixer_tf import fused  # noqa: F401 (registers the fused classes of older files)

    path = os.fspath(path)
    if keras_module not in KERAS_MODULES:
        raise ValueError(
            f"`keras_module` must be one of {KERAS_MODULES}. "
            f"Received: keras_module={keras_module!r}"
        )
    _check_file(path)
    if unsafe and not zipfile.is_zipfile(path) and _is_hdf5(path):
        saved_with = "tf_keras"
        import tf_keras

        def load(path, compile, safe_mode):
            del safe_mode  # the legacy HDF5 loader has none
            return tf_keras.models.load_model(path, compile=compile)
    else:
        metadata = _archive_metadata(path)
        # tf_keras records its own version (2.x) as the archive's "keras_version".
        version = str(metadata.get("keras_version", ""))
        saved_with = "tf_keras" if version.startswith("2.") else "keras"
        module = model_lib.resolve_keras(saved_with)
        load = module.saving.load_model if saved_with == "keras" else module.models.load_model
    try:
        model = load(path, compile=compile, safe_mode=not unsafe)
    except Exception as e:  # noqa: BLE001 (Keras raises many types; report them as one)
        hint = f" {UNSAFE_HINT}" if "safe_mode" in str(e) else ""
        message = _short_reason(str(e))
        raise ValueError(
            f"Cannot load model {path!r} ({saved_with}): {type(e).__name__}: {message}{hint}"
        ) from e
    if saved_with != keras_module:
        try:
            model = rebuild(model, keras_module=keras_module)
        except ValueError as e:
            raise ValueError(
                f"{path!r} was saved by {saved_with} and cannot be rebuilt with {keras_module}: {e}"
            ) from e
    return model


def _short_reason(message: str, limit: int = 300) -> str:
    """The innermost reason of a Keras deserialization error, on one line (Keras nests the
    whole model config into its messages)."""
    reason = message.rsplit("Exception encountered:", 1)[-1]
    reason = reason.split("Full object config:", 1)[0]
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def stock_model(model):
    """The same model built from stock Keras 3 layers only: what users receive.

    A tf_keras ConvMixer (multi-worker training) is rebuilt as Keras 3; the CPU-fused training
    layers of :mod:`convmixer_tf.fused` are swapped for the Keras classes they extend (same
    config, same weights). A model trained with mixed precision comes back in float32 (its
    variables were float32 all along): the file computes the same on every machine, and
    converters see float32 layers. The result holds no optimizer: it loads with stock Keras
    (``keras.saving.load_model(path)``, ``safe_mode=True``) in a process that never imports
    this project, and computes the same function.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3), num_classes=10)
        >>> type(model.get_layer("stem_act")).__name__
        'GELU'
        >>> type(stock_model(model).get_layer("stem_act")).__name__
        'Activation'
    """
    from convmixer_tf import fused

    if model_lib.is_tf_keras_model(model):
        model = rebuild(model, keras_module="keras")
    import keras

    def clone(layer):
        layer_class = fused.stock_class(layer) or type(layer)
        config = layer.get_config()
        if "dtype" in config:  # mixed_bfloat16 -> float32, the variables' dtype
            config["dtype"] = layer.dtype_policy.variable_dtype
        return layer_class.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone)
    # clone_model compiles the clone like the source: a new Model over the same graph carries
    # no optimizer, loss or schedule (those stay in the run's backup).
    inputs, outputs = (
        tensors[0] if len(tensors) == 1 else tensors for tensors in (clone.inputs, clone.outputs)
    )
    stock = keras.Model(inputs, outputs, name=model.name)
    for layer in stock.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return stock


def save_model(model, path: str | os.PathLike) -> None:
    """Saves the model users receive: :func:`stock_model` as ``.keras``, atomically.

    Training-time state (optimizer, learning-rate schedule) is not stored: a resumable run keeps
    it in its backup directory.

    Example:
        >>> from convmixer_tf import saving
        >>> saving.save_model(model, "convmixer.keras")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"The output file must end with '.keras'. Received: {path!r}")
    deliverable = stock_model(model)
    with files.replacing(path) as tmp:
        deliverable.save(tmp)


def training_run_settings(model_path: str | os.PathLike) -> dict:
    """What the training run's folder says about a model file in it: ``class_names`` (its
    ``class_names.json``), and ``crop_pct`` and ``interpolation`` of the evaluation transform
    (its ``config.json``); only the keys whose file is there (``{}`` for a file elsewhere).

    Raises:
        ValueError: naming a file beside the model that is not what training writes.

    Example:
        >>> training_run_settings("no-run-here/model.keras")  # no files beside it
        {}
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(model_path)))
    settings: dict = {}
    config_path = os.path.join(folder, RUN_CONFIG_FILE)
    if os.path.isfile(config_path):
        config = _read_run_json(config_path)
        # A key the file lacks is left to the caller's default (training writes both).
        crop_pct = config.get("crop_pct", 1.0) if isinstance(config, dict) else None
        interpolation = (
            config.get("interpolation", "bilinear") if isinstance(config, dict) else None
        )
        if not (
            isinstance(crop_pct, int | float) and not isinstance(crop_pct, bool)
            and 0 < crop_pct <= 1 and interpolation in INTERPOLATIONS
        ):  # fmt: skip
            raise ValueError(
                f"{config_path!r} (beside the model) is not a training run's config: "
                f"crop_pct in (0, 1] and interpolation in {INTERPOLATIONS} expected."
            )
        if "crop_pct" in config:
            settings["crop_pct"] = float(crop_pct)
        if "interpolation" in config:
            settings["interpolation"] = interpolation
    names_path = os.path.join(folder, RUN_CLASS_NAMES_FILE)
    if os.path.isfile(names_path):
        names = _read_run_json(names_path)
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(
                f"{names_path!r} (beside the model) must be a JSON list of class names, one per "
                "output of the model."
            )
        settings["class_names"] = names
    return settings


def _read_run_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} (beside the model) is not valid JSON: {e}") from e
