"""Reading and writing official-format `.pth` files safely.

A `.pth` is a zip archive holding a pickle (`data.pkl`) and one raw buffer per tensor storage
(`data/N`). Reading needs no torch: the pickle is opened by an unpickler whose allow-list holds
only what a state dict is made of (dicts, `OrderedDict`, tensor rebuilders, storage types) and the
harmless values checkpoints keep beside it (bytes, sets, `torch.Size`, `torch.device`, as
PyTorch's weights-only loader takes them), each mapped to a stand-in here, so a file whose pickle
would run code is refused before anything runs. Tensors are read lazily, one storage at a time,
straight from the archive: a 455 MiB checkpoint converts with one copy of the weights in memory.
Files in PyTorch's legacy (pre-1.6, non-zip) format are read with `torch.load(weights_only=True)`,
PyTorch's own allow-list. Writing (`save_state_dict`) uses `torch.save`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.mapping import ConversionError

# torch storage type -> numpy dtype (only these can appear in an allowed state dict).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafeCheckpointError(ConversionError):
    """The file's pickle references code (a global outside the state-dict allow-list)."""


class _MalformedError(ConversionError):
    """The file's pickle describes a tensor or storage torch.save never writes (raised while
    unpickling, where the file's path is not known: `load_state_dict` names it)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    archive: zipfile.ZipFile
    name: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of a `.pth` archive, read from the file only when converted to an array."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the stored tensor."""
        return self.storage.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Reads the tensor: a fresh, contiguous array (never a view of the archive)."""
        item = self.dtype.itemsize
        span = sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        end = self.offset + span + 1
        if any(n == 0 for n in self.shape):
            end = self.offset
        if self.offset < 0 or end > self.storage.numel:
            raise ConversionError(
                self._damaged(f"tensor bytes lie outside storage {self.storage.name}")
            )
        try:
            raw = self.storage.archive.read(self.storage.name)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(
                self._damaged(f"storage {self.storage.name} is unreadable: {e}")
            ) from None
        if len(raw) < self.storage.numel * item:
            raise ConversionError(self._damaged(f"storage {self.storage.name} is truncated"))
        flat = np.frombuffer(raw, dtype=self.dtype, count=self.storage.numel)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=dtype or self.dtype, order="C")

    def _damaged(self, what: str) -> str:
        """`what` is wrong with this tensor's file, named with the file and the fix."""
        return f"{self.storage.archive.filename}: {what}; {_DAMAGED_FIX}"


