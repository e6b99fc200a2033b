"""Read a folder written by ComfyUI's SaveTrainingDataset node, without torch and without running pickled code.

The folder holds `shard_0000.pkl`, `shard_0001.pkl`, ... and `metadata.json` (`num_samples`, `num_shards`,
`shard_size`). Each shard is `{"latents": [{"samples": [B, C, h, w]}, ...], "conditioning": [[[cond [1, T, D],
{"pooled_output": [1, P], ...}], ...], ...]}` for a contiguous slice of the dataset (video samples are
[B, C, t, h, w]). Newer ComfyUI writes shards
with `torch.save` (a zip archive: `<root>/data.pkl` plus one `<root>/data/<key>` member of raw bytes per storage);
older ComfyUI wrote `pickle.dump` of the same object, where every tensor storage is pickled as
`torch.storage._load_from_bytes(<a legacy, non-zip torch.save stream>)`.

Pickles are read by `_SafeUnpickler`, which resolves only the few globals a tensor needs, each to a numpy stand-in,
and refuses every other global, so nothing in a shard can run code. Tensors become numpy arrays (NCHW as in torch;
bf16 as `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

from jaxlora.models.registry import NUMBER_FIELDS

_DTYPES = {  # torch dtype name -> numpy dtype (complex types are left out: no dataset holds them)
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_STORAGE_DTYPES = {  # torch.<X>Storage -> element dtype; UntypedStorage holds bytes (its tensors name a dtype)
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
# Bounds on the work one shard may ask for. Pickles can share a value many times at the cost of a few bytes
# each, and a tensor's size and strides are claims; without bounds a 248-byte shard asks for 10^9 visits, and a
# 1-element storage with zero strides for terabytes. Real shards stay far below (tens of values per sample).
MAX_VALUES = 1_000_000  # values in a shard, a shared value counted at every reference (the reader visits each)
MAX_ELEMENTS = 2**32  # tensor elements in a shard, a shared tensor counted at every reference (each is copied)
MAX_MEMO = 2**22  # pickle memo slots: the unpickler allocates up to the largest index a pickle names

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a non-zip torch.save stream
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"


class ComfyDatasetError(ValueError):
    """A ComfyUI dataset folder that cannot be read; the message names the file and what is wrong with it."""


class UnsafePickleError(ComfyDatasetError):
    """A shard's pickle names a global that is not part of a plain tensor container (it could run code)."""


@dataclass(frozen=True)
class ComfyDataset:
    """One entry per latent sample, in shard order.

    `latents[i]` is [C, h, w] (raw VAE latents, NCHW without the batch axis; a one-frame [B, C, 1, h, w] LATENT
    loses its frame axis) in the dtype ComfyUI saved.
    `conditioning[i]` has `c_crossattn` [T, D], `pooled_output` [P] when the text encoder gave one, and the
    `registry.NUMBER_FIELDS` present as floats. `metadata` is metadata.json ({} when the file is absent).
    `ignored_keys` names the other conditioning entries found (e.g. `attention_mask`), which are not read.
    """

    latents: list[np.ndarray]
    conditioning: list[dict[str, Any]]
    metadata: dict[str, Any]
    ignored_keys: tuple[str, ...] = ()


