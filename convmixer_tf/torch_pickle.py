"""Reads PyTorch checkpoint files without PyTorch, and without running code from the file.

A ``torch.save`` file (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``) since PyTorch 1.6 is a zip
archive: ``<prefix>/data.pkl`` holds a pickle of the saved object in which every tensor is a call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and every storage a
persistent id ``("storage", torch.FloatStorage, key, location, numel)`` whose bytes lie in
``<prefix>/data/<key>``.

Unpickling can call any importable function, so a plain ``pickle.load`` of a checkpoint can run
arbitrary code. :func:`load` uses a restricted unpickler that resolves only the globals a tensor
checkpoint needs (the same idea as ``torch.load(weights_only=True)``): tensor reconstruction, the
storage types and ``collections.OrderedDict``; plus ``argparse.Namespace``, which timm's training
script stores as ``"args"`` next to the ``"state_dict"``, mapped to the inert stand-in
:class:`PickledNamespace` (attributes only; nothing is imported or called). Any other global is
refused *before* it is resolved, with an :class:`UnsafeCheckpointError` naming it. Tensors come
back as NumPy arrays.

Sizes come from the file and are not trusted: before anything is allocated, each storage's
declared element count must match its zip entry's size, each tensor's size and strides must
stay inside its storage (a tensor may not hold more elements than its storage: no stride-0
expansion of a small storage into a huge array), and the storages and tensors together must fit
in ``max_bytes`` (default :data:`MAX_CHECKPOINT_BYTES`, or ``$CONVMIXER_MAX_CHECKPOINT_BYTES``).

The legacy (pre-1.6, non-zip) serialization and the older tar format are not supported: they are
refused with an error that says how to re-save the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import tarfile
import zipfile

import numpy as np

# The storage classes that ``torch.save`` names in persistent ids, and their element types.
# bfloat16 has no NumPy type: it is read as uint16 and widened to float32 (exact).
STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# What one checkpoint may allocate (storages plus the tensors copied out of them): four times the
# largest ConvMixer's float32 weights and optimizer state, with room to spare.
MAX_CHECKPOINT_BYTES = 4 * 1024**3
LIMIT_VARIABLE = "CONVMIXER_MAX_CHECKPOINT_BYTES"

# The first pickle of a legacy (pre-1.6) torch.save file is this number.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint asks for a global that is not needed to rebuild tensors and dicts."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands for a ``torch.<Name>Storage`` class inside the pickle."""

    name: str

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.name]


class PickledNamespace:
    """Inert stand-in for an ``argparse.Namespace`` in a checkpoint (e.g. timm's ``"args"``).

    Unpickling creates it with ``object.__new__`` and fills its ``__dict__``: no code runs.
    """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"PickledNamespace({fields})"


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool = False,
    backward_hooks=None,
    metadata=None,
) -> np.ndarray:
    """NumPy version of ``torch._utils._rebuild_tensor_v2``: a strided view, copied
    (:func:`_check_tensor` first)."""
    del requires_grad, backward_hooks, metadata  # training state, not data
    size, stride = tuple(size), tuple(stride)
    _check_tensor(storage, storage_offset, size, stride)
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _check_tensor(storage: np.ndarray, storage_offset, size: tuple, stride: tuple) -> None:
    """Before anything is allocated: a tensor holds at most as many elements as its storage,
    and its last element lies inside the storage."""
    ints = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints
    ):
        raise ValueError(f"Malformed tensor in checkpoint: size={size}, stride={stride}")
    if 0 in size:
        return
    elements = math.prod(size)
    if elements > storage.size:
        raise ValueError(
            f"Malformed tensor in checkpoint: size={size} declares {elements} elements, more "
            f"than its storage holds ({storage.size}; stride={stride})"
        )
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise ValueError(
            f"Malformed tensor in checkpoint: size={size}, stride={stride}, "
            f"offset={storage_offset} reach past its storage of {storage.size} elements"
        )


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False, backward_hooks=None):
    """NumPy version of ``torch._utils._rebuild_parameter``: a Parameter is its data."""
    del requires_grad, backward_hooks
    return data