def _rebuild_tensor(
    storage: object,
    offset: int,
    shape: Sequence[int],
    stride: Sequence[int],
    requires_grad: bool = False,
    hooks: object = None,
    meta: object = None,
) -> LazyTensor:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a `LazyTensor` view of `storage`."""
    del requires_grad, hooks, meta
    if not isinstance(storage, _Storage):
        raise _MalformedError("malformed checkpoint: a tensor without a storage.")
    # torch.save writes whole numbers >= 0, one stride per size: anything else would make the
    # view reach outside the storage's bytes (a negative stride reads memory before them).
    numbers = (offset, *shape, *stride) if _is_sequence(shape) and _is_sequence(stride) else ()
    if not (
        numbers
        and len(shape) == len(stride)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
    ):
        raise _MalformedError(
            f"malformed checkpoint: a tensor of offset {offset!r:.40}, sizes {shape!r:.80} and "
            f"strides {stride!r:.80}; torch.save writes whole numbers >= 0, one stride per size."
        )
    return LazyTensor(storage, offset, tuple(shape), tuple(stride))


def _is_sequence(value: object) -> bool:
    """Whether `value` is a tuple or list (what a pickle's sizes and strides are)."""
    return isinstance(value, (tuple, list))


def _rebuild_parameter(
    data: LazyTensor, requires_grad: bool = False, hooks: object = None, state: object = None
) -> LazyTensor:
    """Stand-in for `torch._utils._rebuild_parameter[_with_state]`: the tensor, unwrapped."""
    del requires_grad, hooks, state
    return data


def _refuse_arguments(what: str, args: tuple) -> _MalformedError:
    return _MalformedError(f"malformed checkpoint: {what} of {args!r:.80}")


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, with which protocol 2 pickles `bytes` (as latin-1 text)."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _refuse_arguments("_codecs.encode", (text, encoding))
    return text.encode("latin1")


def _bytearray(*args: object) -> bytearray:
    """Stand-in for `bytearray`, from bytes or latin-1 text only (never a size to allocate)."""
    if not args:  # an empty one
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin1")
    raise _refuse_arguments("bytearray", args)


def _set(items: object = ()) -> set:
    """Stand-in for `set`, which protocol 2 pickles as set([items])."""
    if not isinstance(items, (list, tuple)):
        raise _refuse_arguments("set", (items,))
    return set(items)


def _complex(real: object = 0.0, imag: object = 0.0) -> complex:
    """Stand-in for `complex`, from numbers only."""
    if not all(isinstance(x, (int, float)) for x in (real, imag)):
        raise _refuse_arguments("complex", (real, imag))
    return complex(real, imag)


def _counter(items: object = None) -> collections.Counter:
    """Stand-in for `collections.Counter` (a class a pickle could otherwise set attributes on)."""
    if items is not None and not isinstance(items, dict):
        raise _refuse_arguments("collections.Counter", (items,))
    return collections.Counter(items or {})


def _torch_size(sizes: object = ()) -> tuple:
    """Stand-in for `torch.Size`: the sizes, as a tuple."""
    if not (_is_sequence(sizes) and all(type(n) is int for n in sizes)):
        raise _refuse_arguments("torch.Size", (sizes,))
    return tuple(sizes)


def _torch_device(kind: object, index: object = None) -> str:
    """Stand-in for `torch.device`: its name ('cpu', 'cuda:0'), as a string."""
    if not (isinstance(kind, str) and (index is None or type(index) is int)):
        raise _refuse_arguments("torch.device", (kind, index))
    return kind if index is None else f"{kind}:{index}"


# What a pickled state dict, and what checkpoints keep beside it (bytes, sets, sizes, devices:
# the harmless types PyTorch's own weights-only loader takes), may name: each to a stand-in here.
# Protocol 2 names builtins as `__builtin__`.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "Counter"): _counter,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    **{
        (module, name): function
        for module in ("builtins", "__builtin__")
        for name, function in (("set", _set), ("bytearray", _bytearray), ("complex", _complex))
    },
}