def read_comfy_dataset(folder: str | os.PathLike) -> ComfyDataset:
    """Read a SaveTrainingDataset folder (either shard format) the way ComfyUI's LoadTrainingDataset + trainer do.

    Shards are read in name order and concatenated; latent batches [B, C, h, w] are split into samples; the
    conditioning lists are flattened into one entry per caption, which must number one per sample or a single
    one (then shared by all samples), as in the trainer. metadata.json is optional, as it is for ComfyUI's loader,
    but when present its `num_samples` (latent dicts) and `num_shards` must match the shards.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"ComfyUI dataset folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"a ComfyUI dataset is a folder of shard_*.pkl files, but {folder} is a file")
    shard_paths = sorted((p for p in folder.glob("shard_*.pkl") if p.is_file()), key=lambda p: p.name)
    if not shard_paths:
        raise FileNotFoundError(f"no shard_*.pkl files in {folder}; is it a ComfyUI SaveTrainingDataset folder?")
    metadata = _read_metadata(folder / "metadata.json")

    latent_dicts, conditioning_lists = [], []
    for path in shard_paths:
        shard = _read_shard(path)
        latent_dicts += [(path, i, latent) for i, latent in enumerate(shard["latents"])]
        conditioning_lists += [(path, i, conditioning) for i, conditioning in enumerate(shard["conditioning"])]
    _check_metadata(metadata, folder, len(shard_paths), len(latent_dicts))

    latents = [sample for path, i, latent in latent_dicts for sample in _latent_samples(latent, f"{path} latents[{i}]")]
    entries, ignored = [], set()
    for path, i, conditioning in conditioning_lists:
        where = f"{path} conditioning[{i}]"
        if not isinstance(conditioning, list | tuple):
            raise ComfyDatasetError(
                f"{where} must be a list of [cond, dict] entries, got {type(conditioning).__name__}"
            )
        for j, entry in enumerate(conditioning):
            entries.append(_conditioning_entry(entry, f"{where}[{j}]", ignored))
    if len(entries) == 1:
        entries = entries * len(latents)
    if len(entries) != len(latents):
        raise ComfyDatasetError(
            f"{folder}: {len(entries)} conditioning entries (captions) for {len(latents)} latent samples; ComfyUI "
            "needs one caption per sample, or a single caption for all"
        )
    return ComfyDataset(latents, [dict(entry) for entry in entries], metadata, tuple(sorted(ignored)))


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ComfyDatasetError(f"{path} is not readable JSON ({error}); fix or delete it") from error
    if not isinstance(metadata, dict):
        raise ComfyDatasetError(f"{path} must hold a JSON object, got {type(metadata).__name__}")
    return metadata


def _check_metadata(metadata: dict[str, Any], folder: Path, shards: int, latent_dicts: int) -> None:
    """SaveTrainingDataset counts latent dicts (one per image) in `num_samples`, before batches are split."""
    for key, found in (("num_shards", shards), ("num_samples", latent_dicts)):
        if key in metadata and metadata[key] != found:
            raise ComfyDatasetError(
                f"{folder}/metadata.json says {key} = {metadata[key]!r} but the shard files hold {found}; "
                "a shard is missing or extra"
            )


def _read_shard(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
            file.seek(0)
            shard = _load_torch_zip(file) if magic == _ZIP_MAGIC else _load_pickle_stream(file)
            _check_plain(shard)
    except ComfyDatasetError as error:  # raised below without the file's name; UnsafePickleError stays itself
        raise type(error)(f"{path}: {error}") from error
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as error:
        raise ComfyDatasetError(f"{path} is not a readable ComfyUI dataset shard: {error!r}") from error
    if not isinstance(shard, dict) or not {"latents", "conditioning"} <= shard.keys():
        found = sorted(shard) if isinstance(shard, dict) else type(shard).__name__
        raise ComfyDatasetError(f"{path} must hold a dict with `latents` and `conditioning`, found {found}")
    latents, conditioning = shard["latents"], shard["conditioning"]
    if not isinstance(latents, list | tuple) or not isinstance(conditioning, list | tuple):
        raise ComfyDatasetError(f"{path}: `latents` and `conditioning` must be lists")
    if len(latents) != len(conditioning):
        raise ComfyDatasetError(f"{path} holds {len(latents)} latents but {len(conditioning)} conditioning lists")
    return shard


def _check_plain(shard) -> None:
    """Only containers, strings, numbers, None and rebuilt tensors may come out of a shard, within MAX_VALUES
    values and MAX_ELEMENTS tensor elements counted at every reference, as the reader will visit and copy them."""
    counts = {"values": 0, "elements": 0}

    def visit(value, where: str) -> None:
        counts["values"] += 1
        if counts["values"] > MAX_VALUES:
            raise ComfyDatasetError(
                f"more than {MAX_VALUES:,} values (shared ones counted at each reference); a dataset shard holds "
                "tens per sample: refusing to read further"
            )
        if isinstance(value, np.ndarray):
            counts["elements"] += value.size
            if counts["elements"] > MAX_ELEMENTS:
                raise ComfyDatasetError(
                    f"more than {MAX_ELEMENTS:,} tensor elements (shared tensors counted at each reference): "
                    "refusing to read further"
                )
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                visit(item, f"{where}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str | int):
                    raise ComfyDatasetError(
                        f"unexpected dict key of type {type(key).__name__} at {where or 'top level'}"
                    )
                visit(item, f"{where}[{key!r}]")
        elif not isinstance(value, str | int | float | type(None)):
            raise ComfyDatasetError(f"unexpected {type(value).__name__} at {where or 'top level'}")

    visit(shard, "")


def _latent_samples(latent, where: str) -> list[np.ndarray]:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), np.ndarray):
        raise ComfyDatasetError(f"{where} must be a LATENT dict with a `samples` tensor")
    samples = latent["samples"]
    if samples.ndim == 5 and samples.shape[2] == 1:
        samples = samples[:, :, 0]  # one frame of a video-VAE family's latent (ComfyUI keeps it 5-D)
    if samples.ndim not in (4, 5):
        raise ComfyDatasetError(
            f"{where}: `samples` must be [B, C, h, w] (images) or [B, C, t, h, w] (videos), got shape {samples.shape}"
        )
    # copies: contiguous, writable, and free of the shard's buffers
    return [np.array(sample, order="C") for sample in samples]


def _conditioning_entry(entry, where: str, ignored: set[str]) -> dict[str, Any]:
    if not isinstance(entry, list | tuple) or len(entry) != 2 or not isinstance(entry[1], dict):
        raise ComfyDatasetError(f"{where} must be a [cond tensor, dict] pair")
    cond, extras = entry
    if not isinstance(cond, np.ndarray) or cond.ndim != 3 or cond.shape[0] != 1:
        shape = cond.shape if isinstance(cond, np.ndarray) else type(cond).__name__
        raise ComfyDatasetError(f"{where}: the cond tensor must be [1, T, D] (one caption), got {shape}")
    out: dict[str, Any] = {"c_crossattn": np.array(cond[0], order="C")}
    for key, value in extras.items():
        if key == "pooled_output":
            if value is None:
                continue
            if not isinstance(value, np.ndarray) or value.ndim != 2 or value.shape[0] != 1:
                shape = value.shape if isinstance(value, np.ndarray) else type(value).__name__
                raise ComfyDatasetError(f"{where}: `pooled_output` must be [1, P], got {shape}")
            out[key] = np.array(value[0], order="C")
        elif key in NUMBER_FIELDS:
            if value is None:
                continue
            if isinstance(value, np.ndarray) and value.size == 1:
                value = value.reshape(()).item()
            if not isinstance(value, int | float):
                raise ComfyDatasetError(f"{where}: `{key}` must be a number, got {type(value).__name__}")
            out[key] = float(value)
        else:
            ignored.add(str(key))
    return out


# ---- pickles and torch archives, read with numpy stand-ins ----


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` etc. resolve to: only the element dtype matters."""

    dtype: np.dtype