def _safe_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): PickledNamespace,
    }
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = StorageType(name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor / dict globals; storages come from the zip archive."""

    def __init__(
        self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str,
        max_bytes: int,
    ):  # fmt: skip
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._path = path
        self._storages: dict[str, np.ndarray] = {}
        self._allowed = _safe_globals()
        self._allowed[("torch._utils", "_rebuild_tensor_v2")] = self._rebuild_tensor
        self._max_bytes = max_bytes
        self._allocated = len(file.getbuffer())  # the pickle itself

    def _allocate(self, nbytes: int, what: str) -> None:
        """Counts ``nbytes`` against the limit before they are allocated."""
        self._allocated += nbytes
        if self._allocated > self._max_bytes:
            raise ValueError(
                f"Refusing to load {self._path!r}: {what} brings it to {self._allocated} bytes, "
                f"above the limit of {self._max_bytes} (max_bytes, or ${LIMIT_VARIABLE} for "
                "a file you trust)."
            )

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        size, stride = tuple(size), tuple(stride)
        _check_tensor(storage, storage_offset, size, stride)
        self._allocate(math.prod(size) * storage.itemsize, f"a tensor of shape {size}")
        return _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest)

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"Refusing to load {self._path!r}: its pickle asks for the global "
                f"'{module}.{name}', which is not needed to rebuild tensors (only tensors, "
                "storages and dicts are allowed, so that a checkpoint cannot run code). Load it "
                "with PyTorch in a trusted environment and save only the state_dict."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"Refusing to load {self._path!r}: unexpected persistent id {pid!r} "
                "(expected ('storage', <StorageType>, key, location, numel))."
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise UnsafeCheckpointError(
                f"Refusing to load {self._path!r}: storage {key!r} has type {storage_type!r}"
            )
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise ValueError(f"Storage {key!r} of {self._path!r}: bad element count {numel!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(str(key), storage_type, numel)
        storage = self._storages[key]
        if storage.size != numel:
            raise ValueError(
                f"Storage {key!r} of {self._path!r} holds {storage.size} elements, "
                f"its record says {numel}"
            )
        return storage

    def _read_storage(self, key: str, storage_type: StorageType, numel: int) -> np.ndarray:
        entry = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(entry)
        except KeyError:
            raise ValueError(f"Checkpoint {self._path!r} has no storage entry {entry!r}") from None
        itemsize = 2 if storage_type.dtype == "bfloat16" else np.dtype(storage_type.dtype).itemsize
        if info.file_size != numel * itemsize:
            raise ValueError(
                f"Storage {key!r} of {self._path!r} declares {numel} elements of {itemsize} "
                f"bytes, but its entry holds {info.file_size} bytes."
            )
        # bfloat16 is widened to float32: twice its bytes in memory.
        self._allocate(numel * (4 if storage_type.dtype == "bfloat16" else itemsize),
                       f"storage {key!r}")  # fmt: skip
        raw = self._archive.read(entry)
        if storage_type.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=f"{self._byteorder}u2").astype(np.uint32) << 16
            return bits.view(np.float32)
        dtype = np.dtype(storage_type.dtype).newbyteorder(self._byteorder)
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Reads plain data only: used to peek at the first pickle of a non-zip file."""

    def find_class(self, module: str, name: str):
        raise UnsafeCheckpointError(f"global '{module}.{name}' refused")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"persistent id {pid!r} refused")


def _refuse_legacy(path: str) -> None:
    if tarfile.is_tarfile(path):
        fmt = "the tar format of PyTorch < 0.4"
    else:
        with open(path, "rb") as f:
            try:
                first = _NoGlobalsUnpickler(f).load()
            except Exception:  # noqa: BLE001 - whatever fails here, the file is no checkpoint
                first = None
        if first == _LEGACY_MAGIC_NUMBER:
            fmt = "the legacy (non-zip) serialization of PyTorch < 1.6"
        else:
            raise ValueError(
                f"{path!r} is not a PyTorch checkpoint: not a zip archive "
                "(the format torch.save writes since PyTorch 1.6)."
            )
    raise ValueError(
        f"{path!r} is in {fmt}, which is not supported. Re-save it with a recent PyTorch: "
        "torch.save(torch.load(path, weights_only=True), new_path)."
    )


def max_checkpoint_bytes() -> int:
    """``$CONVMIXER_MAX_CHECKPOINT_BYTES`` if set, else :data:`MAX_CHECKPOINT_BYTES`."""
    value = os.environ.get(LIMIT_VARIABLE)
    if value is None:
        return MAX_CHECKPOINT_BYTES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LIMIT_VARIABLE} must be a positive integer. Received: {value!r}")
    return int(value)


def load(path: str | os.PathLike, max_bytes: int | None = None):
    """Unpickles a ``torch.save`` zip file with tensors as NumPy arrays, running no code from it.

    Args:
        path: a file written by ``torch.save`` (PyTorch >= 1.6, zip serialization).
        max_bytes: what the storages and tensors may take in memory together (default
            :func:`max_checkpoint_bytes`); checked before each allocation.

    Returns:
        The saved object (usually a dict) with every tensor replaced by a ``np.ndarray``.

    Raises:
        UnsafeCheckpointError: the pickle needs a global other than tensor / dict reconstruction.
        ValueError: the file is not a zip checkpoint (legacy formats included) or is malformed.

    Example:
        >>> from convmixer_tf import torch_pickle
        >>> checkpoint = torch_pickle.load("convmixer_768_32_ks7_p7_relu.pth.tar")  # doctest: +SKIP
        >>> checkpoint["state_dict"]["0.weight"].shape  # doctest: +SKIP
        (768, 3, 7, 7)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint file not found: {path!r}")
    if not zipfile.is_zipfile(path):
        _refuse_legacy(path)
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(
                f"{path!r} is a zip archive but not a torch.save checkpoint: expected exactly "
                f"one '<name>/data.pkl', found {pickles}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path!r}: unknown byteorder {byteorder!r}")
        limit = max_checkpoint_bytes() if max_bytes is None else max_bytes
        if archive.getinfo(pickles[0]).file_size > limit:
            raise ValueError(
                f"Refusing to load {path!r}: its pickle alone is above the limit of {limit} "
                f"bytes (max_bytes, or ${LIMIT_VARIABLE} for a file you trust)."
            )
        data = io.BytesIO(archive.read(pickles[0]))
        try:
            return _RestrictedUnpickler(data, archive, prefix, byteorder, path, limit).load()
        except ValueError as e:
            if path in str(e):
                raise
            raise ValueError(f"{path!r}: {e}") from None