def _fresh(function: Callable[..., Any]) -> Callable[..., Any]:
    """A new function object calling `function` (what a file's pickle may alter is this one)."""

    def call(*args: Any) -> Any:
        return function(*args)

    return call


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, to inert stand-ins; anything else is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            allowed = _ALLOWED[(module, name)]
            # The pickle's BUILD opcode sets attributes on what find_class gives: a function of
            # this module is handed out as a fresh wrapper, so that a file cannot alter it for
            # the files read after it (OrderedDict, a built-in type, refuses attributes).
            return allowed if isinstance(allowed, type) else _fresh(allowed)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeCheckpointError(f"GLOBAL {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _MalformedError(f"malformed checkpoint: unknown persistent id {pid!r:.80}.")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _MalformedError(f"malformed checkpoint: storage type {storage_type!r:.80}.")
        return _Storage(self.archive, f"{self.prefix}data/{key}", storage_type.dtype, int(numel))


def _read_zip(path: Path) -> Any:
    archive = zipfile.ZipFile(path)
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ConversionError(_not_a_torch_zip(path, archive))
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
        raise ConversionError(f"{path} was saved on a big-endian machine; re-save it on x86/ARM.")
    return _StateDictUnpickler(archive.read(pickles[0]), archive, prefix).load()


def _read_legacy(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is not a zip-format .pth; if it is a legacy (PyTorch < 1.6) checkpoint, "
            "install torch to read it (pip install torch==2.13.0) or re-save it."
        ) from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # torch's own refusal, legacy files
            detail = line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
            return detail or "unrecognised pickle content"
        # torch's refusal of a global from a module it blocks outright (os, sys, ...).
        blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", line)
        if blocked:
            return f"Unsupported global: {blocked[1]}, from the blocked module {blocked[2]}"
    first = text.splitlines()[0] if text else type(e).__name__
    if "strerror:" in first:  # torch.save: "[enforce fail at ...] . open file failed with ..."
        return first.rsplit("strerror:", 1)[1].strip()
    # torch's advice to load with weights_only=False would run the file's code: never passed on.
    return first.split(" In PyTorch 2.6")[0] if "weights_only" in first else first


_DAMAGED_FIX = "the file is damaged: download it again (and compare its size) or re-save it."
_CONVERT_READS = "python -m convert reads official PyTorch .pth files (stam_16.pth, stam_64.pth)"


def _not_a_pth(path: Path, head: bytes, size: int) -> str | None:
    """What a common non-.pth file is, from its first bytes (None: no recognised format)."""
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return (
            f"{path} is a safetensors file, not a PyTorch .pth; {_CONVERT_READS}. Re-save it "
            "as one: from safetensors.torch import load_file; "
            f"torch.save({{'model': load_file('{path.name}')}}, 'stam.pth')."
        )
    if head[257:262] == b"ustar":
        return (
            f"{path} is a tar archive, not a PyTorch .pth; {_CONVERT_READS}. Extract it first "
            f"(tar -xf {path.name}) and convert the .pth inside."
        )
    if head[:2] == b"\x1f\x8b":
        return (
            f"{path} is gzip-compressed, not a PyTorch .pth; {_CONVERT_READS}. Extract it "
            f"first (tar -xzf {path.name} for a .tar.gz, else gunzip {path.name}) and convert "
            "the .pth inside."
        )
    if b"<html" in head.lower() or head.lstrip().lower().startswith(b"<!doctype"):
        return (
            f"{path} is a web page ({size} bytes), not a PyTorch .pth: the download saved an "
            "error or sign-in page instead of the file. Download it again (and check its size)."
        )
    if not head.startswith(b"\x80"):  # a legacy .pth is a pickle: protocol 2+ opens with 0x80
        return (
            f"{path} is not a PyTorch .pth ({size} bytes, starting {head[:16]!r}): neither the "
            f"zip format of torch.save nor its legacy pickle; {_CONVERT_READS}."
        )
    return None


def _not_a_torch_zip(path: Path, archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    if names and all(n.endswith(".npy") for n in names):
        return (
            f"{path} is a numpy .npz archive, not a PyTorch .pth; {_CONVERT_READS}. Re-save the "
            "arrays as one: torch.save({'model': {k: torch.from_numpy(v) for k, v in "
            f"numpy.load('{path.name}').items()}}}}, 'stam.pth')."
        )
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{path} is a zip archive but not a PyTorch checkpoint (no single data.pkl inside; it "
        f"holds {shown or 'nothing'}); {_CONVERT_READS}. If the archive holds a .pth, extract it "
        f"first (unzip {path.name}) and convert that."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Loads the STAM state dict of an official-format checkpoint.

    Accepts `{'model': sd}`, `{'state_dict': sd}` and a bare state dict.

    Args:
      path: the `.pth` file.

    Returns:
      key -> array-like with `.shape` and `.dtype` (`LazyTensor`s, read by `np.asarray`; numpy
      arrays for legacy files). Keys as stored: the mapping strips a `module.` prefix.

    Raises:
      ConversionError: missing, empty, truncated or non-checkpoint file, or no state dict.
      UnsafeCheckpointError: the pickle would run code; nothing from it was executed.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; expected an official .pth file.")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    size = path.stat().st_size
    if size == 0:
        raise ConversionError(f"{path} is empty (0 bytes): the download or copy did not finish.")
    with open(path, "rb") as f:
        head = f.read(512)
    zip_magic = head[:4] == b"PK\x03\x04"
    other = None if zip_magic else _not_a_pth(path, head, size)
    if other:
        raise ConversionError(other)
    if zip_magic and not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path} is a truncated or corrupt zip-format .pth ({size} bytes; its zip directory "
            "is missing): download it again and compare its size."
        )
    try:
        obj = _read_zip(path) if zip_magic else _read_legacy(path)
    except ConversionError as e:
        if isinstance(e, UnsafeCheckpointError):
            raise UnsafeCheckpointError(_refusal(path, str(e))) from None
        if isinstance(e, _MalformedError):
            raise ConversionError(f"{path}: {str(e).removesuffix('.')}; {_DAMAGED_FIX}") from None
        raise
    except pickle.UnpicklingError as e:
        detail = _first_line(e)
        if "Unsupported global" in detail:
            raise UnsafeCheckpointError(_refusal(path, detail)) from None
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint ({size} bytes): {detail}."
        ) from None
    except Exception as e:  # damaged files raise many types (BadZipFile, EOFError, KeyError...)
        # An error without a message (EOFError of a file cut short) is named by its type alone.
        error = f"{type(e).__name__}: {_first_line(e)}" if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} could not be read as a PyTorch checkpoint ({size} bytes; {error}). It may "
            "be truncated or corrupt, or not a .pth at all: download it again and compare its "
            "size."
        ) from None
    return _check_tensors(_find_state_dict(obj, path), path)


