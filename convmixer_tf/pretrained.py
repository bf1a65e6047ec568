"""Imports the paper's PyTorch checkpoints (timm's and the official release's) into Keras models.

Two checkpoint formats are read, neither needing PyTorch:

- timm's ``.safetensors`` (what the Hugging Face hub serves for ``timm/convmixer_*.in1k``), read
  with the ``safetensors`` package (NumPy API);
- ``torch.save`` files (``.pth.tar`` of the official release, with the weights under
  ``"state_dict"``; ``.pth`` / ``.pt`` / ``.bin`` holding a bare state dict), read by
  :mod:`convmixer_tf.torch_pickle`, which refuses any pickle that would run code.

Two naming schemes are understood, with or without DataParallel's ``module.`` prefix:

=============================  ==========================  =============================
timm                           official (nn.Sequential)    Keras layer
=============================  ==========================  =============================
``stem.0``                     ``0``                       ``stem_conv``
``stem.2``                     ``2``                       ``stem_bn``
``blocks.{i}.0.fn.0``          ``{3+i}.0.fn.0``            ``blocks_{i}_dwconv``
``blocks.{i}.0.fn.2``          ``{3+i}.0.fn.2``            ``blocks_{i}_dwconv_bn``
``blocks.{i}.1``               ``{3+i}.1``                 ``blocks_{i}_pwconv``
``blocks.{i}.3``               ``{3+i}.3``                 ``blocks_{i}_pwconv_bn``
``head``                       ``{3+depth+2}``             ``head``
=============================  ==========================  =============================

Every tensor is checked: unknown or missing tensors and shape mismatches are errors naming the
tensor; only BatchNorm's ``num_batches_tracked`` counters are dropped, and the ``head`` tensors
when the model has no ``head`` layer (``include_top=False``). Nothing is written into the model
until every tensor has passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import socket
import urllib.parse

import numpy as np

from convmixer_tf import files, presets, saving, torch_pickle

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
URL_SCHEMES = ("http", "https", "file")
# Seconds a download may wait for the server (connect, or between two reads).
DOWNLOAD_TIMEOUT_S = 20
CACHE_SUBDIR = "convmixer_tf"
IGNORED_BUFFER = "num_batches_tracked"  # BatchNorm's step counter: no Keras counterpart

# PyTorch parameter names of each kind of layer, in the order of the Keras layer's weights.
TORCH_PARAMS = {
    "conv": ("weight", "bias"),
    "dwconv": ("weight", "bias"),
    "dense": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var"),
}

# timm's module names -> (Keras layer name, kind). Official names are first rewritten into these.
TIMM_LAYERS = (
    (re.compile(r"stem\.0"), "stem_conv", "conv"),
    (re.compile(r"stem\.2"), "stem_bn", "bn"),
    (re.compile(r"blocks\.(\d+)\.0\.fn\.0"), "blocks_{}_dwconv", "dwconv"),
    (re.compile(r"blocks\.(\d+)\.0\.fn\.2"), "blocks_{}_dwconv_bn", "bn"),
    (re.compile(r"blocks\.(\d+)\.1"), "blocks_{}_pwconv", "conv"),
    (re.compile(r"blocks\.(\d+)\.3"), "blocks_{}_pwconv_bn", "bn"),
    (re.compile(r"head"), "head", "dense"),
)

# The official nn.Sequential: 0 conv, 1 act, 2 BN, 3..3+depth-1 blocks, then pool, flatten, head.
OFFICIAL_STEM = {"0": "stem.0", "2": "stem.2"}
OFFICIAL_FIRST_BLOCK = 3
OFFICIAL_HEAD_AFTER_BLOCKS = 2  # AdaptiveAvgPool2d and Flatten sit between the blocks and head


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_pretrained` found in a checkpoint.

    ``num_classes`` is None for a checkpoint without a classifier; ``ignored`` lists the tensors
    deliberately not loaded (BatchNorm step counters; the head with ``include_top=False``).
    """

    scheme: str
    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    num_classes: int | None
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"dim={self.dim}, depth={self.depth}, kernel_size={self.kernel_size}, "
            f"patch_size={self.patch_size}, num_classes={self.num_classes}"
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into ``{tensor name: np.ndarray}``, without PyTorch.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (``.pth.tar``, ``.pth``, ``.pt``,
            ``.bin``) holding a state dict or a dict with the key ``"state_dict"``.

    Example:
        >>> from convmixer_tf import pretrained
        >>> state = pretrained.read_state_dict("tests/fixtures/pretrained/timm_gelu_k3.safetensors")
        >>> state["stem.0.weight"].shape
        (16, 3, 2, 2)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except SafetensorError as e:
            raise ValueError(f"Cannot read {path!r} as a .safetensors checkpoint: {e}") from e
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(
            f"Unknown checkpoint format {path!r}: expected a file ending with one of "
            f"{CHECKPOINT_SUFFIXES}"
        )
    checkpoint = torch_pickle.load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a dict of tensors")
    if "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    elif not all(isinstance(v, np.ndarray) for v in checkpoint.values()):
        raise ValueError(
            f"{path!r} is neither a state dict nor a dict with the key 'state_dict'. "
            f"Its keys: {sorted(map(str, checkpoint))[:10]}"
        )
    not_tensors = sorted(str(k) for k, v in checkpoint.items() if not isinstance(v, np.ndarray))
    if not_tensors:
        raise ValueError(f"The state dict in {path!r} has non-tensor entries: {not_tensors[:10]}")
    return dict(checkpoint)