@dataclass(frozen=True)
class _DType:
    """What `torch.float16` etc. resolve to (named by `_rebuild_tensor_v3` for bytes-only storages)."""

    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage's elements as a 1-D native-order array (filled later for legacy streams)."""

    data: np.ndarray


def _strided_view(storage, storage_offset, size, stride, dtype: np.dtype | None = None) -> np.ndarray:
    """The strided view torch would build, with every index checked to lie inside the storage."""
    if not isinstance(storage, _Storage):
        raise ComfyDatasetError(f"a tensor must be built from a storage, got {type(storage).__name__}")
    data = storage.data
    if dtype is not None:  # bytes-only storage (UntypedStorage): reinterpret as the tensor's dtype
        if data.size % dtype.itemsize:
            raise ComfyDatasetError(f"a storage of {data.size} bytes cannot hold {dtype} elements")
        data = data.view(dtype)
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset, *size, *stride)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) or len(size) != len(stride):
        raise ComfyDatasetError(f"bad tensor layout: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise ComfyDatasetError(f"tensor of size {size} and stride {stride} reaches past its storage ({data.size})")
    if math.prod(size) > data.size:
        raise ComfyDatasetError(
            f"tensor of size {size} and stride {stride} repeats elements of its storage ({data.size} elements): "
            "a dataset tensor never does"
        )
    strides = tuple(s * data.itemsize if n > 1 else 0 for n, s in zip(size, stride, strict=True))
    return np.lib.stride_tricks.as_strided(data[storage_offset:], size, strides, writeable=False)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _strided_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if metadata:
        raise ComfyDatasetError(f"tensors with metadata {metadata!r} (conjugate or negative views) are not supported")
    return _strided_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if metadata:
        raise ComfyDatasetError(f"tensors with metadata {metadata!r} (conjugate or negative views) are not supported")
    if not isinstance(dtype, _DType):
        raise ComfyDatasetError(f"a tensor's dtype must be a torch dtype, got {type(dtype).__name__}")
    return _strided_view(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_CALLABLES = {  # module.name -> numpy stand-in (torch.storage._load_from_bytes is resolved in find_class)
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,  # the (empty) backward hooks
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals, each to a numpy stand-in; any other global is refused.

    `storages` turns a persistent id (how torch.save refers to a storage) into a `_Storage`; plain pickles have
    none.
    """

    def __init__(self, file: IO[bytes], storages=None):
        super().__init__(file)
        self.file = file
        self.storages = storages

    def load(self):
        """Check the pickle's memo indices first (a scan of its opcodes), then unpickle it."""
        start = self.file.tell()
        _check_memo(self.file)
        self.file.seek(start)
        return super().load()

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _DTYPES:
            return _DType(_DTYPES[name])
        if (module == "torch" and name in _STORAGE_DTYPES) or (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(_DTYPES[_STORAGE_DTYPES[name]])
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_from_bytes
        stand_in = _CALLABLES.get(f"{module}.{name}")
        if stand_in is None:
            raise UnsafePickleError(
                f"refusing to load the global `{module}.{name}`; a ComfyUI dataset shard holds only "
                "tensors and plain containers, and loading this could run arbitrary code"
            )
        return stand_in

    def persistent_load(self, pid):
        if self.storages is None:
            raise ComfyDatasetError(f"a plain pickle cannot refer to storage {pid!r}")
        return self.storages(pid)


def _check_memo(file: IO[bytes]) -> None:
    """Refuse a pickle that names a memo slot beyond MAX_MEMO: the unpickler would allocate that many (a few
    bytes of pickle can ask for gigabytes)."""
    for opcode, argument, _position in pickletools.genops(file):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(argument) >= MAX_MEMO:
            raise ComfyDatasetError(f"pickle memo index {argument} is beyond {MAX_MEMO:,}")


def _storage_id(pid, fields: int) -> tuple:
    """Check a persistent id ("storage", storage type, key, location, numel[, view]) and drop its tag."""
    if not isinstance(pid, tuple) or len(pid) != fields or pid[0] not in ("storage", b"storage"):
        raise ComfyDatasetError(f"unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
        raise ComfyDatasetError(f"unexpected storage reference {pid!r}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ComfyDatasetError(f"unexpected storage size in {pid!r}")
    return pid[1:]


def _elements(raw: bytes, dtype: np.dtype, numel: int, little_endian: bool, where: str) -> np.ndarray:
    """`numel` elements of `dtype` from raw bytes, converted to native byte order."""
    if len(raw) < numel * dtype.itemsize:
        raise ComfyDatasetError(f"{where} holds {len(raw)} bytes, fewer than {numel} {dtype} elements need")
    words = np.frombuffer(raw, dtype=f"{'<' if little_endian else '>'}u{dtype.itemsize}", count=numel)
    return words.astype(f"=u{dtype.itemsize}", copy=False).view(dtype)


def _load_torch_zip(file: IO[bytes]):
    """torch.save's zip format: `<root>/data.pkl`, storages in `<root>/data/<key>`, `<root>/byteorder`."""
    with zipfile.ZipFile(file) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ComfyDatasetError("a zip archive but not a torch.save archive (no <root>/data.pkl)")
        root = pickles[0].removesuffix("data.pkl")
        byteorder = archive.read(f"{root}byteorder").decode() if f"{root}byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ComfyDatasetError(f"unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def storage(pid) -> _Storage:
            storage_type, key, _location, numel = _storage_id(pid, 5)
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in names:
                    raise ComfyDatasetError(f"no archive member {member}")
                size = numel * storage_type.dtype.itemsize
                if numel > MAX_ELEMENTS or archive.getinfo(member).file_size < size:
                    raise ComfyDatasetError(f"storage {key} claims {numel} elements; {member} does not hold them")
                with archive.open(member) as stored:
                    raw = stored.read(size)
                storages[key] = _Storage(_elements(raw, storage_type.dtype, numel, byteorder == "little", member))
            if storages[key].data.dtype != storage_type.dtype:
                raise ComfyDatasetError(f"storage {key} is read as two dtypes")
            return storages[key]

        with archive.open(f"{root}data.pkl") as data:
            return _SafeUnpickler(data, storage).load()


def _load_pickle_stream(file: IO[bytes]):
    """A plain pickle (older SaveTrainingDataset), or a legacy non-zip torch.save stream, which starts with a
    pickled magic number."""
    first = _SafeUnpickler(file).load()
    if _is_legacy_magic(first):
        return _load_legacy_torch(file)
    if file.read(1):
        raise ComfyDatasetError("data after the pickle")
    return first


def _is_legacy_magic(value) -> bool:
    return type(value) is int and value == _LEGACY_MAGIC


def _load_from_bytes(data) -> _Storage:
    """Stand-in for torch.storage._load_from_bytes: a storage pickled by pickle.dump is a torch.save stream."""
    if not isinstance(data, bytes):
        raise ComfyDatasetError(f"torch.storage._load_from_bytes needs bytes, got {type(data).__name__}")
    stream = io.BytesIO(data)
    if data[:4] == _ZIP_MAGIC:
        result = _load_torch_zip(stream)
    else:
        if not _is_legacy_magic(_SafeUnpickler(stream).load()):
            raise ComfyDatasetError("a pickled storage is not a torch.save stream")
        result = _load_legacy_torch(stream)
    if not isinstance(result, _Storage):
        raise ComfyDatasetError(f"a pickled storage holds {type(result).__name__}")
    return result


def _remaining(file: IO[bytes]) -> int:
    here = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(here)
    return end - here


def _load_legacy_torch(file: IO[bytes]):
    """The legacy torch.save stream after its magic number: protocol version, system info, the object pickle,
    the list of storage keys, then per key an int64 element count and the elements (always little-endian)."""
    version = _SafeUnpickler(file).load()
    if type(version) is not int or version != _LEGACY_PROTOCOL:
        raise ComfyDatasetError("unknown legacy torch.save protocol")
    _SafeUnpickler(file).load()  # system info (byte order, C type sizes): the data are little-endian anyway
    roots: dict[str, _Storage] = {}

    def storage(pid) -> _Storage:
        storage_type, key, _location, numel, view = _storage_id(pid, 6)
        if key not in roots:  # elements follow the object pickle: allocate now, fill in below
            if numel * storage_type.dtype.itemsize > _remaining(file):
                raise ComfyDatasetError(f"storage {key} is larger than the file")
            roots[key] = _Storage(np.zeros(numel, storage_type.dtype))
        root = roots[key]
        if root.data.dtype != storage_type.dtype:
            raise ComfyDatasetError(f"storage {key} is read as two dtypes")
        if view is None:
            return root
        _view_key, offset, view_numel = view
        if not (isinstance(offset, int) and isinstance(view_numel, int) and 0 <= offset <= offset + view_numel):
            raise ComfyDatasetError(f"bad storage view {view!r}")
        if offset + view_numel > root.data.size:
            raise ComfyDatasetError(f"storage view {view!r} reaches past its storage")
        return _Storage(root.data[offset : offset + view_numel])

    result = _SafeUnpickler(file, storage).load()
    keys = _SafeUnpickler(file).load()
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise ComfyDatasetError(f"the legacy storage list {keys!r} does not match the tensors")
    for key in keys:
        data = roots[key].data
        numel = int.from_bytes(file.read(8), "little")
        if numel != data.size:
            raise ComfyDatasetError(f"storage {key} holds {numel} elements, its tensors expect {data.size}")
        raw = file.read(numel * data.itemsize)
        data[...] = _elements(raw, data.dtype, numel, True, f"storage {key}")
    return result