def _refusal(path: Path, detail: str) -> str:
    return (
        f"{path} was refused: its pickle calls code outside the state-dict allow-list "
        f"({detail}), so loading it could run that code. Nothing from it was executed. "
        "Only convert checkpoints from sources you trust, re-saved as plain state dicts "
        "(torch.save({'model': model.state_dict()}, path))."
    )


def _is_tensor(value: Any) -> bool:
    return isinstance(value, LazyTensor) or type(value).__name__ in ("Tensor", "Parameter")


def _find_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    # A bare state dict: STAM's keys hold tensors (others may hold anything, as in a wrapped
    # one: they are unexpected keys).
    stam = [v for k, v in obj.items() if _STAM_KEY.match(str(k))]
    if (stam and all(_is_tensor(v) for v in stam)) or (obj and all(map(_is_tensor, obj.values()))):
        return obj
    raise ConversionError(
        f"{path} holds no state dict: expected {{'model': sd}}, {{'state_dict': sd}} or a bare "
        f"dict of tensors; found top-level keys {sorted(map(str, obj))[:20]}."
    )


def _short(value: Any) -> str:
    """`value`'s repr, cut to a line's part."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# The keys of an official STAM state dict (after a `module.` prefix): a value there must be a
# float tensor. Other entries are not part of STAM, whatever they hold: they are passed on as
# `NotAWeight` and named among the unexpected keys, as the official loader (strict=False) skips
# them (a BatchNorm's int64 `num_batches_tracked`, a saved step count).
_STAM_KEY = re.compile(r"(module\.)?(patch_embed|cls_token|pos_embed|blocks|norm|aggregate|head)\b")


@dataclasses.dataclass(frozen=True)
class NotAWeight:
    """A state dict entry outside STAM's keys that is no float tensor (kept to be reported)."""

    what: str  # e.g. 'an int64 tensor', 'a value of type int (5)'
    shape: tuple[int, ...] = ()

    @property
    def dtype(self) -> str:
        """Not a float dtype: what the entry is."""
        return self.what


def _check_tensors(state_dict: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The entries as arrays; those outside STAM's keys that are no float tensor as
    `NotAWeight`, and a STAM key's that is none refused, naming it and the fix."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        stam = _STAM_KEY.match(str(key))
        if not _is_tensor(value):
            if not stam:
                out[key] = NotAWeight(f"a value of type {type(value).__name__} ({_short(value)})")
                continue
            raise ConversionError(
                f"{path}: state dict entry {key!r} is not a tensor but a value of type "
                f"{type(value).__name__} ({_short(value)}); re-save it with the model's tensors "
                "alone: sd = torch.load(PATH, weights_only=True)['model']; torch.save({'model': "
                "{k: v for k, v in sd.items() if torch.is_tensor(v)}}, 'stam.pth')."
            )
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in ("float32", "float16", "bfloat16"):
            if not stam:
                article = "an" if dtype.startswith("int") else "a"
                out[key] = NotAWeight(f"{article} {dtype} tensor", tuple(value.shape))
                continue
            fix = ""
            if dtype == "float64":
                fix = (
                    " Re-save it in float32: sd = torch.load(PATH, weights_only=True)['model']; "
                    "torch.save({'model': {k: v.float() for k, v in sd.items()}}, 'stam_f32.pth')."
                )
            raise ConversionError(
                f"state dict entry {key!r} has dtype {dtype}; expected float32, float16 or "
                f"bfloat16 weights.{fix}"
            )
        out[key] = value if isinstance(value, LazyTensor) else _torch_to_numpy(value)
    return out


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A float torch tensor (from a legacy file, or any device) as numpy; bfloat16 via ml_dtypes."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes `{'model': state_dict}` with `torch.save`, as the official code saves it.

    Args:
      state_dict: key -> numpy array (float32, float16 or bfloat16).
      path: destination `.pth`; written to a temporary name and renamed, so a crash never
        leaves a half-written file under the final name.

    Raises:
      ConversionError: no torch, or the file could not be written (no `.partial` is left).
    """
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "writing .pth files needs PyTorch: pip install 'stam-jax[torch]' "
            "(or pip install torch==2.13.0 for a CPU build)."
        ) from None
    tensors = {}
    for key, value in state_dict.items():
        if value.dtype == ml_dtypes.bfloat16:
            tensors[key] = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(value)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save({"model": tensors}, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports I/O failures as either
            raise ConversionError(f"cannot write {path}: {_first_line(e)}") from None
        raise