def _strip_data_parallel(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "module."
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _official_depth(keys) -> int:
    blocks = {int(m.group(1)) for k in keys if (m := re.fullmatch(r"(\d+)\.0\.fn\.0\.weight", k))}
    return len(blocks)


def _official_to_timm(key: str, depth: int) -> str | None:
    """``"4.0.fn.0.weight"`` -> ``"blocks.1.0.fn.0.weight"`` (depth known); None if unknown."""
    index, _, rest = key.partition(".")
    if index in OFFICIAL_STEM:
        return f"{OFFICIAL_STEM[index]}.{rest}"
    if not index.isdigit():
        return None
    block = int(index) - OFFICIAL_FIRST_BLOCK
    if 0 <= block < depth:
        return f"blocks.{block}.{rest}"
    if block == depth + OFFICIAL_HEAD_AFTER_BLOCKS:
        return f"head.{rest}"
    return None


def _timm_to_official(key: str, depth: int) -> str:
    """Inverse of :func:`_official_to_timm`, to name missing tensors as the checkpoint would."""
    for official, timm in OFFICIAL_STEM.items():
        if key.startswith(timm + "."):
            return official + key[len(timm) :]
    if key.startswith("head."):
        return f"{OFFICIAL_FIRST_BLOCK + depth + OFFICIAL_HEAD_AFTER_BLOCKS}{key[4:]}"
    block, rest = re.fullmatch(r"blocks\.(\d+)(\..*)", key).groups()
    return f"{OFFICIAL_FIRST_BLOCK + int(block)}{rest}"


def _to_keras_layout(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layouts -> Keras: conv OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1),
    Linear (out,in) -> (in,out); 1-d tensors unchanged."""
    if param != "weight" or kind == "bn" or value.ndim < 2:
        return value
    if kind == "dense":
        return value.T
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    return value.transpose(2, 3, 0, 1)  # dwconv


def _checkpoint_info(state: dict[str, np.ndarray], scheme: str, source: str) -> CheckpointInfo:
    def shape_of(key: str) -> tuple:
        if key not in state:
            raise ValueError(f"{source}: tensor {key!r} not found; is it a ConvMixer checkpoint?")
        return state[key].shape

    stem = shape_of("stem.0.weight")
    if len(stem) != 4 or stem[1] != 3 or stem[2] != stem[3]:
        raise ValueError(
            f"{source}: 'stem.0.weight' has shape {stem}; expected (dim, 3, patch, patch)"
        )
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    kernel = shape_of("blocks.0.0.fn.0.weight")[-1] if depth else 0
    head = state.get("head.weight")
    return CheckpointInfo(
        scheme=scheme,
        dim=stem[0],
        depth=depth,
        kernel_size=kernel,
        patch_size=stem[2],
        num_classes=None if head is None else head.shape[0],
    )


def _to_timm_names(
    state_dict: dict[str, np.ndarray], source: str
) -> tuple[str, dict[str, np.ndarray], dict[str, str], list[str]]:
    """Strips ``module.``, detects the naming scheme and renames official keys to timm's.

    Returns the scheme, the renamed tensors, the original name of each renamed key, and the
    keys that fit neither scheme.
    """
    state = _strip_data_parallel(dict(state_dict))
    if "stem.0.weight" in state:
        scheme, depth = "timm", None
    elif "0.weight" in state:
        scheme, depth = "official", _official_depth(state)
    else:
        raise ValueError(
            f"{source}: neither timm's names ('stem.0.weight', ...) nor the official "
            f"nn.Sequential names ('0.weight', ...). First keys: {sorted(state)[:8]}"
        )
    original_name: dict[str, str] = {}
    unexpected: list[str] = []
    timm_state: dict[str, np.ndarray] = {}
    for key, value in state.items():
        timm_key = key if scheme == "timm" else _official_to_timm(key, depth)
        if timm_key is None:
            unexpected.append(key)
            continue
        original_name[timm_key] = key
        timm_state[timm_key] = value
    return scheme, timm_state, original_name, unexpected


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Reads a checkpoint's naming scheme and architecture from its tensors' shapes.

    The activation (GELU or ReLU) is not visible in the weights.

    Example:
        >>> from convmixer_tf import pretrained
        >>> path = "tests/fixtures/pretrained/official_relu_k4.pth.tar"
        >>> pretrained.inspect_checkpoint(path).describe()
        'dim=16, depth=2, kernel_size=4, patch_size=2, num_classes=10'
    """
    source = repr(os.fspath(path))
    scheme, timm_state, _, _ = _to_timm_names(read_state_dict(path), source)
    return _checkpoint_info(timm_state, scheme, source)


def load_state_dict(model, state_dict: dict[str, np.ndarray], source: str = "state dict"):
    """Loads a PyTorch ConvMixer state dict (NumPy arrays, timm or official names) into ``model``.

    See :func:`load_pretrained`, which reads the file and calls this. ``source`` names the
    checkpoint in error messages.

    Example:
        >>> import convmixer_tf
        >>> from convmixer_tf import pretrained
        >>> model = convmixer_tf.ConvMixer(16, 2, 3, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> path = "tests/fixtures/pretrained/timm_gelu_k3.safetensors"
        >>> pretrained.load_state_dict(model, pretrained.read_state_dict(path)).scheme
        'timm'
    """
    scheme, timm_state, original_name, unexpected = _to_timm_names(state_dict, source)
    ignored: list[str] = []
    info = _checkpoint_info(timm_state, scheme, source)
    arch = saving.model_arguments(model)
    fields = ("dim", "depth", "kernel_size", "patch_size")
    if arch.get("num_classes") is not None:
        fields += ("num_classes",)
    if any(getattr(info, f) != arch[f] for f in fields):
        found = ", ".join(f"{f}={arch[f]}" for f in fields)
        raise ValueError(
            f"{source} does not fit the model: the checkpoint holds a ConvMixer with "
            f"{info.describe()}, the model {model.name!r} has {found}. Build the model with the "
            "checkpoint's architecture (see convmixer_tf.PRESETS)."
        )

    # Group the tensors by Keras layer.
    groups: dict[str, tuple[str, str, dict[str, str]]] = {}  # layer -> (kind, module, param->key)
    for timm_key in timm_state:
        module, _, param = timm_key.rpartition(".")
        if param == IGNORED_BUFFER:
            ignored.append(original_name[timm_key])
            continue
        for pattern, layer_template, kind in TIMM_LAYERS:
            match = pattern.fullmatch(module)
            if match and param in TORCH_PARAMS[kind]:
                layer = layer_template.format(*match.groups())
                groups.setdefault(layer, (kind, module, {}))[2][param] = timm_key
                break
        else:
            unexpected.append(original_name[timm_key])

    def display(timm_key: str) -> str:
        return timm_key if scheme == "timm" else _timm_to_official(timm_key, info.depth)

    layers = {layer.name: layer for layer in model.layers if layer.weights}
    if "head" not in layers and "head" in groups:
        # include_top=False: the classifier has nowhere to go; dropped on purpose.
        ignored.extend(original_name[k] for k in groups.pop("head")[2].values())
    unexpected.extend(
        original_name[k] for name in groups if name not in layers for k in groups[name][2].values()
    )
    missing: list[str] = []
    mismatched: list[str] = []
    assignments = []
    for name, layer in layers.items():
        if name == "preprocessing":
            continue  # the model's own input normalization, not part of the checkpoint
        if name not in groups:
            missing.append(f"{name} (no tensors in the checkpoint)")
            continue
        kind, module, params = groups[name]
        absent = [f"{module}.{p}" for p in TORCH_PARAMS[kind] if p not in params]
        if absent:
            missing.extend(display(k) for k in absent)
            continue
        targets = layer.get_weights()
        values = []
        for param, target in zip(TORCH_PARAMS[kind], targets, strict=True):
            key = params[param]
            value = _to_keras_layout(kind, param, timm_state[key])
            if value.shape != target.shape:
                mismatched.append(
                    f"{original_name[key]}: checkpoint shape {timm_state[key].shape} -> "
                    f"{value.shape} in Keras layout, layer {name!r} expects {target.shape}"
                )
            values.append(value.astype(target.dtype))
        assignments.append((layer, values))

    problems = []
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)}")
    if missing:
        problems.append(f"missing tensors: {sorted(missing)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"Cannot load {source} into model {model.name!r}: " + " | ".join(problems))

    for layer, values in assignments:
        layer.set_weights(values)
    return dataclasses.replace(info, ignored=tuple(sorted(ignored)))


def load_pretrained(model, path: str | os.PathLike) -> CheckpointInfo:
    """Loads a timm ``.safetensors`` or an official ``.pth.tar`` checkpoint into a ConvMixer.

    The model must have the checkpoint's architecture (dim, depth, kernel size, patch size and,
    with a classifier, number of classes; these are read from the tensors' shapes and compared
    before anything is loaded). The activation cannot be read from a checkpoint: build GELU or
    ReLU as the preset says (convmixer_768_32 is ReLU). Works for Keras 3 and tf_keras models.
    With ``include_top=False`` the checkpoint's ``head`` tensors are ignored (listed in the
    returned ``ignored``).

    Args:
        model: a model built by :func:`convmixer_tf.ConvMixer` or :func:`convmixer_tf.create_model`.
        path: the checkpoint file (see :func:`read_state_dict` for the formats).

    Returns:
        A :class:`CheckpointInfo`: naming scheme, architecture found, tensors ignored.

    Raises:
        ValueError: unknown format, unsafe pickle, architecture mismatch, or missing, unexpected
            or mis-shaped tensors (each named).

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.create_model("convmixer_768_32")  # doctest: +SKIP
        >>> path = "convmixer_768_32_ks7_p7_relu.pth.tar"  # the official release
        >>> convmixer_tf.load_pretrained(model, path)  # doctest: +SKIP
        CheckpointInfo(scheme='official', dim=768, depth=32, kernel_size=7, patch_size=7, ...)
    """
    path = os.fspath(path)
    info = load_state_dict(model, read_state_dict(path), source=repr(path))
    logger.info("Loaded %s (%s names, %s)", path, info.scheme, info.describe())
    return info


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(
    url: str,
    *,
    sha256: str | None = None,
    fname: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """Downloads ``url`` once into the Keras cache (``~/.keras/convmixer_tf/``); returns the path.

    With ``sha256`` the file is verified by ``keras.utils.get_file``. Without one, the hash is
    computed, logged and recorded next to the file (``<file>.sha256``) on first download, and
    later uses verify against that record (trust on first use): a file that changed is an error.

    Args:
        url: ``https://``, ``http://`` or ``file://`` address of a checkpoint.
        sha256: the expected SHA-256, if known.
        fname: the file name in the cache; by default the URL's last component, prefixed with a
            hash of the URL so that different ``.../model.safetensors`` do not collide.
        cache_dir: the cache folder (default ``$KERAS_HOME`` or ``~/.keras``).

    Example:
        >>> from convmixer_tf import pretrained
        >>> path = pretrained.fetch_checkpoint(
        ...     convmixer_tf.get_preset("convmixer_768_32").url)  # doctest: +SKIP
    """
    import keras

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in URL_SCHEMES:
        raise ValueError(f"Unsupported URL scheme {parsed.scheme!r}. Received: url={url!r}")
    if fname is None:
        url_hash = hashlib.sha256(url.encode()).hexdigest()[:8]
        fname = f"{url_hash}_{os.path.basename(parsed.path) or 'checkpoint'}"
    from convmixer_tf import cli

    # keras.utils.get_file prints its progress on stdout (ours is for results) and waits for
    # the socket's default timeout (none): both bounded here. It raises a bare Exception for a
    # failed fetch (keras/src/utils/file_utils.py, get_file), which becomes one ValueError.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with cli.stdout_to_stderr():
            path = keras.utils.get_file(
                fname,
                origin=url,
                cache_subdir=CACHE_SUBDIR,
                file_hash=sha256,
                hash_algorithm="sha256",
                cache_dir=cache_dir,
            )
    except ValueError:
        raise  # a hash that does not match
    except Exception as e:  # noqa: BLE001 - see above
        reason = " ".join(str(e).split()) or type(e).__name__
        reason = reason.rpartition(" -- ")[2]  # Keras: "URL fetch failure on <url>: <n> -- why"
        raise ValueError(
            f"Could not download {url}: {reason}. Download the file where there is a network "
            "and pass its path instead (--weights PATH, or weights=PATH)."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    if sha256 is None:
        digest = sha256_of(path)
        record = f"{path}.sha256"
        if os.path.exists(record):
            with open(record) as f:
                recorded = f.read().split()[0]
            if recorded != digest:
                raise ValueError(
                    f"{path} changed since it was downloaded: sha256 {digest}, recorded "
                    f"{recorded} in {record}. Delete both files to download it again."
                )
        else:
            files.write_atomic(record, f"{digest}  {url}\n")
            logger.warning(
                "No known sha256 for %s; computed %s (recorded in %s)", url, digest, record
            )
    return path


def preset_for_model(model) -> str:
    """The name of the preset with a published checkpoint whose architecture ``model`` has.

    Example:
        >>> import convmixer_tf
        >>> from convmixer_tf import pretrained
        >>> model = convmixer_tf.create_model("convmixer_768_32")  # doctest: +SKIP
        >>> pretrained.preset_for_model(model)  # doctest: +SKIP
        'convmixer_768_32'
    """
    arch = saving.model_arguments(model)
    fields = ("dim", "depth", "kernel_size", "patch_size", "activation")
    for name, preset in presets.PRESETS.items():
        spec = preset.architecture()
        if preset.url and all(spec[f] == arch[f] for f in fields):
            return name
    published = [name for name, p in presets.PRESETS.items() if p.url]
    raise ValueError(
        "weights='imagenet': no published checkpoint has this model's architecture "
        f"({', '.join(f'{f}={arch[f]}' for f in fields)}). Variants with weights: {published}"
    )


def resolve_weights(model, weights: str) -> str:
    """Turns ``weights`` (a path, a URL, or ``"imagenet"``) into a local checkpoint path.

    ``"imagenet"`` means the published checkpoint of the preset whose architecture the model has.

    Example:
        >>> from convmixer_tf import pretrained
        >>> pretrained.resolve_weights(None, "tests/fixtures/pretrained/timm_gelu_k3.safetensors")
        'tests/fixtures/pretrained/timm_gelu_k3.safetensors'
    """
    if weights == "imagenet":
        name = preset_for_model(model)
        preset = presets.PRESETS[name]
        suffix = os.path.basename(urllib.parse.urlparse(preset.url).path).partition(".")[2]
        return fetch_checkpoint(preset.url, sha256=preset.sha256, fname=f"{name}.{suffix}")
    if urllib.parse.urlparse(weights).scheme in URL_SCHEMES:
        return fetch_checkpoint(weights)
    if not os.path.exists(weights):
        raise ValueError(f"Weights file not found. Received: weights={weights!r}")
    return weights
